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
from . import stats
from .stats import FitStats, GramStats  # noqa: F401  (the statistics the hooks feed; re-exported)

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
    With ``with_values`` the values are passed too: ``fn(layer, q, k, mask, scaling, value)``, and where ``fn``
    returns the attention output itself (B, S, H, d) — it computed the attention weights anyway — that output is
    used instead of attending a second time (not on layers with soft-capping, sinks or dropout, which ``fn`` does
    not model). ``on_output`` sees what attention returns: ``on_output(layer, out)``, out (B, S, H, d) before the
    output projection."""
    layer_of = {id(m): i for i, m in enumerate(adapters.attention_modules(model))}
    delegate: dict[str, Callable] = {}

    def hooked(module, query, key, value, attention_mask, scaling=None, **kwargs):
        s = scaling if scaling is not None else query.shape[-1] ** -0.5
        extra = (value,) if with_values else ()
        own = fn(layer_of[id(module)], query, key, attention_mask, float(s), *extra)
        plain = not kwargs.get("softcap") and kwargs.get("s_aux") is None and not kwargs.get("dropout")
        if isinstance(own, torch.Tensor) and plain:
            result = (own, None)
        else:
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
        k = k[0].to(stats.PRODUCT_DTYPE)
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
