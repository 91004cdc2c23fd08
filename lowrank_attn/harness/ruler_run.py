"""The RULER run behind ``eval/ruler.py``: the methods, the loop over methods × lengths × tasks through lm-eval's
Python API, and one row per (model, method, task, length) (:mod:`.ruler` has the tasks, prompts and rows that
``eval/kvpress/run_ruler.py`` shares; :mod:`.ruler_report` the table and plot).

Methods (:func:`parse_method`):

* ``dense``: the model as loaded (``lowrank_attn.models.load_model``), transformers' ``DynamicCache``;
* ``ours-exact:<label>=<dir>``: a compressed checkpoint directory (``lowrank_attn.json`` inside), its own low-rank
  cache, each prompt attended exactly and stored compressed (``prefill=exact``, how a post-rope checkpoint serves
  by default, as ``QuantizedCache`` runs: only the generated tokens read the compressed cache);
  ``ours:<label>=<dir>``: the same with each prompt attended over what the cache stores (``prefill=compressed``);
* a peer name (``quanto-4bit``, ``quanto-2bit``, ``hqq-4bit``, ``hqq-2bit``: ``lowrank_attn.peers``): the dense
  model with a fresh transformers ``QuantizedCache`` per ``generate()`` (the ``kv_cache=`` model arg of
  ``lowrank_attn.lm_eval_model``).

Every method runs through ``lm_eval.simple_evaluate`` on the ``lowrank`` model type
(``lowrank_attn.lm_eval_model.LowrankLM``, lm-eval's HFLM), greedy decoding (the tasks' own ``do_sample: false``),
batch size 1, ``limit`` samples per task (lm-eval's first N docs). The task data are built once per (task,
length) with lm-eval's seeds fixed first (python 0, numpy 1234, torch 1234: what ``simple_evaluate`` sets), so
every method, and ``eval/kvpress/run_ruler.py`` in its own venv, sees the same prompts; each row records a hash
of them (``prompts_sha``).

Rows (:func:`run`): score in [0, 1] as lm-eval's metric for that length, n samples, commit, machine, wall
seconds, the method's KV bytes after one prefill of ``length`` tokens through its cache and the dense bf16
cache's, floats counted at 2 bytes (``lowrank_attn.cachepath.cache_bytes``). A rerun skips keys that already
have a row with at least ``limit`` samples (resumable; the last row of a key wins in the table).

Stdlib at module level; torch, transformers and lm-eval are imported where they are used.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .provenance import stamp
from .ruler import (
    DEFAULT_LENGTHS, DEFAULT_LIMIT, RESULTS, SEEDS, RulerError, check_limit, checkpoint_identity, default_dtype,
    dense_cache_bytes, extendable, extended_row, extends_prompts, is_done, load_task, parse_lengths, parse_tasks,
    prompt_shas, prompts_sha, rows_path, rows_store, safe_name, task_prompts,
)

GEN_MARGIN = 256  # HFLM's max_length = length + this (room for the longest task max_gen_toks, 128; or --max-gen-toks)
# RULER's own haystack sentence (niah "repeat"): the prefill whose cache is measured
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
BYTES_HOW = "measured: cache_bytes after one prefill of length tokens, floats at 2 bytes"


@dataclass(frozen=True)
class Method:
    label: str  # the row's "method"
    kind: str  # dense | ours | peer | kvpress
    path: str | None = None  # ours: the checkpoint directory
    peer: str | None = None  # peer: lowrank_attn.peers name
    prefill: str | None = None  # ours: "exact" (ours-exact:) or "compressed" (ours:)


# ---------------------------------------------------------------- arguments


def peer_names() -> tuple[str, ...]:
    from ..peers import PEERS

    return tuple(PEERS)


def parse_method(spec: str, *, check_files: bool = True) -> Method:
    """``dense`` | ``ours:<label>=<dir>`` | ``ours-exact:<label>=<dir>`` | a peer name; anything else is a
    RulerError (one line)."""
    from ..checkpoint import SIDECAR, is_checkpoint

    spec = spec.strip()
    if spec == "dense":
        return Method("dense", "dense")
    kind, colon, rest = spec.partition(":")
    if colon and kind in ("ours", "ours-exact"):
        label, sep, path = rest.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise RulerError(f"method {spec!r}: write {kind}:<label>=<checkpoint dir>")
        if check_files and not is_checkpoint(path):
            raise RulerError(f"method {spec!r}: {path} is not a compressed checkpoint (no {SIDECAR})")
        return Method(f"{kind}:{label.strip()}", "ours", path=path.strip(),
                      prefill="exact" if kind == "ours-exact" else "compressed")
    peers = peer_names()
    if spec in peers:
        if check_files:
            from ..lm_eval_model import check_kv_cache
            from ..peers import PeerUnavailableError

            try:
                check_kv_cache(spec)
            except PeerUnavailableError as e:
                raise RulerError(f"method {spec}: {e}") from None
        return Method(spec, "peer", peer=spec)
    raise RulerError(f"unknown method {spec!r}; use dense, ours:<label>=<checkpoint dir>, ours-exact:<label>=<dir>, "
                     f"or a peer: {', '.join(peers)}")


def parse_methods(specs: list[str], *, check_files: bool = True) -> list[Method]:
    methods = [parse_method(s, check_files=check_files) for s in specs]
    labels = [m.label for m in methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise RulerError(f"method label(s) given twice: {', '.join(dup)}")
    return methods


# ---------------------------------------------------------------- tokenizer, models and bytes


def tokenizer_dir(model: str, tokenizer=None, cache: Path | None = None) -> str:
    """A directory holding the model's tokenizer files (lm-eval's RULER loads it with AutoTokenizer):
    the model's own directory if it has them, else the tokenizer saved once under the lowrank-attn cache."""
    p = Path(str(model))
    if p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(p)
    if cache is None:
        from ..models import cache_root

        cache = cache_root() / "tokenizers"
    out = Path(cache) / safe_name(model)
    if not (out / "tokenizer_config.json").is_file():
        if tokenizer is None:
            from ..lm_eval_model import load_for_eval

            _, tokenizer = load_for_eval(model, device="cpu")
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out))
    return str(out)


