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

from .runtime import adapters, placement
from .errors import StatisticsError

_counter = itertools.count()

# dtype of one forward's products (q q^T, k k^T over its ≤ a few thousand tokens); the sums over windows
# are always float64. float64 products are exact to ~1e-16 but slow on GPUs without fp64 units; float32
# products were measured (eval/results/precision/gram_products.md) against float64 ones.
PRODUCT_DTYPE = torch.float64

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
    if base != "eager" and (base not in ALL_ATTENTION_FUNCTIONS or base not in ALL_MASK_ATTENTION_FUNCTIONS):
        base = "sdpa"  # eager stays eager (its masks; the modeling file's own function): sdpa refuses soft-capping
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
def attention_hook(model: torch.nn.Module, fn: QKCallback, *, with_values: bool = False,
                   on_output: Callable | None = None) -> Iterator[None]:
    """Call ``fn`` with the q and k that enter every attention dot product, then attend as usual.
    With ``with_values`` the values are passed too: ``fn(layer, q, k, mask, scaling, value)``; ``on_output``
    sees what attention returns: ``on_output(layer, out)``, out (B, S, H, d) before the output projection."""
    layer_of = {id(m): i for i, m in enumerate(adapters.attention_modules(model))}
    delegate: dict[str, Callable] = {}

    def hooked(module, query, key, value, attention_mask, scaling=None, **kwargs):
        s = scaling if scaling is not None else query.shape[-1] ** -0.5
        extra = (value,) if with_values else ()
        fn(layer_of[id(module)], query, key, attention_mask, float(s), *extra)
        attend = delegate["fn"] or _eager_attention(module)
        result = attend(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if on_output is not None:
            on_output(layer_of[id(module)], result[0])
        return result

    with attention_implementation(model, hooked, name_prefix="lowrank_capture") as base:
        delegate["fn"] = ALL_ATTENTION_FUNCTIONS[base] if base in ALL_ATTENTION_FUNCTIONS else None
        yield


def _eager_attention(module: torch.nn.Module) -> Callable:
    """The eager attention function of the modeling file that defines ``module``'s class (not in the registry)."""
    import sys

    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise RuntimeError(f"no eager attention function for {type(module).__name__}")


class _Sum:
    """A float64 statistic, read as a host numpy array. Sums of tensors on an accelerator are kept
    there (torch float64) and moved to the host once, when the statistic is read — not per layer
    per forward; on CPU the sums go straight into the host array (shared memory, no copy)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        obj._flush()
        return obj._host[self.name]

    def __set__(self, obj, value):
        if "_host" not in obj.__dict__:
            obj._host, obj._pending = {}, {}
        obj._flush()
        obj._host[self.name] = value


class _DeviceSums:
    _host: dict
    _pending: dict

    def _acc(self, name: str, device: torch.device) -> torch.Tensor:
        """The accumulator of ``name`` on ``device`` (a float64 torch tensor; add into it in place). One
        partial sum per device (the statistic is their total), so a model spread over devices by a
        device_map never moves a sum between them while it runs."""
        if device.type == "cpu":
            return torch.from_numpy(self._host[name])
        t = self._pending.get((name, device))
        if t is None:
            t = self._pending[(name, device)] = torch.zeros(self._host[name].shape, dtype=torch.float64, device=device)
        return t

    def _flush(self) -> None:
        pending = getattr(self, "_pending", None)
        if pending:
            for (name, _), t in pending.items():
                self._host[name] += t.cpu().numpy()
            pending.clear()

    def __getstate__(self):
        self._flush()
        return self.__dict__


class GramStats(_DeviceSums):
    """Streaming float64 second moments of queries and keys, per layer, per head.

    gq[l]: (H, d, d)    sum over tokens of q q^T for each query head
    skk[l]: (Hkv, d, d) sum of k k^T for each KV head;  sk[l]: (Hkv, d) sum of k
    go[l]: (H, d, d)    sum of o o^T of each query head's attention output (the value side; ``add_output``)
    n[l]: tokens seen.  Centred key Gram: skk - n k̄ k̄^T.  Memory is independent of tokens.
    """

    gq, skk, sk, go = _Sum(), _Sum(), _Sum(), _Sum()

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int):
        self.shape = (num_layers, num_heads, num_kv_heads, head_dim)
        d = head_dim
        self.gq = np.zeros((num_layers, num_heads, d, d))
        self.skk = np.zeros((num_layers, num_kv_heads, d, d))
        self.sk = np.zeros((num_layers, num_kv_heads, d))
        self.go = np.zeros((num_layers, num_heads, d, d))
        self.n = np.zeros(num_layers, dtype=np.int64)
        self.scale = np.full(num_layers, np.nan)

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        # query: (B, H, S, d), key: (B, Hkv, S, d); accumulate in float64 on the tensors' device.
        q = query.detach().to(PRODUCT_DTYPE)
        k = key.detach().to(PRODUCT_DTYPE)
        self._acc("gq", q.device)[layer] += torch.einsum("bhsd,bhse->hde", q, q)  # promoted into the float64 sum
        self._acc("skk", k.device)[layer] += torch.einsum("bhsd,bhse->hde", k, k)
        self._acc("sk", k.device)[layer] += k.sum(dim=(0, 2), dtype=torch.float64)
        self.n[layer] += q.shape[0] * q.shape[2]
        self.scale[layer] = scaling

    def __iadd__(self, other: "GramStats") -> "GramStats":
        if other.shape != self.shape:
            raise ValueError("cannot add Gram statistics of different shapes")
        self.gq += other.gq
        self.skk += other.skk
        self.sk += other.sk
        self.go += other.go
        self.n += other.n
        self.scale = np.where(np.isnan(self.scale), other.scale, self.scale)
        return self

    def add_output(self, layer: int, out: torch.Tensor) -> None:
        # out: (B, S, H, d) attention output before o_proj
        o = out.detach().to(PRODUCT_DTYPE)
        self._acc("go", o.device)[layer] += torch.einsum("bshd,bshe->hde", o, o)

    def key_gram_centred(self, layer: int) -> np.ndarray:
        """(Hkv, d, d): sum over tokens of (k - k̄)(k - k̄)^T."""
        n = max(int(self.n[layer]), 1)
        mean = self.sk[layer] / n
        return self.skk[layer] - n * np.einsum("hd,he->hde", mean, mean)

    def check_finite(self) -> None:
        for name in ("gq", "skk", "sk", "go"):
            arr = getattr(self, name)
            if not np.isfinite(arr).all():
                bad = sorted({int(i) for i in np.argwhere(~np.isfinite(arr))[:, 0]})
                raise StatisticsError(f"non-finite values in {name} statistics of layers {bad[:10]} "
                                      "(the model produced NaN/inf activations on this text)")


class FitStats(_DeviceSums):
    """Second moments for the fit, streamed in float64, optionally weighted by attention.

    With ``weighting='attention'`` each key is weighted by the attention it receives from
    queries at distance ≥ ``window`` (the only pairs the projection touches, since the last
    ``window`` keys stay exact — and so do the first ``sink`` keys, which are left out too), and each
    query by the attention it gives to such keys (``window``: one for every layer, or one per layer):

    gq[l]:  (H, d, d)   Σ_i b_i q_i q_i^T      skk[l]: (Hkv, d, d)  Σ_j a_j k_j k_j^T
    sk[l]:  (Hkv, d)    Σ_j a_j k_j            sa[l]:  (Hkv,)       Σ_j a_j
    go[l]:  (H, d, d)   Σ_i o_i o_i^T of each query head's attention output (the value fit, ``vfit``)
    Without weighting a = b = 1. Centred key Gram: skk − sk sk^T / sa.
    """

    gq, skk, sk, sa, go = _Sum(), _Sum(), _Sum(), _Sum(), _Sum()

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 weighting: str = "none", window=0, sink: int = 0):
        d = head_dim
        self.weighting, self.sink = weighting, sink
        self.windows = list(window) if isinstance(window, (list, tuple)) else [window] * num_layers
        self.group = num_heads // num_kv_heads
        self.gq = np.zeros((num_layers, num_heads, d, d))
        self.skk = np.zeros((num_layers, num_kv_heads, d, d))
        self.sk = np.zeros((num_layers, num_kv_heads, d))
        self.sa = np.zeros((num_layers, num_kv_heads))
        self.go = np.zeros((num_layers, num_heads, d, d))
        self.scale = np.full(num_layers, np.nan)
        self.tokens = 0

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask, scaling: float) -> None:
        # query: (B, H, S, d), key: (B, Hkv, S, d)
        q = query.detach()
        k = key.detach()
        if self.weighting == "attention":
            b_w, a_w = self._attention_weights(q, k, mask, scaling, self.windows[layer])  # (B,H,S), (B,Hkv,S)
        else:
            b_w = q.new_ones(q.shape[:3])
            a_w = k.new_ones(k.shape[:3])
        q64, k64 = q.to(PRODUCT_DTYPE), k.to(PRODUCT_DTYPE)  # products in PRODUCT_DTYPE, sums in float64
        b64, a64 = b_w.to(PRODUCT_DTYPE), a_w.to(PRODUCT_DTYPE)
        dev = q.device
        self._acc("gq", dev)[layer] += torch.einsum("bhs,bhsd,bhse->hde", b64, q64, q64)
        self._acc("skk", dev)[layer] += torch.einsum("bhs,bhsd,bhse->hde", a64, k64, k64)
        self._acc("sk", dev)[layer] += torch.einsum("bhs,bhsd->hd", a64, k64)
        self._acc("sa", dev)[layer] += a64.sum(dim=(0, 2), dtype=torch.float64)
        self.scale[layer] = scaling
        if layer == 0:
            self.tokens += q.shape[0] * q.shape[2]

    def add_output(self, layer: int, out: torch.Tensor) -> None:
        # out: (B, S, H, d) attention output before o_proj
        o = out.detach().to(PRODUCT_DTYPE)
        self._acc("go", o.device)[layer] += torch.einsum("bshd,bshe->hde", o, o)

    def output_gram_group(self, layer: int, kv_head: int) -> np.ndarray:
        """(d, d): the attention-output Gram of the query heads of ``kv_head``'s group, averaged over them
        (``vfit``: exact when the group's heads share one output distribution)."""
        return self.go[layer, kv_head * self.group : (kv_head + 1) * self.group].mean(0)

    def _attention_weights(self, q, k, mask, scaling, window: int, block: int = 256):
        """Attention each query gives to, and each key receives from, pairs at distance ≥ window.

        Query blocks of ``block`` rows (float32), each against only the keys it can see (causal: the
        upper triangle is never computed); a query head group shares its KV head's keys by stacking
        the group's rows (no repeated keys); the causal and window masks touch only the diagonal band."""
        b, h, s, d = q.shape
        g, hkv = self.group, h // self.group
        kt = k.float().transpose(-1, -2)  # (B,Hkv,d,S)
        qf = q.float() * scaling
        if mask is not None:
            mask = mask[..., -s:]
            if mask.dtype != torch.bool:
                mask = mask > -1e30
        b_w = q.new_zeros((b, h, s), dtype=torch.float32)
        a_w = q.new_zeros((b, hkv, s), dtype=torch.float32)
        for start in range(0, s, block):
            stop = min(start + block, s)
            n = stop - start
            rows = torch.arange(start, stop, device=q.device)[:, None]
            qb = qf[:, :, start:stop].reshape(b, hkv, g * n, d)
            logits = torch.matmul(qb, kt[..., :stop]).view(b, h, n, stop)  # keys ≥ stop are in every row's future
            diag = logits[..., start:stop]
            diag.masked_fill_(torch.arange(start, stop, device=q.device) > rows, float("-inf"))
            if mask is not None:
                m = mask[..., start:stop, :stop] if mask.shape[-2] > 1 else mask[..., :stop]
                logits.masked_fill_(~m, float("-inf"))
            p = torch.softmax(logits, dim=-1)
            if window > 0:  # only the pairs the projection will touch: drop distance < window
                lo = max(0, start - window + 1)
                near = rows - torch.arange(lo, stop, device=q.device) < window
                p[..., lo:stop].masked_fill_(near, 0.0)
            p[..., : self.sink].zero_()  # the first keys stay exact too
            b_w[:, :, start:stop] = p.sum(-1)
            a_w[..., :stop] += p.view(b, hkv, g * n, stop).sum(-2)
        return b_w, a_w  # (B,H,S), (B,Hkv,S)

    def key_gram_centred(self, layer: int) -> np.ndarray:
        sa = np.maximum(self.sa[layer], 1e-300)[:, None, None]
        return self.skk[layer] - np.einsum("hd,he->hde", self.sk[layer], self.sk[layer]) / sa

    def key_mean(self, layer: int) -> np.ndarray:
        """(Hkv, d): the (attention-weighted) mean key the centred Gram is centred on."""
        return self.sk[layer] / np.maximum(self.sa[layer], 1e-300)[:, None]

    def query_gram_group(self, layer: int, kv_head: int) -> np.ndarray:
        return self.gq[layer, kv_head * self.group : (kv_head + 1) * self.group].sum(0)

    def check_finite(self, dtype=None) -> None:
        """``dtype``: the model's; float16 gets the likely cause in the message (its range is 6.5e4)."""
        hint = ("; the model runs in float16, whose range its activations exceed (Gemma-3 does): use bfloat16 "
                "or float32" if dtype == torch.float16 else "")
        for name in ("gq", "skk", "sk", "sa", "go"):
            if not np.isfinite(getattr(self, name)).all():
                raise StatisticsError(f"non-finite values in {name} statistics (NaN/inf activations on the calibration "
                                      f"text){hint}")


def _held(t: torch.Tensor) -> torch.Tensor:
    """A held-out activation as the model computed it, on the CPU: a half-precision model's bf16/fp16 values are
    kept as they are (upcast one window at a time where they are used: half the memory, nothing lost); anything
    else as float32."""
    t = t.detach()
    return t.cpu() if t.dtype in (torch.bfloat16, torch.float16) else t.float().cpu()


class QKSample:
    """Post-RoPE q, k and v of a few held-out windows, kept on the CPU (float32, or the half dtype a half-precision
    model computed them in: ``_held``) for the certificate, and the typical (median) squared norm of the residual
    stream entering each layer (``resid_sq``)."""

    def __init__(self):
        self.q: dict[int, list[torch.Tensor]] = {}
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}
        self.scale: dict[int, float] = {}
        self.resid_sq: dict[int, float] = {}
        self._resid_n: dict[int, int] = {}

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask, scaling: float, value=None) -> None:
        self.q.setdefault(layer, []).append(_held(query))
        self.k.setdefault(layer, []).append(_held(key))
        if value is not None:
            self.v.setdefault(layer, []).append(_held(value))
        self.scale[layer] = scaling

    def add_residual(self, layer: int, hidden: torch.Tensor) -> None:
        """Running mean over windows of the median over tokens of ‖h‖² for the residual stream entering
        ``layer``. The median, not the mean: a few massive-activation tokens (attention sinks) carry
        norms orders of magnitude above the rest and would make every error look negligible."""
        sq = hidden.detach().float().pow(2).sum(-1)  # (B, S)
        n0 = self._resid_n.get(layer, 0)
        self.resid_sq[layer] = (self.resid_sq.get(layer, 0.0) * n0 + float(sq.median())) / (n0 + 1)
        self._resid_n[layer] = n0 + 1


