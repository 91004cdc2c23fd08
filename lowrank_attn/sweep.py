"""``sweep``: fidelity and perplexity versus rank for our method and the baselines, side by side.

Every point: the dense model, compressed in place by one method at one ratio (sharing one
calibration) and restored afterwards (``models.restorable``: no copy of the weights), evaluated
through lm-eval (``evaluate.perplexity``), with the mean/max attention KL of the certificate and the
K-cache bytes per token measured from the cache tensors after a forward pass. Points are appended
to ``sweep.jsonl`` (rewritten atomically per point), so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .runtime import adapters
from .compression import compress, prepare_calibration
from .errors import LowrankAttnError, RecipeError
from .fits import FITS
from .harness.store import ResultsStore
from .heldout import next_token_logprobs, output_kl
from .runtime.kcache import kv_cache_bytes
from .models import LoadedModel, load_model, model_device, restorable
from .recipe import Recipe

# method -> recipe overrides (ratio is set per point). Baselines (``fits.FITS`` registered with baseline=True)
# run without exact window or sink keys, as published, and those installed as post-RoPE maps (no ``fold``) also
# with the exact keys ours keeps ("+exact"); "ours-uniform" is the bare closed form under the same conditions;
# the "ours" variants are the recipe itself (policy, signal, weighting, exact window and sink keys; default
# Recipe(): budget, output signal, attention weighting, 256 exact recent keys and the sink).
_BASELINES = [name for name, f in FITS.items() if f.baseline]
# The rank comparison runs every method on unquantised keys and values (16 bits: as the model holds them) unless
# the method is about quantisation; "ours-kv" is the product's full default (its K and V quantisation included;
# "ours-kv-unrotated" without the value rotation: what the rotation costs in time, eval/bench_decode.py).
_PLAIN = dict(k_bits=16, v_bits=16)
METHODS: dict[str, dict] = {
    **{name: dict(_PLAIN, fit=name, policy="uniform", weighting="none", exact_window=0, exact_sink=0)
       for name in _BASELINES},
    # the same baselines given the exact keys ours keeps (the mode's default window of recent keys and sink)
    **{f"{name}+exact": dict(_PLAIN, fit=name, policy="uniform", weighting="none") for name in _BASELINES
       if FITS[name].fold is None},
    "ours-uniform": dict(_PLAIN, fit="closed-form", policy="uniform", weighting="none", exact_window=0, exact_sink=0),
    "ours-uniform+exact": dict(_PLAIN, fit="closed-form", policy="uniform", weighting="none"),
    # whole RoPE planes kept per head, folded into W_q/W_k (the q/k weights shrink; no exact keys in this mode)
    "rope-pairs": dict(_PLAIN, mode="rope-pairs"),
    "ours": dict(_PLAIN, fit="closed-form"),
    "ours+4bit": dict(_PLAIN, fit="closed-form", k_bits=4),
    "ours+2bit": dict(_PLAIN, fit="closed-form", k_bits=2),
    "ours-kv": dict(fit="closed-form"),
    "ours-kv-unrotated": dict(fit="closed-form", v_rotation="none"),  # the default, values quantised as they are
}
# K-cache quantisation alone (KIVI-style: per channel over 32-token groups, 64 exact recent keys):
# full rank (ThinK keeping every channel = the identity up to a permutation) with k_bits.
QUANT_ONLY = {f"kivi-{b}bit": dict(fit="think", policy="uniform", weighting="none", exact_window=64, exact_sink=0,
                                   k_bits=b, v_bits=16, k_clip="minmax")
              for b in (4, 3, 2)}
# The certificate-driven policy: each head gets the smallest rank whose mean attention-TV bound on
# held-out rows is <= epsilon, so the rank is an outcome, not an input (one point per sweep).
BOUND = {"ours-bound": dict(fit="closed-form", policy="bound", epsilon=0.3)}
DEFAULT_METHODS = ["weight-svd", "key-pca", "think", "ours-uniform", "ours", "ours+4bit"]
DEFAULT_RATIOS = [0.75, 0.5, 0.25]


def _key(method: str, ratio: float | None) -> str:
    return f"{method}@{ratio}" if ratio is not None else method


def point_store(path: Path) -> ResultsStore:
    """``sweep.jsonl``: one point per (method, ratio); a line that is not a point is an error naming it."""
    return ResultsStore(path, ("method", "ratio"), required=("method",), strict=True, what="sweep point")


def load_points(path: Path) -> dict[str, dict]:
    points = {}
    for p in point_store(Path(path)).rows():
        if not isinstance(p["method"], str):
            raise LowrankAttnError(f"{path}: {p['method']!r} is not a sweep point's method; delete the line or the "
                                   "file to restart")
        points[_key(p["method"], p.get("ratio"))] = p
    return points


def cache_bytes_per_token(model, tokenizer, ids: torch.Tensor, float_bytes: int | None = None) -> float:
    """Key-cache bytes per token measured from the cache tensors after one forward with use_cache
    (``float_bytes=2``: as a bf16 model holds them)."""
    return key_bytes_per_token(model, ids, (float_bytes,))[0]


def key_bytes_per_token(model, ids: torch.Tensor, float_bytes=(None, 2)) -> list[float]:
    """Key-cache bytes per token of one forward's cache, counted once per ``float_bytes`` (None: as held)."""
    return [b["k"] for b in cache_bytes_per_token_all(model, ids, float_bytes)]


