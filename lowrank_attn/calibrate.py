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


class FitStats:
    """Second moments for the fit, streamed in float64, optionally weighted by attention.

    With ``weighting='attention'`` each key is weighted by the attention it receives from
    queries at distance ≥ ``window`` (the only pairs the projection touches, since the last
    ``window`` keys stay exact), and each query by the attention it gives to such keys:

    gq[l]:  (H, d, d)   Σ_i b_i q_i q_i^T      skk[l]: (Hkv, d, d)  Σ_j a_j k_j k_j^T
    sk[l]:  (Hkv, d)    Σ_j a_j k_j            sa[l]:  (Hkv,)       Σ_j a_j
    Without weighting a = b = 1. Centred key Gram: skk − sk sk^T / sa.
    """

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 weighting: str = "none", window: int = 0):
        d = head_dim
        self.weighting, self.window = weighting, window
        self.group = num_heads // num_kv_heads
        self.gq = np.zeros((num_layers, num_heads, d, d))
        self.skk = np.zeros((num_layers, num_kv_heads, d, d))
        self.sk = np.zeros((num_layers, num_kv_heads, d))
        self.sa = np.zeros((num_layers, num_kv_heads))
        self.scale = np.full(num_layers, np.nan)
        self.tokens = 0

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask, scaling: float) -> None:
        # query: (B, H, S, d), key: (B, Hkv, S, d)
        q = query.detach()
        k = key.detach()
        if self.weighting == "attention":
            b_w, a_w = self._attention_weights(q, k, mask, scaling)  # (B,H,S), (B,Hkv,S)
        else:
            b_w = q.new_ones(q.shape[:3])
            a_w = k.new_ones(k.shape[:3])
        q64, k64 = q.to(torch.float64), k.to(torch.float64)
        b64, a64 = b_w.to(torch.float64), a_w.to(torch.float64)
        self.gq[layer] += torch.einsum("bhs,bhsd,bhse->hde", b64, q64, q64).cpu().numpy()
        self.skk[layer] += torch.einsum("bhs,bhsd,bhse->hde", a64, k64, k64).cpu().numpy()
        self.sk[layer] += torch.einsum("bhs,bhsd->hd", a64, k64).cpu().numpy()
        self.sa[layer] += a64.sum(dim=(0, 2)).cpu().numpy()
        self.scale[layer] = scaling
        if layer == 0:
            self.tokens += q.shape[0] * q.shape[2]

    def _attention_weights(self, q, k, mask, scaling):
        s = q.shape[2]
        kk = k.repeat_interleave(self.group, dim=1)
        logits = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scaling  # (B,H,S,S)
        pos = torch.arange(s, device=q.device)
        dist = pos[:, None] - pos[None, :]
        allowed = dist >= 0
        if mask is not None:
            allowed = allowed & (mask[..., -s:] if mask.dtype == torch.bool else mask[..., -s:] > -1e30)
        p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        p = p * (dist >= self.window)  # only pairs the projection will touch
        b_w = p.sum(-1)  # (B,H,S)   attention each query gives to far keys
        a_w = p.sum(-2)  # (B,H,S)   attention each key receives from far queries
        a_w = a_w.view(a_w.shape[0], -1, self.group, s).sum(2)  # (B,Hkv,S)
        return b_w, a_w

    def key_gram_centred(self, layer: int) -> np.ndarray:
        sa = np.maximum(self.sa[layer], 1e-300)[:, None, None]
        return self.skk[layer] - np.einsum("hd,he->hde", self.sk[layer], self.sk[layer]) / sa

    def query_gram_group(self, layer: int, kv_head: int) -> np.ndarray:
        return self.gq[layer, kv_head * self.group : (kv_head + 1) * self.group].sum(0)

    def check_finite(self) -> None:
        for name in ("gq", "skk", "sk", "sa"):
            if not np.isfinite(getattr(self, name)).all():
                raise StatisticsError(f"non-finite values in {name} statistics (NaN/inf activations on the calibration text)")


class QKSample:
    """Post-RoPE q and k of a few held-out windows, kept (float32, CPU) for the certificate."""

    def __init__(self):
        self.q: dict[int, list[torch.Tensor]] = {}
        self.k: dict[int, list[torch.Tensor]] = {}
        self.scale: dict[int, float] = {}

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask, scaling: float) -> None:
        self.q.setdefault(layer, []).append(query.detach().float().cpu())
        self.k.setdefault(layer, []).append(key.detach().float().cpu())
        self.scale[layer] = scaling
