"""Long-context report: perplexity change vs dense against context length, and passkey retrieval at the longest.

  python eval/long_context.py smollm2-135m --recipe recipes/smollm2-135m.yaml \\
      --methods dense ours ours+4bit kivi-4bit --lengths 1024 2048 4096 8192 --depths 8
  python eval/long_context.py smollm2-135m --methods dense ours "ours-w256:exact_window=256" "v2:recipes/v2.yaml"

Methods: ``dense``; a name of the sweep's (``sweep.METHODS``, ``sweep.QUANT_ONLY``, ``sweep.BOUND``:
``ours`` = the recipe itself, ``ours+4bit``, ``kivi-4bit`` = K-cache quantisation alone at full rank, …);
or ``LABEL:SPEC`` where SPEC is comma-separated parts, each a recipe YAML (the base instead of --recipe)
or ``field=value`` overrides (values read as YAML), applied after a known LABEL's own overrides.

Every method is compressed once (methods with the same calibration fields share one calibration:
``compression.prepare_calibration``) and saved under --ckpt-dir (gitignored ``runs/``), so a resumed run
loads it instead of compressing again; all the methods' models are then held in memory together (one
copy of the weights each) and measured point by point across methods -- every method at one length
before the next length, then passkey prompt by prompt -- so a run stopped early compares them on the
same points. Measured:

* perplexity at each --lengths L: lm-eval's rolling loglikelihood (``evaluate.perplexity``, HFLM with
  ``max_length=L``) on ONE held-out document: ``--eval-tokens`` (default the longest length, less a few)
  tokens of ``--text`` (default a Gutenberg novel) starting ``--skip-tokens`` in (default the recipe's
  calibration tokens, max_tokens + heldout_tokens: beyond anything calibration reads from one text).
  The same tokens are scored at every L, in L-token windows; change vs dense in token perplexity.
  Each point records the longest input the model was given and the compressed runtime's fused-SDPA
  prefills (``longctx.watch_forward``);
* passkey at the longest length (``--passkey-length``), --depths × --samples prompts, teacher-forced
  exact match (``longctx``).

Points are appended to ``long.jsonl`` (atomically, one per perplexity length or passkey prompt), so a
killed run resumes where it stopped; ``--max-minutes`` stops starting new points after that long (run
again to continue). Writes ``long.jsonl``, ``long.json``, ``long.md`` and ``ppl_vs_length.png`` in --out
(default ``eval/results/<model>/long``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.harness import REPO  # noqa: E402  (the checkout: runs/, recipes/, eval/results/)

DEFAULT_TEXT = "../shared/data/gutenberg-moby-dick.txt"
CAL_FIELDS = ("model", "text", "seq_len", "serve_len", "max_tokens", "heldout_tokens", "seed", "device", "dtype")


class LongError(Exception):
    pass


def _errors():
    from lowrank_attn.errors import LowrankAttnError, RecipeError

    return LowrankAttnError, RecipeError


# ----------------------------------------------------------------------------- methods


def parse_method(item: str, base) -> tuple[str, object | None]:
    """(label, recipe or None for dense) from ``NAME`` or ``LABEL:SPEC`` (see the module docstring)."""
    import yaml

    from lowrank_attn.recipe import Recipe
    from lowrank_attn.sweep import BOUND, METHODS, QUANT_ONLY

    _, RecipeError = _errors()
    label, _, spec = item.partition(":")
    label = label.strip()
    known = dict(METHODS, **QUANT_ONLY, **BOUND)
    if not label:
        raise RecipeError(f"--methods: empty method name in {item!r}")
    if label == "dense" and not spec:
        return label, None
    if label not in known and not spec:
        raise RecipeError(f"--methods: unknown method {label!r}; choose from dense, {', '.join(known)}, "
                          "or give LABEL:recipe.yaml / LABEL:field=value,…")
    recipe = base
    overrides: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.endswith((".yaml", ".yml")) and "=" not in part:
            recipe = Recipe.from_yaml(part).replace(model=base.model, device=base.device)
        elif "=" in part:
            k, _, v = part.partition("=")
            overrides[k.strip()] = yaml.safe_load(v)
        else:
            raise RecipeError(f"--methods: {part!r} in {item!r} is neither a recipe .yaml nor field=value")
    if label in known:
        recipe = recipe.replace(**known[label], **({"rank_ratio": 1.0} if label in QUANT_ONLY else {}))
    return label, recipe.replace(**overrides) if overrides else recipe


def _recipe_hash(recipe) -> str:
    return hashlib.sha1(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- store


def point_key(p: dict) -> str:
    if p["kind"] == "kbytes":
        return f"{p['method']}|kbytes"
    if p["kind"] == "ppl":
        return f"{p['method']}|ppl|{p['length']}"
    return f"{p['method']}|passkey|{p['length']}|{p['depth']!r}|{p['sample']}"


def point_store(path: Path):
    """``long.jsonl`` (``lowrank_attn.harness.ResultsStore``): a line that is not a point is an error naming it."""
    from lowrank_attn.harness import ResultsStore

    return ResultsStore(path, ("method", "kind", "length", "depth", "sample"), required=("method", "kind"), strict=True,
                        what="long-context point")


def load_points(path: Path) -> dict[str, dict]:
    LowrankAttnError, _ = _errors()
    try:
        return {point_key(p): p for p in point_store(path).rows()}
    except (KeyError, TypeError) as e:
        raise LowrankAttnError(f"{path}: a point lacks {e}; delete the line or the file to restart") from e


# ----------------------------------------------------------------------------- text


def heldout_text(tokenizer, text_file: str, skip: int, n_tokens: int) -> tuple[str, int]:
    """(text, tokens): ``n_tokens`` tokens of ``text_file`` after the first ``skip``, decoded, trimmed until
    its own tokenization holds at most ``n_tokens`` tokens (so lm-eval's windows tile it exactly)."""
    from lowrank_attn.texts import resolve_text_file

    LowrankAttnError, _ = _errors()
    path = resolve_text_file(text_file)
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    if len(ids) < skip + n_tokens + 16:
        raise LowrankAttnError(f"{path} has {len(ids)} tokens; --skip-tokens {skip} + --eval-tokens {n_tokens} "
                               "need more (lower them or give a longer --text)")
    seg = ids[skip : skip + n_tokens + 16]  # a little more: the document is stripped (as the task strips it)
    while True:
        text = tokenizer.decode(seg).strip()
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        if n <= n_tokens:
            return text, n
        seg = seg[: len(seg) - max(1, (n - n_tokens) // 2)]


# ----------------------------------------------------------------------------- run


def run_long(model_name: str, out: Path, *, recipe, methods: list[str], lengths: list[int], depths="8", samples=1,
             seed=0, passkey_length=None, filler=None, text=DEFAULT_TEXT, skip_tokens=None, eval_tokens=None,
             ckpt_dir=None, max_minutes=None, progress=True, log=print) -> tuple[list[dict], dict]:
    """Run (or resume) the report's points; returns (points, meta)."""
    import torch

    from lowrank_attn.checkpoint import load_compressed, save_compressed
    from lowrank_attn.compression import compress, prepare_calibration
    from lowrank_attn.evaluate import perplexity
    from lowrank_attn.longctx import check_length, parse_depths, passkey_docs, score_passkey, watch_forward
    from lowrank_attn.models import load_model, restorable
    from lowrank_attn.sweep import key_bytes_per_token

    LowrankAttnError, RecipeError = _errors()
    lengths = sorted({int(x) for x in lengths})
    if not lengths or lengths[0] < 2:
        raise RecipeError(f"--lengths: need one or more lengths of at least 2 tokens, got {lengths}")
    depth_list = parse_depths(depths) if depths else []
    specs = dict(parse_method(m, recipe) for m in methods)
    if "dense" not in specs:
        specs = {"dense": None, **specs}
    pk_len = int(passkey_length or lengths[-1])
    dense = load_model(model_name, device=recipe.device, dtype=recipe.dtype)
    for n in (*lengths, pk_len):
        check_length(dense.model, n, "length")
    skip = int(skip_tokens if skip_tokens is not None else (recipe.max_tokens or 0) + recipe.heldout_tokens)
    from lowrank_attn.texts import bos_prefix

    # one document of exactly the longest window: lm-eval's first window then reads all of it (its prefix token
    # stands in for the first); a BOS that lm-eval's own tokenization adds counts as one of them
    n_eval = int(eval_tokens or lengths[-1] - len(bos_prefix(dense.tokenizer)))
    doc_text, doc_tokens = heldout_text(dense.tokenizer, text, skip, n_eval)
    docs = passkey_docs(dense.tokenizer, pk_len, depth_list, samples=samples, seed=seed, filler=filler) if depth_list else []
    out.mkdir(parents=True, exist_ok=True)
    store = point_store(out / "long.jsonl")
    points = load_points(store.path)
    deadline = None if max_minutes is None else time.monotonic() + 60 * float(max_minutes)
    tmp = Path(tempfile.mkdtemp(prefix="long-context-"))
    doc_file = tmp / "heldout.txt"
    doc_file.write_text(doc_text)
    ckpt_root = Path(ckpt_dir or REPO / "runs" / "long" / model_name.replace("/", "_"))
    # K bytes are counted on the held-out document itself (the longest window): the exact keys' share is its own
    probe = torch.tensor(dense.tokenizer(doc_text, add_special_tokens=False).input_ids[: lengths[-1]])
    meta = {"model": model_name, "recipe": recipe.to_dict(), "methods": {k: (v.to_dict() if v else None) for k, v in specs.items()},
            "lengths": lengths, "passkey_length": pk_len, "depths": depth_list, "samples": int(samples), "seed": int(seed),
            "filler": filler, "text": str(text), "skip_tokens": skip, "eval_tokens": doc_tokens,
            "k_bytes_probe_tokens": int(probe.numel())}
    cals: dict = {}

    def todo(label):
        keys = [f"{label}|kbytes"] + [f"{label}|ppl|{n}" for n in lengths]
        keys += [point_key({"method": label, "kind": "passkey", "length": pk_len, "depth": d.depth, "sample": d.sample})
                 for d in docs]
        return [k for k in keys if k not in points]

    def out_of_time():
        return deadline is not None and time.monotonic() > deadline

    def record(point):
        points[point_key(point)] = store.append(point)

    def measure(label, lm, extra, kind, arg) -> bool:
        """One point (the K bytes, perplexity at length ``arg``, or the passkey prompt ``arg``); False when out of
        time."""
        if kind == "kbytes":
            if f"{label}|kbytes" not in points:
                record({"method": label, "kind": "kbytes", **extra})
            return True
        if kind == "ppl":
            if f"{label}|ppl|{arg}" in points:
                return True
            if out_of_time():
                return False
            t0 = time.perf_counter()
            res = perplexity(lm.model, lm.tokenizer, task=str(doc_file), min_chars=10 ** 12, max_length=arg, progress=progress)
            p = {"method": label, "kind": "ppl", "length": arg, "token_perplexity": res["token_perplexity"],
                 "word_perplexity": res["word_perplexity"], "tokens": res["tokens"], "documents": res["documents"],
                 "forward": res["forward"], "seconds": round(time.perf_counter() - t0, 1), **extra}
            record(p)
            log(f"{label:>12} ppl @ {arg:>5}: token ppl {p['token_perplexity']:.3f} (windows up to "
                f"{p['forward']['max_input_tokens']} tokens, fused prefills {p['forward']['fused_prefill_calls']}, "
                f"{p['seconds']:.0f} s)")
            return True
        d = arg
        if point_key({"method": label, "kind": "passkey", "length": pk_len, "depth": d.depth, "sample": d.sample}) in points:
            return True
        if out_of_time():
            return False
        t0 = time.perf_counter()
        with watch_forward(lm.model) as w:
            r = score_passkey(lm.model, lm.tokenizer, [d], progress=False)[0]
        p = {"method": label, "kind": "passkey", **r, "forward": w.to_json(),
             "seconds": round(time.perf_counter() - t0, 1), **extra}
        record(p)
        log(f"{label:>12} passkey @ {pk_len} depth {d.depth:.3f}: {'retrieved' if r['exact'] else 'missed'} "
            f"(key {r['key']}, greedy {r['predicted']!r}, fused prefills {w.fused_prefill}, {p['seconds']:.0f} s)")
        return True

    def extras(lm, report) -> dict:
        summ = (report or {}).get("summary") or {}
        held, bf16 = key_bytes_per_token(lm.model, probe)  # as the model holds them; floats counted at 2 bytes
        return {"k_bytes_per_token": held, "k_bytes_per_token_bf16": bf16, "k_bytes_probe_tokens": int(probe.numel()),
                "mean_rank_ratio": summ.get("mean_rank_ratio", 1.0), "padded_rank_ratio": summ.get("padded_rank_ratio", 1.0)}

    def compressed(label, rec):
        """compress ``dense`` in place by ``rec`` (one calibration per set of calibration fields); restore it on exit."""
        ck = tuple(json.dumps(rec.to_dict().get(f), default=str) for f in CAL_FIELDS)
        if ck not in cals:
            cals[ck] = prepare_calibration(dense, rec, progress=progress)
        return compress(dense, rec, calibration=cals[ck], progress=progress)

    def schedule(models) -> list:
        # every method at one length before the next length, then passkey prompt by prompt across methods: a run
        # stopped early (--max-minutes) still compares the methods on what it did
        return ([("kbytes", None, m) for m in models] + [("ppl", n, m) for n in lengths for m in models]
                + [("passkey", d, m) for d in docs for m in models])

    models: dict = {}  # label -> (model, extra fields), all in memory at once
    in_place = []  # methods whose model cannot be saved (baselines): measured one at a time, compressing in place
    try:
        for label, rec in specs.items():
            if not todo(label) or out_of_time():
                continue
            if rec is None:
                models[label] = (dense, extras(dense, None))
                continue
            path = ckpt_root / f"{label.replace('/', '_')}-{_recipe_hash(rec)}"
            if not (path / "lowrank_attn.json").is_file():
                with restorable(dense.model):
                    lm, report = compressed(label, rec)
                    try:
                        save_compressed(lm, report, path, overwrite=True)
                    except LowrankAttnError as e:
                        log(f"{label}: not saved ({e}); measured alone")
                        in_place.append((label, rec))
                        continue
            log(f"{label}: loading {path}")
            lm = load_compressed(path, device=rec.device)
            models[label] = (lm, extras(lm, json.loads((path / "lowrank_attn.json").read_text())))
        for kind, arg, label in schedule(models):
            if not measure(label, *models[label], kind, arg):
                break
        for label, rec in in_place:
            if out_of_time():
                break
            with restorable(dense.model):
                lm, report = compressed(label, rec)
                ex = extras(lm, report)
                for kind, arg, _ in schedule([label]):
                    if not measure(label, lm, ex, kind, arg):
                        break
    finally:
        doc_file.unlink(missing_ok=True)
        tmp.rmdir()
    missing = sum(len(todo(label)) for label in specs)
    meta["complete"] = missing == 0
    if missing:
        log(f"{missing} point(s) left: run again to resume")
    return list(points.values()), meta


# ----------------------------------------------------------------------------- report


def summarize(points: list[dict], meta: dict) -> list[dict]:
    """One row per method: token ppl and change vs dense per length, passkey retrieved/total (and per depth)."""
    from lowrank_attn.longctx import summarize_passkey

    methods = list(dict.fromkeys([*meta["methods"], *(p["method"] for p in points)]))
    ppl = {(p["method"], p["length"]): p for p in points if p["kind"] == "ppl"}
    kbytes = {p["method"]: p for p in points if p["kind"] == "kbytes" and "k_bytes_per_token_bf16" in p}
    rows = []
    for m in methods:
        row = {"method": m, "ppl": {}, "ppl_vs_dense_pct": {}}
        for n in meta["lengths"]:
            p, d = ppl.get((m, n)), ppl.get(("dense", n))
            if p:
                row["ppl"][str(n)] = p["token_perplexity"]
                if d:
                    row["ppl_vs_dense_pct"][str(n)] = 100 * (p["token_perplexity"] / d["token_perplexity"] - 1)
        pk = [p for p in points if p["kind"] == "passkey" and p["method"] == m and p["length"] == meta["passkey_length"]]
        row["passkey"] = summarize_passkey(pk) if pk else None
        kb, dense_kb = kbytes.get(m), kbytes.get("dense")
        if kb and dense_kb:  # against a bf16 dense cache (what people serve), on the longest window
            row["k_bytes_per_token_bf16"] = kb["k_bytes_per_token_bf16"]
            row["k_bytes_vs_bf16_dense"] = kb["k_bytes_per_token_bf16"] / dense_kb["k_bytes_per_token_bf16"]
        rows.append(row)
    return rows


def _pair(exact: list[int], digits: list[int]) -> str:
    """'k/n · k/n' (exact match · key digits); one prompt: '1 · 1'."""
    return f"{exact[0]} · {digits[0]}" if exact[1] == 1 else f"{exact[0]}/{exact[1]} · {digits[0]}/{digits[1]}"


def markdown(rows: list[dict], meta: dict) -> str:
    ls = meta["lengths"]
    lines = [f"# {meta['model']}: long context", "",
             f"Token perplexity on one held-out document ({meta['eval_tokens']} tokens of `{Path(meta['text']).name}` "
             f"after the first {meta['skip_tokens']}), lm-eval rolling windows of L tokens; change vs dense. "
             f"Passkey: teacher-forced exact match of a 5-digit key at {len(meta['depths'])} depths × "
             f"{meta['samples']} at {meta['passkey_length']} tokens. K bytes: the cache measured after a forward over "
             f"the {meta.get('k_bytes_probe_tokens', 1024)}-token document, floats counted at 2 bytes (what a bf16 model "
             "holds; packed codes at their size, scales and exact keys included), against the dense bf16 cache.", "",
             "Passkey cells: exact match · key digits right (the digits of the greedy answer are the key's, "
             "whatever word the model puts before the number: `longctx.key_digits_retrieved`).", "",
             "| method | K bytes vs bf16 dense | " + " | ".join(f"ppl @ {n}" for n in ls) + f" | passkey @ {meta['passkey_length']} |",
             "|---|---|" + "---|" * len(ls) + "---|"]
    for r in rows:
        cells = []
        for n in ls:
            v, d = r["ppl"].get(str(n)), r["ppl_vs_dense_pct"].get(str(n))
            cells.append("" if v is None else f"{v:.3f}" if r["method"] == "dense" else f"{v:.3f} ({d:+.1f}%)" if d is not None else f"{v:.3f}")
        pk = r["passkey"]
        kb = r.get("k_bytes_vs_bf16_dense")
        pk_cell = "" if not pk else _pair([pk["retrieved"], pk["total"]], [pk["key_digits"], pk["total"]])
        kb_cell = "" if kb is None else f"{kb:.3f}"
        lines.append(f"| {r['method']} | {kb_cell} | " + " | ".join(cells) + f" | {pk_cell} |")
    pk_rows = [r for r in rows if r["passkey"]]
    if pk_rows:
        depths = list(pk_rows[0]["passkey"]["by_depth"])
        lines += ["", f"Passkey at {meta['passkey_length']} tokens, retrieved per depth (0 = just after the instruction, "
                  "1 = just before the question), exact match · key digits (retrieved, of the prompts at that depth):", "",
                  "| method | " + " | ".join(f"{float(d):.2f}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
        for r in pk_rows:
            bd, dd = r["passkey"]["by_depth"], r["passkey"]["by_depth_digits"]
            lines.append(f"| {r['method']} | " + " | ".join(_pair(bd[d], dd[d]) if d in bd else "" for d in depths) + " |")
    if not meta.get("complete", True):
        lines += ["", "**Incomplete**: some points are missing (run again to resume)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        if r["method"] == "dense" or not r["ppl_vs_dense_pct"]:
            continue
        xs = [int(n) for n in r["ppl_vs_dense_pct"]]
        ax.plot(xs, list(r["ppl_vs_dense_pct"].values()), marker="o", label=r["method"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(meta["lengths"], [str(n) for n in meta["lengths"]])
    ax.set_xlabel("context length (tokens, lm-eval window)")
    ax.set_ylabel("token perplexity vs dense (%)")
    vals = [v for r in rows if r["method"] != "dense" for v in r["ppl_vs_dense_pct"].values()]
    if vals and max(abs(v) for v in vals) > 50:  # a collapse next to small changes: both readable
        ax.set_yscale("symlog", linthresh=10)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g}%"))
    ax.set_title(f"{meta['model']}: perplexity change vs context length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(points: list[dict], meta: dict, out: Path) -> list[str]:
    rows = summarize(points, meta)
    from lowrank_attn.harness import git_commit

    commit = git_commit()
    (out / "long.json").write_text(json.dumps({**meta, "commit": commit, "rows": rows, "points": points}, indent=1,
                                              default=str) + "\n")
    (out / "long.md").write_text(markdown(rows, meta))
    files = ["long.jsonl", "long.json", "long.md"]
    if points and plot(rows, meta, out / "ppl_vs_length.png"):
        files.append("ppl_vs_length.png")
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--recipe", default=None, help="base recipe (default recipes/<model>.yaml if it exists, else defaults)")
    p.add_argument("--methods", nargs="+", default=["dense", "ours", "ours+4bit", "kivi-4bit"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--depths", default="8", help="passkey depths: a count, or comma-separated fractions; 0 = no passkey")
    p.add_argument("--samples", type=int, default=1, help="passkey prompts per depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passkey-length", type=int, default=None, help="default: the longest --lengths")
    p.add_argument("--filler", default=None, help="passkey filler text file (default: neutral sentences)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="held-out text for perplexity")
    p.add_argument("--skip-tokens", type=int, default=None, help="default: the recipe's max_tokens + heldout_tokens")
    p.add_argument("--eval-tokens", type=int, default=None, help="default: the longest --lengths")
    p.add_argument("--out", default=None, help="default eval/results/<model>/long")
    p.add_argument("--ckpt-dir", default=None, help="compressed models are kept here (default runs/long/<model>)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new point after this long; rerun to resume")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", action="store_true", help="only rewrite long.md/json/png in --out from its long.jsonl and "
                   "long.json (no model is loaded)")
    args = p.parse_args(argv)
    if args.report:
        out = Path(args.out or REPO / "eval" / "results" / args.model / "long")
        if not (out / "long.json").is_file():
            print(f"error: {out / 'long.json'} not found: run the report first", file=sys.stderr)
            return 2
        meta = {k: v for k, v in json.loads((out / "long.json").read_text()).items() if k not in ("rows", "points", "commit")}
        files = write_report(list(load_points(out / "long.jsonl").values()), meta, out)
        print((out / "long.md").read_text())
        return 0

    LowrankAttnError, _ = _errors()
    try:
        import torch

        from lowrank_attn.recipe import Recipe

        if args.threads:
            torch.set_num_threads(args.threads)
        rpath = args.recipe or (REPO / "recipes" / f"{args.model}.yaml")
        base = Recipe.from_yaml(rpath) if args.recipe or Path(rpath).is_file() else Recipe()
        base = base.replace(model=args.model)
        out = Path(args.out or REPO / "eval" / "results" / args.model / "long")
        depths = None if args.depths.strip() == "0" else args.depths
        points, meta = run_long(args.model, out, recipe=base, methods=args.methods, lengths=args.lengths,
                                depths=depths or [], samples=args.samples, seed=args.seed,
                                passkey_length=args.passkey_length, filler=args.filler, text=args.text,
                                skip_tokens=args.skip_tokens, eval_tokens=args.eval_tokens, ckpt_dir=args.ckpt_dir,
                                max_minutes=args.max_minutes, progress=not args.no_progress)
        files = write_report(points, meta, out)
    except LowrankAttnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the points so far are kept in long.jsonl: rerun to resume", file=sys.stderr)
        return 130
    print((out / "long.md").read_text())
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