def cache_bytes_per_token_all(model, ids: torch.Tensor, float_bytes=(None, 2)) -> list[dict[str, float]]:
    """{"k", "v", "total"} cache bytes per token of one forward's cache, once per ``float_bytes``."""
    with torch.inference_mode():
        out = model(input_ids=ids[None].to(model_device(model)), use_cache=True)
    return [{k: v / ids.numel() for k, v in kv_cache_bytes(out.past_key_values, fb).items()} for fb in float_bytes]


def run_sweep(model: str | LoadedModel, out: str | Path, *, ratios=DEFAULT_RATIOS, methods=DEFAULT_METHODS,
              recipe: Recipe | None = None, task: str = "wikitext2-local", text_file: str | None = None,
              max_length: int = 2048, limit: int | None = None, progress: bool = True, log=print,
              device_map: str | None = None) -> list[dict]:
    """Run (or resume) a sweep; returns all points. ``recipe`` sets calibration (text, seq_len, …) and the
    model's device and dtype; ``device_map`` (e.g. ``"auto"``) places it through accelerate instead."""
    from .evaluate import perplexity  # lm-eval import is slow: only when a sweep really runs

    ratios, known = _checked(ratios, methods)
    recipe = recipe or Recipe()
    dense = model if isinstance(model, LoadedModel) else load_model(model, device=recipe.device, dtype=recipe.dtype,
                                                                                device_map=device_map)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowrankAttnError(f"cannot create the sweep directory {out}: {e.strerror or e}; choose another --out") from e
    from .longctx import check_length

    check_length(dense.model, int(max_length), "--max-length")
    ev = dict(task=task, text_file=text_file, max_length=int(max_length), limit=limit)
    store, points = _resumed(out, ev)
    probe = next(iter(prepare_probe(dense, recipe, max(2048, int(max_length)))))
    kl_ids = eval_window(dense, task, text_file, min(max_length, 1024))
    kl_ids = probe[:1024] if kl_ids is None else kl_ids
    dense_logp = next_token_logprobs(dense.model, kl_ids)

    def record(method, ratio, lm, report):
        point = _point(method, ratio, lm, report or {}, perplexity(lm.model, lm.tokenizer, **ev), probe,
                       (dense_logp, kl_ids), ev)
        points[_key(method, ratio)] = store.append(point)
        log(f"{method:>14} ratio {ratio if ratio is not None else '-':>5}: word ppl {point['word_perplexity']:.3f}, "
            f"K bytes/token {point['k_bytes_per_token']:.0f} (K+V {point['kv_bytes_per_token_bf16']:.0f} in bf16), "
            f"next-token KL {point['output_kl']:.4f}, "
            f"attention KL {format(point['kl_mean'], '.4g') if point['kl_mean'] is not None else '-'}")

    if "dense" not in points:
        record("dense", None, dense, {"summary": {"kl_mean": 0.0, "tv_mean": 0.0}})
    cal = None
    todo = [(m, r) for m in methods if m != "dense"
            for r in ([1.0] if m in QUANT_ONLY else [None] if m in BOUND else ratios)]
    for method, ratio in todo:
        if _key(method, ratio) in points:
            continue
        rec = recipe.replace(**known[method], **({"rank_ratio": ratio} if ratio is not None else {}))
        cal = cal or prepare_calibration(dense, rec, progress=progress)
        with restorable(dense.model):  # compress works in place; the surgery is undone after the point
            lm, report = compress(dense, rec, calibration=cal, progress=progress)
            record(method, ratio, lm, report)
    return list(points.values())


