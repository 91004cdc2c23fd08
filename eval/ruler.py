"""RULER (lm-eval 0.4.13's own tasks, offline) for dense, our compressed checkpoints and KV-cache peers.

  python eval/ruler.py --model qwen2.5-0.5b --methods dense quanto-4bit hqq-4bit "ours:50pct=runs/qwen-50pct" \\
      --lengths 4096,8192 --limit 10
  python eval/ruler.py --model qwen2.5-0.5b --table        # README.md + ruler_vs_kv_bytes.png from the rows

Tasks: the six RULER tasks that build their data offline from a tokenizer (``OFFLINE_TASKS``:
niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe); the others need a
download (Paul Graham essays, SQuAD, HotpotQA) and are refused in one line. Methods:

* ``dense``: the model as loaded (``lowrank_attn.models.load_model``), transformers' ``DynamicCache``;
* ``ours:<label>=<dir>``: a compressed checkpoint directory (``lowrank_attn.json`` inside), its own low-rank cache;
* a peer name (``quanto-4bit``, ``quanto-2bit``, ``hqq-4bit``, ``hqq-2bit``: ``lowrank_attn.peers``): the dense
  model with a fresh transformers ``QuantizedCache`` per ``generate()`` (the ``kv_cache=`` model arg of
  ``lowrank_attn.lm_eval_model``).

Every method runs through lm-eval's Python API: ``lm_eval.simple_evaluate`` on the ``lowrank`` model type
(``lowrank_attn.lm_eval_model.LowrankLM``, lm-eval's HFLM), greedy decoding (the tasks' own
``do_sample: false``), batch size 1, ``--limit`` samples per task (lm-eval's first N docs). The task data are
built once per (task, length) with lm-eval's seeds fixed first (python 0, numpy 1234, torch 1234: what
``simple_evaluate`` sets), so every method, and ``eval/kvpress/run_ruler.py`` in its own venv, sees the same
prompts; each row records a hash of them (``prompts_sha``).

Rows: one JSON line per (model, method, task, length) appended to ``eval/results/ruler/<model>.jsonl``
(score in [0, 1] as lm-eval's metric for that length, n samples, commit, machine, wall seconds, the
method's KV bytes after one prefill of ``length`` tokens through its cache and the dense bf16 cache's,
floats counted at 2 bytes: ``lowrank_attn.cachepath.cache_bytes``). A rerun skips keys that already have a
row with at least ``--limit`` samples (resumable; the last row of a key wins in the table).
``--table`` writes ``eval/results/ruler/README.md`` and ``ruler_vs_kv_bytes.png``.

The same through lm-eval's command line (one method, no rows; TOKDIR a directory with the model's
tokenizer files, e.g. ``python eval/ruler.py --model qwen2.5-0.5b --tokenizer-dir`` prints it)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lowrank_attn.lm_eval_model --model lowrank \\
        --model_args pretrained=qwen2.5-0.5b,tokenizer=TOKDIR,kv_cache=quanto-4bit,max_length=4352 \\
        --tasks niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,ruler_cwe,ruler_fwe \\
        --metadata '{"max_seq_lengths":[4096]}' --limit 10 --batch_size 1 --device cpu

(``pretrained=`` a compressed checkpoint directory for ours; drop ``kv_cache=`` for dense.)
GPU: ``--device cuda`` (default dtype there bfloat16; float32 on cpu). Nothing else is device-specific.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.errors import LowrankAttnError  # noqa: E402
from lowrank_attn.harness import stamp  # noqa: E402
from lowrank_attn.harness.ruler import (  # noqa: E402  (the tasks, prompts, scoring and rows eval/kvpress shares)
    DEFAULT_LENGTHS, DEFAULT_LIMIT, OFFLINE_TASKS, RESULTS, SEEDS, RulerError, check_limit, default_dtype,
    dense_cache_bytes, is_done, latest_rows, load_task, parse_lengths, parse_tasks, prompt_shas, prompts_sha, rows_path, rows_store,
    safe_name,
)

SMOKE_BELOW = 10  # rows with fewer samples per task are labelled smoke runs in the table
GEN_MARGIN = 256  # HFLM's max_length = length + this (room for the longest max_gen_toks, 128)
# RULER's own haystack sentence (niah "repeat"): the prefill whose cache is measured
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class Method:
    label: str  # the row's "method"
    kind: str  # dense | ours | peer | kvpress
    path: str | None = None  # ours: the checkpoint directory
    peer: str | None = None  # peer: lowrank_attn.peers name


# ---------------------------------------------------------------- arguments


def peer_names() -> tuple[str, ...]:
    from lowrank_attn.peers import PEERS

    return tuple(PEERS)


def parse_method(spec: str, *, check_files: bool = True) -> Method:
    """``dense`` | ``ours:<label>=<dir>`` | a peer name; anything else is a RulerError (one line)."""
    spec = spec.strip()
    if spec == "dense":
        return Method("dense", "dense")
    if spec.startswith("ours:"):
        label, sep, path = spec[len("ours:"):].partition("=")
        if not sep or not label.strip() or not path.strip():
            raise RulerError(f"method {spec!r}: write ours:<label>=<checkpoint dir>")
        if check_files and not (Path(path) / "lowrank_attn.json").is_file():
            raise RulerError(f"method {spec!r}: {path} is not a compressed checkpoint (no lowrank_attn.json)")
        return Method(f"ours:{label.strip()}", "ours", path=path.strip())
    peers = peer_names()
    if spec in peers:
        if check_files:
            from lowrank_attn.lm_eval_model import check_kv_cache
            from lowrank_attn.peers import PeerUnavailableError

            try:
                check_kv_cache(spec)
            except PeerUnavailableError as e:
                raise RulerError(f"method {spec}: {e}") from None
        return Method(spec, "peer", peer=spec)
    raise RulerError(f"unknown method {spec!r}; use dense, ours:<label>=<checkpoint dir>, or a peer: {', '.join(peers)}")


def parse_methods(specs: list[str], *, check_files: bool = True) -> list[Method]:
    methods = [parse_method(s, check_files=check_files) for s in specs]
    labels = [m.label for m in methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise RulerError(f"method label(s) given twice: {', '.join(dup)}")
    return methods


# ---------------------------------------------------------------- tokenizer and bytes


def tokenizer_dir(model: str, tokenizer=None, cache: Path | None = None) -> str:
    """A directory holding the model's tokenizer files (lm-eval's RULER loads it with AutoTokenizer):
    the model's own directory if it has them, else the tokenizer saved once under the lowrank-attn cache."""
    p = Path(str(model))
    if p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(p)
    if cache is None:
        from lowrank_attn.models import cache_root

        cache = cache_root() / "tokenizers"
    out = Path(cache) / safe_name(model)
    if not (out / "tokenizer_config.json").is_file():
        if tokenizer is None:
            from lowrank_attn.lm_eval_model import load_for_eval

            _, tokenizer = load_for_eval(model, device="cpu")
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out))
    return str(out)