def statistics_forward_kwargs(model) -> dict:
    """Forward arguments for a pass that only needs the attention inputs: no cache, and the LM head
    applied to the last position only (its (S × vocab) logits are a fifth of SmolLM2's forward)."""
    import inspect

    kw = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1
    return kw


def window_positions(window, device) -> dict:
    """``position_ids`` for a window placed at ``window.position`` (none for position 0). RoPE attention
    depends only on relative positions, so the forward is the same; the post-RoPE q/k it shows are those
    the model has at those absolute positions, where the serving cache will hold them."""
    if not window.position:
        return {}
    n = len(window.input_ids)
    return {"position_ids": torch.arange(window.position, window.position + n, device=device)[None]}


def run_hooked(model, windows, collector, desc, progress, *, with_values=False, residual=False):
    """Forward every window once (no cache) with ``collector.add`` on the attention hook; with
    ``residual``, ``collector.add_residual(layer, hidden)`` sees the residual stream entering each layer."""
    from tqdm.auto import tqdm

    device = placement.input_device(model)
    handles = []
    if residual:  # record the residual stream entering each decoder layer
        for i, block in enumerate(adapters.decoder_layers(model)):
            handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: collector.add_residual(i, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
    kw = statistics_forward_kwargs(model)
    try:
        with attention_hook(model, collector.add, with_values=with_values,
                            on_output=getattr(collector, "add_output", None)), torch.inference_mode():
            for w in tqdm(windows, desc=desc, unit="win", disable=not progress):
                model(input_ids=w.input_ids[None].to(device), **kw, **window_positions(w, device))
    finally:
        for h in handles:
            h.remove()


def pre_rope_key_moments(model, windows, progress: bool = True) -> np.ndarray:
    """(L, Hkv, d, d) float64 second moments of the keys before RoPE (after the projection and any q/k norm),
    per token, streamed over ``windows`` by a pre-hook on each attention module that recomputes its keys
    (the Palu-style baseline's statistics). Hooks are removed in ``finally``."""
    from functools import partial

    from tqdm.auto import tqdm

    family = adapters.adapter(model)
    mods = family.attention_modules()
    lay = family.head_layout()
    acc = torch.zeros(lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.head_dim, dtype=torch.float64)
    tokens = 0

    def pre(mod, args, kwargs, layer):
        hidden = args[0] if args else kwargs["hidden_states"]
        _, k, _ = family.qkv(mod, hidden)  # (B, Hkv, S, d) before RoPE
        k = k[0].to(PRODUCT_DTYPE)
        acc[layer] += (k.transpose(-1, -2) @ k).to(acc.device, torch.float64)

    device = placement.input_device(model)
    handles = [m.register_forward_pre_hook(partial(pre, layer=i), with_kwargs=True) for i, m in enumerate(mods)]
    try:
        with torch.inference_mode():
            for w in tqdm(windows, desc="pre-RoPE keys", unit="win", disable=not progress):
                model(input_ids=w.input_ids[None].to(device), **statistics_forward_kwargs(model))
                tokens += len(w.input_ids)
    finally:
        for h in handles:
            h.remove()
    return (acc / max(tokens, 1)).numpy()