def _checked(ratios, methods) -> tuple[list[float], dict]:
    """(the ratios as floats, every known method's recipe overrides); bad ratios or unknown methods refused."""
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise RecipeError(f"ratios: need one or more values in (0, 1], got {ratios}")
    known = dict(METHODS, **QUANT_ONLY, **BOUND)
    unknown = [m for m in methods if m not in known and m != "dense"]
    if unknown:
        raise RecipeError(f"methods: unknown {', '.join(unknown)}; choose from dense, {', '.join(known)}")
    return ratios, known


def _resumed(out: Path, ev: dict) -> tuple[ResultsStore, dict[str, dict]]:
    """The store in ``out`` and the points already in it, which must have been evaluated as ``ev``."""
    store = point_store(out / "sweep.jsonl")
    points = load_points(store.path)
    other = next((p for p in points.values() if p.get("eval") and p["eval"] != ev), None)
    if other is not None:  # a resumed sweep compares like with like
        raise LowrankAttnError(f"{store.path} holds points evaluated with {other['eval']}, not {ev}; rerun with the same "
                               "--task/--text-file/--max-length/--limit, or use another --out")
    return store, points


def _point(method, ratio, lm, report: dict, res: dict, probe, dense_kl: tuple, ev: dict) -> dict:
    """One sweep point: lm-eval's perplexity ``res``, K/V bytes per token of one forward over ``probe``, the
    next-token KL to the dense log-probabilities (``dense_kl``: (logp, ids)), and the report's ranks and KL."""
    dense_logp, kl_ids = dense_kl
    summ = report.get("summary", {})
    held, bf16 = cache_bytes_per_token_all(lm.model, probe)  # one forward, counted both ways
    return {"method": method, "ratio": ratio, "word_perplexity": res["word_perplexity"],
            "byte_perplexity": res["byte_perplexity"], "bits_per_byte": res["bits_per_byte"],
            "documents": res["documents"], "eval_tokens": res["tokens"],
            "k_bytes_per_token": held["k"], "k_bytes_per_token_bf16": bf16["k"],
            "kv_bytes_per_token_bf16": bf16["total"],
            "mean_rank_ratio": summ.get("mean_rank_ratio", 1.0), "padded_rank_ratio": summ.get("padded_rank_ratio", 1.0),
            "output_kl": output_kl(dense_logp, lm.model, kl_ids), "output_kl_tokens": int(kl_ids.numel()),
            "kl_mean": summ.get("kl_mean"), "tv_mean": summ.get("tv_mean"),
            "kl_max": max((h["certificate"]["kl_max"] for layer in report.get("layers", [])
                           for h in layer["kv_heads"] if "certificate" in h), default=0.0),
            "layer_ranks": [layer["r_max"] for layer in report.get("layers", [])],
            "recipe": report.get("recipe"), "eval": {k: v for k, v in ev.items()}}


def eval_window(dense: LoadedModel, task: str, text_file: str | None, n: int) -> torch.Tensor | None:
    """The first ``n`` tokens of the evaluation text (its first documents joined), or None for a
    stock (online) task whose text is not a local file."""
    from .evaluate import task_spec, read_documents

    _, meta = task_spec(task, text_file, None)
    if not meta:
        return None
    docs = read_documents(meta["text_file"], split=meta.get("split", "wikitext"), min_chars=meta.get("min_chars", 1))
    ids, i = [], 0
    while len(ids) < n and i < len(docs):
        ids += dense.tokenizer("\n\n".join(docs[i : i + 8]), add_special_tokens=False)["input_ids"]
        i += 8
    return torch.tensor(ids[:n]) if len(ids) >= 16 else None


def prepare_probe(dense: LoadedModel, recipe: Recipe, length: int = 2048):
    """One fixed window of calibration text for cache-byte measurements: ``length`` tokens (the sweep passes
    its evaluation length, at least 2048: the exact window's share of the cache depends on it), at most the
    model max."""
    from .texts import calibration_texts, token_windows

    layout = adapters.head_layout(dense.model)
    n = min(int(length), layout.max_positions)
    texts = calibration_texts(recipe.text, dense.model, dense.tokenizer)
    return [token_windows(dense.tokenizer, texts, seq_len=n, max_tokens=n)[0].input_ids]