# ---------------------------------------------------------------- bytes


def prefill_ids(tokenizer, length: int):
    import torch

    text = NOISE * (length // 8 + 8)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor(ids[:length])


def kv_bytes(model, tokenizer, length: int, cache_factory=None) -> dict:
    """K and V bytes after one prefill of ``length`` tokens through ``cache_factory(model)`` (None: a
    ``DynamicCache``, which a compressed model fills with its own low-rank layers), floats at 2 bytes."""
    import torch
    from transformers import DynamicCache

    from lowrank_attn.cachepath import cache_bytes
    from lowrank_attn.runtime import placement

    cache = cache_factory(model) if cache_factory is not None else DynamicCache(config=model.config)
    ids = prefill_ids(tokenizer, length).to(placement.input_device(model))[None]
    with torch.inference_mode():
        try:
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        except TypeError:
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    b = cache_bytes(out.past_key_values, float_bytes=2)
    del out
    return b


# ---------------------------------------------------------------- running


def _load(method: Method, model: str, device: str, dtype: str):
    from lowrank_attn.lm_eval_model import load_for_eval

    src = method.path if method.kind == "ours" else model
    return load_for_eval(src, device=device, dtype=dtype)


def _log(msg: str) -> None:
    print(f"[ruler {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks, lengths, limit = parse_tasks(args.tasks), parse_lengths(args.lengths), check_limit(args.limit)
    methods = parse_methods(args.methods)
    from lowrank_attn.models import check_device

    check_device(args.device)
    dtype = args.dtype or default_dtype(args.device)
    store = rows_store(rows_path(args.model, args.results))
    out, done = store.path, store.latest()
    todo = [(m, L, t) for m in methods for L in lengths for t in tasks
            if not is_done(done, (args.model, m.label, t, L), limit)]
    if not todo:
        _log(f"nothing to do: every row is in {out}")
        return 0
    _log(f"{len(todo)} rows to run into {out}")

    import lm_eval

    import lowrank_attn.lm_eval_model as lem

    tok_dir = args.tokenizer or None
    task_cache: dict[tuple, object] = {}
    dense_bytes: dict[int, dict] = {}
    dense_model = None  # (model, tokenizer) of the base model, shared by dense and peers
    stamped, max_gen = stamp(args.device), args.max_gen_toks
    for method in methods:
        mine = [(L, t) for m, L, t in todo if m == method]
        if not mine:
            continue
        if method.kind == "ours":
            model_obj, tok = _load(method, args.model, args.device, dtype)
        else:
            if dense_model is None:
                dense_model = _load(Method("dense", "dense"), args.model, args.device, dtype)
            model_obj, tok = dense_model
        if tok_dir is None:
            tok_dir = tokenizer_dir(args.model, dense_model[1] if dense_model else tok)
        for L in sorted({L for L, _ in mine}):
            if L not in dense_bytes:
                base = dense_model[0] if dense_model is not None else model_obj
                if method.kind == "ours":  # the dense cache has the base model's shape: build it from the config
                    dense_bytes[L] = _dense_bytes_from_rows(done, args.model, L) or dense_cache_bytes(model_obj.config, L)
                else:
                    dense_bytes[L] = kv_bytes(base, tok, L)
            if method.kind == "dense":
                mb = dense_bytes[L]
            else:
                factory = (lambda m, name=method.peer: __import__("lowrank_attn.peers", fromlist=["make_cache"])
                           .make_cache(name, m)) if method.kind == "peer" else None
                mb = kv_bytes(model_obj, tok, L, factory)
            lm = lem.LowrankLM(pretrained=model_obj, tokenizer=tok, kv_cache=method.peer, batch_size=1,
                               max_length=L + GEN_MARGIN)
            for t in [t for LL, t in mine if LL == L]:
                if (t, L) not in task_cache:
                    _log(f"building {t} at {L} tokens (lm-eval's generator, 500 docs)")
                    task_cache[(t, L)] = load_task(t, L, tok_dir)
                task_obj = task_cache[(t, L)]
                _log(f"{method.label} {t} {L}: {limit} samples")
                t0 = time.time()
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=[task_obj], limit=limit, log_samples=True, bootstrap_iters=0,
                    gen_kwargs={"max_gen_toks": max_gen} if max_gen else None,
                    metadata={"max_seq_lengths": [L], "tokenizer": tok_dir}, **SEEDS)
                wall = time.time() - t0
                samples = res["samples"][t]
                metric = res["results"][t].get(f"{L},none")
                prompts = [s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict)
                           else s["arguments"][0][0] for s in samples]
                row = {"model": args.model, "method": method.label, "task": t, "length": L,
                       "score": None if metric is None else float(metric), "n": len(samples), "limit": limit,
                       "kv_bytes": mb["total"], "k_bytes": mb["k"], "v_bytes": mb["v"],
                       "dense_kv_bytes": dense_bytes[L]["total"], "kv_fraction": mb["total"] / dense_bytes[L]["total"],
                       "bytes_how": "measured: cache_bytes after one prefill of length tokens, floats at 2 bytes",
                       "source": method.path or args.model, "dtype": dtype, "max_gen_toks": max_gen,
                       "prompts_sha": prompts_sha(prompts), "prompt_shas": prompt_shas(prompts), "seeds": SEEDS, "harness": "lm-eval " + lm_eval.__version__,
                       **stamped, "wall_s": round(wall, 1),
                       "responses": [s["filtered_resps"][0] if s.get("filtered_resps") else None for s in samples]}
                store.append(row)
                _log(f"{method.label} {t} {L}: score {row['score']} (n={row['n']}) in {wall:.0f}s")
        if method.kind == "ours":
            del model_obj
    return 0


