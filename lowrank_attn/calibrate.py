"""Calibration: see post-RoPE, post-q/k-norm queries and keys of every layer through
transformers' attention-function registry, and stream their Grams in float64.

``attention_hook(model, fn)`` registers a temporary attention implementation that
calls ``fn(layer, query, key, attention_mask, scaling)`` and then delegates to the
model's own implementation (sdpa when it was eager, which is not in the registry).
The matching mask function is registered under the same name, so sliding-window
layers keep their masks (DESIGN §7 pitfall). Everything is undone in ``finally``.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import adapters
from .errors import StatisticsError

_counter = itertools.count()

# fn(layer, query (B,H,S,d), key (B,Hkv,S,d), attention_mask, scaling) -> None
QKCallback = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], None]


def _configs(model: torch.nn.Module) -> list:
    seen: dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextmanager
def attention_implementation(model: torch.nn.Module, attention_fn: Callable, *, name_prefix: str = "lowrank") -> Iterator[str]:
    """Run ``model`` with ``attention_fn`` (the registry's signature) as its attention
    implementation, masks built as for the model's current implementation."""
    adapters.check_supported(model)
    configs = _configs(model)
    original = {id(c): c._attn_implementation_internal for c in configs}
    base = model.config._attn_implementation or "sdpa"
    if base not in ALL_ATTENTION_FUNCTIONS or base not in ALL_MASK_ATTENTION_FUNCTIONS:
        base = "sdpa"
    name = f"{name_prefix}_{next(_counter)}"
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    try:
        for c in configs:
            c._attn_implementation_internal = name
        yield base
    finally:
        for c in configs:
            c._attn_implementation_internal = original[id(c)]
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


@contextmanager
def attention_hook(model: torch.nn.Module, fn: QKCallback) -> Iterator[None]:
    """Call ``fn`` with the q and k that enter every attention dot product, then attend as usual."""
    layer_of = {id(m): i for i, m in enumerate(adapters.attention_modules(model))}
    delegate: dict[str, Callable] = {}

    def hooked(module, query, key, value, attention_mask, scaling=None, **kwargs):
        s = scaling if scaling is not None else query.shape[-1] ** -0.5
        fn(layer_of[id(module)], query, key, attention_mask, float(s))
        return delegate["fn"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    with attention_implementation(model, hooked, name_prefix="lowrank_capture") as base:
        delegate["fn"] = ALL_ATTENTION_FUNCTIONS[base]
        yield


class GramStats:
    """Streaming float64 second moments of queries and keys, per layer, per head.

    gq[l]: (H, d, d)    sum over tokens of q q^T for each query head
    skk[l]: (Hkv, d, d) sum of k k^T for each KV head;  sk[l]: (Hkv, d) sum of k
    n[l]: tokens seen.  Centred key Gram: skk - n k̄ k̄^T.  Memory is independent of tokens.
    """

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int):
        self.shape = (num_layers, num_heads, num_kv_heads, head_dim)
        d = head_dim
        self.gq = np.zeros((num_layers, num_heads, d, d))
        self.skk = np.zeros((num_layers, num_kv_heads, d, d))
        self.sk = np.zeros((num_layers, num_kv_heads, d))
        self.n = np.zeros(num_layers, dtype=np.int64)
        self.scale = np.full(num_layers, np.nan)

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        # query: (B, H, S, d), key: (B, Hkv, S, d); accumulate in float64 on the tensors' device.
        q = query.detach().to(torch.float64)
        k = key.detach().to(torch.float64)
        self.gq[layer] += torch.einsum("bhsd,bhse->hde", q, q).cpu().numpy()
        self.skk[layer] += torch.einsum("bhsd,bhse->hde", k, k).cpu().numpy()
        self.sk[layer] += k.sum(dim=(0, 2)).cpu().numpy()
        self.n[layer] += q.shape[0] * q.shape[2]
        self.scale[layer] = scaling

    def __iadd__(self, other: "GramStats") -> "GramStats":
        if other.shape != self.shape:
            raise ValueError("cannot add Gram statistics of different shapes")
        self.gq += other.gq
        self.skk += other.skk
        self.sk += other.sk
        self.n += other.n
        self.scale = np.where(np.isnan(self.scale), other.scale, self.scale)
        return self

    def key_gram_centred(self, layer: int) -> np.ndarray:
        """(Hkv, d, d): sum over tokens of (k - k̄)(k - k̄)^T."""
        n = max(int(self.n[layer]), 1)
        mean = self.sk[layer] / n
        return self.skk[layer] - n * np.einsum("hd,he->hde", mean, mean)

    def check_finite(self) -> None:
        for name in ("gq", "skk", "sk"):
            arr = getattr(self, name)
            if not np.isfinite(arr).all():
                bad = sorted({int(i) for i in np.argwhere(~np.isfinite(arr))[:, 0]})
                raise StatisticsError(f"non-finite values in {name} statistics of layers {bad[:10]} "
                                      "(the model produced NaN/inf activations on this text)")
