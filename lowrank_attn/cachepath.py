"""Perplexity through the cache: the honest harness for every KV-cache method.

A single forward over a window lets every token attend in full precision to the keys and values computed in
the same forward (transformers' ``QuantizedCache`` attends its prefill unquantised, for one), which hides what a
method stores. Here a window is fed in chunks (512 tokens by default) through one cache object, so every token
after the first chunk attends to what the method actually kept of the earlier ones: our low-rank / quantised
cache, a peer's ``QuantizedCache``, or the dense ``DynamicCache``. Bytes are then measured from the tensors the
cache holds (codes, scales, zero-points, exact windows and sinks included), floats counted at 2 bytes — what a
bf16 cache holds — whatever the model's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

from .runtime import placement
from .runtime.kcache import lowrank_layer_bytes, tensor_bytes

DEFAULT_CHUNK = 512


def _bytes(obj, float_bytes: int | None) -> int:
    """Bytes of the tensors inside ``obj``: a tensor (a quantised tensor subclass through its inner tensors), or
    a tuple/list/dict of them (HQQ's (codes, meta)); anything else holds none."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_bytes(getattr(obj, n), float_bytes) for n in names)
        return tensor_bytes(obj, float_bytes)
    if isinstance(obj, (tuple, list)):
        return sum(_bytes(x, float_bytes) for x in obj)
    if isinstance(obj, dict):
        return sum(_bytes(x, float_bytes) for x in obj.values())
    return 0


def cache_bytes(cache, float_bytes: int | None = 2) -> dict[str, int]:
    """{"k", "v", "total"}: bytes held for keys and values by any transformers cache this project meets: ours
    (``LowRankKeyLayer`` or the class bundled in a checkpoint: ``kcache.lowrank_layer_bytes``), dynamic layers, and
    ``QuantizedCache`` layers (quantised part + residual window)."""
    k = v = 0
    for layer in getattr(cache, "layers", []):
        if (kv := lowrank_layer_bytes(layer, float_bytes)) is not None:
            k, v = k + kv[0], v + kv[1]
            continue
        k += _bytes(getattr(layer, "keys", None), float_bytes) + _bytes(getattr(layer, "_quantized_keys", None), float_bytes)
        v += _bytes(getattr(layer, "values", None), float_bytes) + _bytes(getattr(layer, "_quantized_values", None),
                                                                           float_bytes)
    return {"k": k, "v": v, "total": k + v}


def chunked_logprobs(model, ids: torch.Tensor, cache, *, chunk: int = DEFAULT_CHUNK):
    """Feed ``ids`` (S,) in chunks through ``cache``; per chunk yield (its start, the next-token log-probs (s, V)
    float32, the targets (s,), the cache after it)."""
    ids = ids.to(placement.input_device(model))
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, chunk):
            piece = ids[start : start + chunk]
            out = model(input_ids=piece[None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            targets = ids[start + 1 : start + 1 + piece.numel()]
            yield start, torch.log_softmax(out.logits[0, : targets.numel()].float(), dim=-1), targets, cache


def chunked_nll(model, ids: torch.Tensor, *, chunk: int = DEFAULT_CHUNK, cache_factory: Callable | None = None):
    """Feed ``ids`` (S,) in chunks through one cache; return (sum of next-token NLL over S - 1 targets, S - 1,
    the cache). ``cache_factory(model)`` gives the cache (None: the model's default, a ``DynamicCache``; a
    compressed model puts its own layers inside it)."""
    from transformers import DynamicCache

    cache = cache_factory(model) if cache_factory is not None else DynamicCache(config=model.config)
    total, count = 0.0, 0
    for _, logp, targets, cache in chunked_logprobs(model, ids, cache, chunk=chunk):
        total -= float(logp.gather(-1, targets[:, None]).sum())
        count += targets.numel()
    return total, count, cache


def forward_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL over the S - 1 targets of ``ids`` (S,), S - 1) in one forward without a cache: what
    a prefill sees (every token attends in full to the keys of the same forward)."""
    ids = ids.to(placement.input_device(model))
    with torch.inference_mode():
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
    return -float(torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum()), ids.numel() - 1


def token_perplexity(model, windows, *, chunk: int | None = None, cache_factory: Callable | None = None) -> float:
    """Token perplexity over ``windows`` (1-D id tensors, or ``texts.Window``s): one forward per window
    (``chunk=None``: :func:`forward_nll`) or fed through one cache per window in ``chunk``-token chunks
    (:func:`chunked_nll`). The one token-perplexity measure of the package and of eval/."""
    import math

    nll, n = 0.0, 0
    for w in windows:
        ids = getattr(w, "input_ids", w)
        s, c = (forward_nll(model, ids) if chunk is None
                else chunked_nll(model, ids, chunk=chunk, cache_factory=cache_factory)[:2])
        nll, n = nll + s, n + c
    return math.exp(nll / max(n, 1))


def cache_perplexity(model, windows: list[torch.Tensor], *, chunk: int = DEFAULT_CHUNK, cache_factory=None,
                     progress: bool = False, desc: str = "through the cache") -> dict:
    """Token perplexity over ``windows`` (each a 1-D id tensor, one fresh cache per window) fed through the cache
    in chunks, and the K/V bytes per token (bf16 floats) the cache held after the last window."""
    import math

    from tqdm.auto import tqdm

    nll, n, cache = 0.0, 0, None
    for ids in tqdm(windows, desc=desc, unit="win", disable=not progress):
        s, c, cache = chunked_nll(model, ids, chunk=chunk, cache_factory=cache_factory)
        nll, n = nll + s, n + c
    held = cache_bytes(cache, 2) if cache is not None else {"k": 0, "v": 0, "total": 0}
    last = windows[-1].numel() if windows else 1
    return {"token_perplexity": math.exp(nll / max(n, 1)), "tokens": n, "windows": len(windows), "chunk": chunk,
            "bytes_per_token": {k: v / last for k, v in held.items()}}


def copy_logprobs(model, prefix: list[int], text: list[int], *, cache_factory: Callable | None = None) -> torch.Tensor:
    """The long-range copy probe: ``prefix`` (the BOS, or nothing) + ``text`` + ``text`` fed through one cache in two
    chunks, the first ``prefix + text``, the second the repeat. Returns the second chunk's next-token log-probs
    (len(text) - 1, V) for its targets ``text[1:]``: text a model can only predict by attending to its first copy,
    one chunk back, as the cache stored it (what RULER's retrieval needs; natural text's next token mostly needs
    nearby tokens)."""
    from transformers import DynamicCache

    ids = torch.tensor(list(prefix) + list(text) + list(text))
    cache = cache_factory(model) if cache_factory is not None else DynamicCache(config=model.config)
    first = len(prefix) + len(text)
    _, (_, logp, _, _) = chunked_logprobs(model, ids, cache, chunk=first)  # exactly two chunks
    return logp  # (len(text) - 1, V)


COPY_WARN_POINTS = 10  # copy accuracy this many points under dense: warn (Gemma-3's byte target lost 35, RULER 2.4 vs 35.7)


def copy_lost(accuracy: float, dense_accuracy: float) -> bool:
    """Whether a copy top-1 accuracy is ``COPY_WARN_POINTS`` or more under dense's: long-range retrieval is likely
    lost (compress warns; the fidelity policy skips the point)."""
    return 100 * (dense_accuracy - accuracy) >= COPY_WARN_POINTS


def copy_check(dense_logp: torch.Tensor, logp: torch.Tensor, text: list[int]) -> dict:
    """The copy probe's summary from :func:`copy_logprobs` of the dense and the compressed model on ``text``:
    mean next-token KL(dense ‖ compressed) on the repeat, and both models' top-1 accuracy on its targets. Rounded
    (KL to 1e-4, accuracies to 0.1%) so that the checkpoint's sidecar does not follow the thread count's rounding."""
    from .heldout import logprob_kl

    target, dense_logp = torch.tensor(text[1:], device=logp.device), dense_logp.to(logp.device)
    return {"tokens": len(text), "kl": round(float(logprob_kl(dense_logp, logp).mean()), 4),
            "accuracy": round(float((logp.argmax(-1) == target).float().mean()), 3),
            "dense_accuracy": round(float((dense_logp.argmax(-1) == target).float().mean()), 3)}