def load_method(method: Method, model: str, device: str, dtype: str):
    """(model, tokenizer) of a method: its checkpoint for ``ours``, else the base ``model``."""
    from ..lm_eval_model import load_for_eval

    src = method.path if method.kind == "ours" else model
    return load_for_eval(src, device=device, dtype=dtype)


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

    from ..cachepath import cache_bytes
    from ..runtime import placement

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


def dense_bytes_from_rows(rows: dict, model: str, length: int) -> dict | None:
    """The dense K+V bytes at ``length`` a ``dense`` row of ``model`` recorded (None when there is none)."""
    for (mo, me, _t, L), row in rows.items():
        if mo == model and me == "dense" and L == length and row.get("kv_bytes"):
            b = int(row["kv_bytes"])
            return {"k": b // 2, "v": b - b // 2, "total": b}
    return None


def log(msg: str) -> None:
    print(f"[ruler {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- running


def run(*, model: str, methods: list[str], tasks=None, lengths=DEFAULT_LENGTHS, limit: int = DEFAULT_LIMIT,
        max_gen_toks: int | None = None, device: str = "cpu", dtype: str | None = None, threads: int | None = None,
        tokenizer: str | None = None, results: Path = RESULTS) -> int:
    """Run (or resume) every (method, length, task) row of ``model`` missing from ``results``/<model>.jsonl."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    tasks, lengths, limit = parse_tasks(tasks), parse_lengths(lengths), check_limit(limit)
    parsed = parse_methods(methods)
    from ..models import check_device

    check_device(device)
    runner = RulerRunner(model, device, dtype or default_dtype(device), limit, max_gen_toks,
                         rows_store(rows_path(model, results)), tokenizer or None)
    todo = [(m, L, t) for m in parsed for L in lengths for t in tasks
            if not is_done(runner.done, (model, m.label, t, L), limit, runner.settings(m))]
    if not todo:
        log(f"nothing to do: every row is in {runner.store.path}")
        return 0
    if peers := sorted({m.peer for m, _, _ in todo if m.kind == "peer"}):
        from ..peers import check_model

        base = runner.load(Method("dense", "dense"))[0]  # the peers' model, loaded once for them anyway
        for name in peers:  # a model a peer cannot take (sliding-window layers): one line before any row runs
            check_model(name, base)
    log(f"{len(todo)} rows to run into {runner.store.path}")
    for method in parsed:
        mine = [(L, t) for m, L, t in todo if m == method]
        if mine:
            runner.run_method(method, mine)
    return 0


def evaluate_rows(*, model: str, methods: list[Method], tasks, length: int, limit: int, device: str, dtype: str,
                  loaded: dict | None = None, max_gen_toks: int | None = None) -> list[dict]:
    """The rows of ``methods`` at one ``length``, kept in memory (``lowrank-attn eval --task ruler``): nothing read
    from or written to the results files. ``model``: the base model (tokenizer, dense bytes); ``loaded``: method
    label → (model, tokenizer) already loaded."""
    tasks, length, limit = parse_tasks(tasks), parse_lengths([length])[0], check_limit(limit)
    runner = RulerRunner(model, device, dtype, limit, max_gen_toks, MemoryRows(), None, loaded=loaded)
    for method in methods:
        runner.run_method(method, [(length, t) for t in tasks])
    return runner.store.rows()


class MemoryRows:
    """A results store that keeps its rows in memory (what ``RulerRunner`` needs of ``ResultsStore``)."""

    path = "memory"

    def __init__(self):
        self._rows: list[dict] = []

    def latest(self) -> dict:
        return {}

    def rows(self) -> list[dict]:
        return list(self._rows)

    def append(self, row: dict) -> dict:
        self._rows.append(row)
        return row


class RulerRunner:
    """What the rows of one run share: the base model (loaded once, for dense and the peers), the dense bytes per
    length, the built tasks, the tokenizer directory, the stamp. ``loaded``: method label → (model, tokenizer)
    loaded by the caller."""

    def __init__(self, model: str, device: str, dtype: str, limit: int, max_gen: int | None, store, tok_dir,
                 loaded: dict | None = None):
        self.model, self.device, self.dtype, self.limit, self.max_gen = model, device, dtype, limit, max_gen
        self.store, self.done, self.tok_dir = store, store.latest(), tok_dir
        self.loaded = dict(loaded or {})
        self.task_cache: dict[tuple, object] = {}
        self.dense_bytes: dict[int, dict] = {}
        self.dense_model = self.loaded.get("dense")  # (model, tokenizer) of the base model, shared by dense and peers
        self.stamped = stamp(device)

    def load(self, method: Method):
        if method.label in self.loaded:
            model_obj, tok = self.loaded[method.label]
        elif method.kind == "ours":
            model_obj, tok = load_method(method, self.model, self.device, self.dtype)
        else:
            if self.dense_model is None:
                self.dense_model = load_method(Method("dense", "dense"), self.model, self.device, self.dtype)
            model_obj, tok = self.dense_model
        if self.tok_dir is None:
            self.tok_dir = tokenizer_dir(self.model, self.dense_model[1] if self.dense_model else tok)
        return model_obj, tok

    def settings(self, method: Method) -> dict:
        """What a row of ``method`` runs with beyond its key (``ruler.SETTINGS``): a checkpoint by its weights."""
        out = {"dtype": self.dtype, "max_gen_toks": self.max_gen}
        if method.kind == "ours":
            out["checkpoint"] = checkpoint_identity(method.path)
        return out

    def method_bytes(self, method: Method, model_obj, tok, length: int) -> dict:
        """The method's K/V bytes at ``length`` (the dense ones measured or read once per length)."""
        if length not in self.dense_bytes:
            if method.kind == "ours":  # the dense cache has the base model's shape: build it from the config
                self.dense_bytes[length] = (dense_bytes_from_rows(self.done, self.model, length)
                                            or dense_cache_bytes(model_obj.config, length))
            else:
                base = self.dense_model[0] if self.dense_model is not None else model_obj
                self.dense_bytes[length] = kv_bytes(base, tok, length)
        if method.kind == "dense":
            return self.dense_bytes[length]
        factory = None
        if method.kind == "peer":
            from ..peers import make_cache

            def factory(m, name=method.peer):
                return make_cache(name, m)
        return kv_bytes(model_obj, tok, length, factory)

    def run_method(self, method: Method, mine: list[tuple[int, str]]) -> None:
        from ..lm_eval_model import LowrankLM

        model_obj, tok = self.load(method)
        for L in sorted({L for L, _ in mine}):
            log(f"{method.label} {L}: measuring its K/V bytes (one prefill of {L} tokens)")
            mb = self.method_bytes(method, model_obj, tok, L)
            lm = LowrankLM(pretrained=model_obj, tokenizer=tok, kv_cache=method.peer, prefill=method.prefill,
                           batch_size=1, max_length=L + max(GEN_MARGIN, self.max_gen or 0))  # never cuts the prompt
            for t in [t for LL, t in mine if LL == L]:
                old = extendable(self.done, (self.model, method.label, t, L), self.limit, self.settings(method))
                row = self.store.append(self.evaluate(method, lm, t, L, mb, old))
                log(f"{method.label} {t} {L}: score {row['score']} (n={row['n']}) in {row['wall_s']:.0f}s")

    def task(self, task: str, length: int):
        if (task, length) not in self.task_cache:
            log(f"building {task} at {length} tokens (lm-eval's generator, 500 docs)")
            self.task_cache[(task, length)] = load_task(task, length, self.tok_dir)
        return self.task_cache[(task, length)]

    def evaluate(self, method: Method, lm, t: str, L: int, mb: dict, old: dict | None = None) -> dict:
        """One row: ``limit`` samples of task ``t`` at length ``L`` through lm-eval; with ``old`` (a row of fewer
        samples, ``ruler.extendable``) only the docs after its n, merged into it."""
        import lm_eval

        task_obj = self.task(t, L)
        every = [p["prompt"] for p in task_prompts(task_obj, self.limit)] if old is not None else []
        if old is not None and not extends_prompts(old, every):
            log(f"{method.label} {t} {L}: the stored row's prompts are not this task's first docs: running all")
            old = None
        start = 0 if old is None else int(old["n"])
        log(f"{method.label} {t} {L}: {self.limit - start} samples" + (f" (docs {start}-{self.limit - 1}, added to the "
                                                                      f"stored row's {start})" if start else ""))
        t0 = time.time()
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[task_obj], log_samples=True, bootstrap_iters=0,
            **({"samples": {t: list(range(start, self.limit))}} if start else {"limit": self.limit}),
            gen_kwargs={"max_gen_toks": self.max_gen} if self.max_gen else None,
            metadata={"max_seq_lengths": [L], "tokenizer": self.tok_dir}, **SEEDS)
        wall = time.time() - t0
        samples = res["samples"][t]
        metric = res["results"][t].get(f"{L},none")
        prompts = [s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict)
                   else s["arguments"][0][0] for s in samples]
        dense = self.dense_bytes[L]["total"]
        row = {"model": self.model, "method": method.label, "task": t, "length": L,
               "score": None if metric is None else float(metric), "n": len(samples), "limit": self.limit,
               "kv_bytes": mb["total"], "k_bytes": mb["k"], "v_bytes": mb["v"],
               "dense_kv_bytes": dense, "kv_fraction": mb["total"] / dense, "bytes_how": BYTES_HOW,
               "source": method.path or self.model, **self.settings(method),
               "prompts_sha": prompts_sha(prompts), "prompt_shas": prompt_shas(prompts), "seeds": SEEDS,
               "harness": "lm-eval " + lm_eval.__version__, **self.stamped, "wall_s": round(wall, 1),
               "responses": [s["filtered_resps"][0] if s.get("filtered_resps") else None for s in samples]}
        return row if old is None else extended_row(old, row, every)
