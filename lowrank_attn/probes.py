"""Candidate plans measured on the dense model: ``installed`` (plans installed for a block, the dense model back
exactly afterwards) and ``end_to_end_kl`` (per layer, the next-token KL of compressing that layer alone). The
allocation policies and signals (``policies``) measure through these."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from .plans import build_plans
from .runtime import adapters
from .runtime.modes import DEFAULT_MODE

if TYPE_CHECKING:
    from .recipe import Recipe


@contextmanager
def installed(model: torch.nn.Module, plans) -> None:
    """``apply_lowrank(model, plans)`` for the duration of the block, then the dense model back exactly:
    each attention module's class, submodules (folded projections are new modules), buffers and plan."""
    from .runtime.modeling_lowrank import apply_lowrank
    from .runtime.surgery import swap_class

    saved, model_cls = [], model.__class__  # apply_lowrank also swaps the model's class for its compressed class
    for mod in adapters.attention_modules(model):
        saved.append((mod, mod.__class__, dict(mod._modules), set(mod._buffers), dict(mod.__dict__)))
    try:
        apply_lowrank(model, plans)
        yield model
    finally:
        swap_class(model, model_cls)
        for mod, cls, modules, buffers, attrs in saved:
            mod.__class__ = cls
            mod._modules.clear()
            mod._modules.update(modules)
            for name in set(mod._buffers) - buffers:
                del mod._buffers[name]
            for name in set(mod.__dict__) - set(attrs):
                del mod.__dict__[name]
            for name in ("layer_idx", "_old_forward"):  # the latter: an accelerate hook's wrapped forward
                if name in attrs:
                    mod.__dict__[name] = attrs[name]


def end_to_end_kl(fits, recipe: Recipe, layout, model, ids: torch.Tensor, rank: int, k_means=None,
                  windows=None) -> np.ndarray:
    """Per layer, the next-token KL to the dense model on ``ids`` when only that layer is compressed
    to ``rank`` (in the default mode, post-rope, whose maps are buffers), its keys quantised as the recipe says; the
    other layers at full rank with unquantised keys, which is exact. (num_layers,)"""
    from .heldout import next_token_logprobs, output_kl

    windows = windows or [recipe.exact_window] * layout.num_layers

    d = layout.head_dim
    dense_logp = next_token_logprobs(model, ids)
    full = build_plans(fits, [[d] * layout.num_kv_heads] * layout.num_layers, dataclasses.replace(recipe, k_bits=None),
                       DEFAULT_MODE, layout, k_means, windows)  # exact: no window or sinks, keys as they are
    kls = np.zeros(layout.num_layers)
    with installed(model, full):
        for layer, mod in enumerate(adapters.attention_modules(model)):
            plan, qm, km = mod.lowrank_plan, mod.lowrank_q_map, mod.lowrank_k_map
            low = build_plans([fits[layer]], [[rank] * layout.num_kv_heads], recipe, DEFAULT_MODE, layout,
                              None if k_means is None else [k_means[layer]], [windows[layer]])[0]
            try:
                mod.lowrank_plan, mod.lowrank_q_map, mod.lowrank_k_map = low, low.q_map.to(qm), low.k_map.to(km)
                kls[layer] = output_kl(dense_logp, model, ids)
            finally:
                mod.lowrank_plan, mod.lowrank_q_map, mod.lowrank_k_map = plan, qm, km
    return kls