def _dense_bytes_from_rows(rows: dict, model: str, length: int) -> dict | None:
    for (mo, me, _t, L), row in rows.items():
        if mo == model and me == "dense" and L == length and row.get("kv_bytes"):
            b = int(row["kv_bytes"])
            return {"k": b // 2, "v": b - b // 2, "total": b}
    return None


# ---------------------------------------------------------------- table and plot


def _fmt_bytes(b) -> str:
    if b is None:
        return "–"
    return f"{b / 2**20:.1f} MiB"


def render_table(rows: list[dict], model: str | None = None) -> str:
    """Markdown: per method and length, score per task (%), mean over the tasks it has, n, KV bytes."""
    latest = list(latest_rows(rows).values())
    if model is not None:
        latest = [r for r in latest if r["model"] == model]
    if not latest:
        return "# RULER\n\nNo rows yet.\n"
    tasks = [t for t in OFFLINE_TASKS if any(r["task"] == t for r in latest)]
    models = sorted({r["model"] for r in latest})
    lines = ["# RULER (lm-eval 0.4.13, offline tasks)", "",
             "Written by `python eval/ruler.py --table` from `eval/results/ruler/<model>.jsonl`; one row per "
             "(model, method, task, length). Score: lm-eval's string match for the task at that length, in %, "
             "greedy decoding, the first n seeded docs of each task. Mean: over the tasks the row has. KV bytes: "
             "the method's K+V cache after one prefill of `length` tokens, floats counted at 2 bytes, and its "
             "fraction of the dense bf16 cache; `≈` marks a nominal (1 − ratio) figure (kvpress presses, not "
             "measured).", ""]
    smoke = [r for r in latest if int(r.get("n", 0)) < SMOKE_BELOW]
    if smoke:
        ns = sorted({int(r["n"]) for r in smoke})
        lines += [f"**Smoke run (n={'/'.join(map(str, ns))} samples per task): rows marked *smoke* show the "
                  f"pipeline works; they are not measurements (a binomial standard error of up to "
                  f"{50 / math.sqrt(max(ns)):.0f} points per task at that n).**", ""]
    for mo in models:
        mine = [r for r in latest if r["model"] == mo]
        lines += [f"## {mo}", "",
                  "| method | length | n | " + " | ".join(tasks) + " | mean | KV bytes | fraction of dense |",
                  "|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in mine:
            groups.setdefault((r["method"], int(r["length"])), []).append(r)
        for (me, L) in sorted(groups, key=lambda k: (k[1], _method_order(k[0]), k[0])):
            g = {r["task"]: r for r in groups[(me, L)]}
            scores = [g[t]["score"] for t in tasks if t in g and g[t].get("score") is not None]
            mean = sum(scores) / len(scores) if scores else None
            ns = sorted({int(r["n"]) for r in g.values()})
            n = "/".join(map(str, ns))
            label = me + (" *smoke*" if ns and min(ns) < SMOKE_BELOW else "")
            any_r = next(iter(g.values()))
            nominal = "≈" if "nominal" in str(any_r.get("bytes_how", "")) else ""
            frac = any_r.get("kv_fraction")
            cells = [f"{100 * g[t]['score']:.1f}" if t in g and g[t].get("score") is not None else "–" for t in tasks]
            lines.append(f"| {label} | {L} | {n} | " + " | ".join(cells)
                         + f" | {'–' if mean is None else f'{100 * mean:.1f}'}"
                         + (f" ({len(scores)} of {len(tasks)} tasks)" if mean is not None and len(scores) < len(tasks) else "")
                         + f" | {nominal}{_fmt_bytes(any_r.get('kv_bytes'))}"
                         + f" | {'–' if frac is None else f'{nominal}{frac:.3f}'} |")
        commits = sorted({str(r.get("commit")) for r in mine})
        machines = sorted({f"{r['machine'].get('device', '?')}, {r['machine'].get('cpu_count', '?')} cpus, "
                           f"{r['machine'].get('torch_threads', '?')} torch threads"
                           for r in mine if isinstance(r.get("machine"), dict)})
        lines += ["", f"Commits: {', '.join(commits)}. Machines: {'; '.join(machines)}. "
                      f"Wall: {sum(float(r.get('wall_s') or 0) for r in mine) / 60:.1f} min in all.", ""]
        shas = {}
        for r in mine:
            shas.setdefault((r["task"], int(r["length"]), int(r["n"])), set()).add(r.get("prompts_sha"))
        bad = [f"{t}@{L} (n={n})" for (t, L, n), s in shas.items() if len(s) > 1]
        if bad:
            lines += [f"Warning: methods saw different prompts for {', '.join(sorted(bad))} (prompts_sha differs).", ""]
    return "\n".join(lines) + "\n"


def _method_order(label: str) -> int:
    return 0 if label == "dense" else 1 if label.startswith("ours") else 3 if label.startswith("kvpress") else 2


def plot(rows: list[dict], path: Path) -> bool:
    """Mean RULER score vs KV bytes fraction of dense, one point per (method, length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = list(latest_rows(rows).values())
    pts: dict[tuple, list] = {}
    for r in latest:
        if r.get("score") is None or r.get("kv_fraction") is None:
            continue
        pts.setdefault((r["model"], r["method"], int(r["length"])), []).append(r)
    if not pts:
        return False
    ntasks = max(len(rs) for rs in pts.values())
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"dense": "o", "ours": "*", "kvpress": "s"}
    for (mo, me, L), rs in sorted(pts.items()):
        mean = 100 * sum(r["score"] for r in rs) / len(rs)
        frac = rs[0]["kv_fraction"]
        kind = "dense" if me == "dense" else "ours" if me.startswith("ours") else "kvpress" if me.startswith("kvpress") else "peer"
        smoke = min(int(r["n"]) for r in rs) < SMOKE_BELOW
        ax.scatter([frac], [mean], marker=markers.get(kind, "^"), s=70, alpha=0.5 if smoke else 1.0)
        few = f", {len(rs)} task{'s' if len(rs) > 1 else ''}" if len(rs) < ntasks else ""
        ax.annotate(f"{me} @{L}" + (" (smoke" + few + ")" if smoke else f" ({few[2:]})" if few else ""), (frac, mean),
                    fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("KV cache bytes / dense bf16 cache")
    ax.set_ylabel("mean RULER score (%)")
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title("RULER (offline tasks) vs KV bytes" + ("; translucent = smoke run" if any(
        min(int(r["n"]) for r in rs) < SMOKE_BELOW for rs in pts.values()) else ""), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_table(results: Path = RESULTS) -> Path:
    rows = []
    for f in sorted(Path(results).glob("*.jsonl")):
        rows += rows_store(f).rows()
    md = Path(results) / "README.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    text = render_table(rows)
    if plot(rows, Path(results) / "ruler_vs_kv_bytes.png"):
        text += "\n![mean RULER score vs KV bytes](ruler_vs_kv_bytes.png)\n"
    md.write_text(text, encoding="utf-8")
    return md


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b", help="the base model (short name, HF directory, ...)")
    p.add_argument("--methods", nargs="+", default=["dense"],
                   help="dense, ours:<label>=<checkpoint dir>, or a peer (quanto-4bit, quanto-2bit, hqq-4bit, hqq-2bit)")
    p.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="comma-separated, among the six offline tasks")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated token lengths")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="samples per task (lm-eval's first N seeded docs)")
    p.add_argument("--max-gen-toks", type=int, default=None,
                   help="cap on generated tokens (default: each task's own, 30-128)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (passed through)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on cpu, else bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tokenizer", default=None, help="a directory with the tokenizer files (default: saved once from the model)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where <model>.jsonl and the table go")
    p.add_argument("--table", action="store_true", help="write README.md and ruler_vs_kv_bytes.png from the rows")
    p.add_argument("--tokenizer-dir", action="store_true", help="print the tokenizer directory for --model and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tokenizer_dir:
            print(tokenizer_dir(args.model))
            return 0
        if args.table:
            print(write_table(args.results))
            return 0
        return run(args)
    except RulerError as e:
        print(f"ruler: {e}", file=sys.stderr)
        return 2
    except LowrankAttnError as e:  # lowrank-attn's own one-line errors: bad model, missing backend, ...
        print(f"ruler: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
