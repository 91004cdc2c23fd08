"""Model surgery: install layer plans into a loaded model, in place.

``apply_lowrank(model, plans)`` turns each attention module into a ``LowRank*`` subclass of its own class
(same parameters, plus buffers for the maps), whose forward is ``attention.LowRankAttention.forward``, so
``state_dict`` / ``save_pretrained`` keep working. What a layer gets is the business of its mode object
(``modes``), which reaches the weights through the family adapter (``adapters``): nothing here names a
module or branches on a mode. ``plans_from_config`` rebuilds empty plans of the right shapes from a
checkpoint's config (its weights file fills them); ``plans_config`` is the mode part of that config.
"""

from __future__ import annotations

from torch import nn

from . import adapters
from .attention import LayerPlan, LowRankAttention
from .modes import mode_of


def _lowrank_class(module: nn.Module) -> type:
    base = type(module)
    if getattr(base, "_is_lowrank", False):
        return base
    return type(f"LowRank{base.__name__}", (base,), {"forward": LowRankAttention.forward, "_is_lowrank": True})


def apply_lowrank(model: nn.Module, plans: list[LayerPlan]) -> nn.Module:
    """Install the plans in place: each layer's mode adds its buffers or folds its maps into the q/k weights."""
    family = adapters.adapter(model)
    mods = family.attention_modules()
    if len(plans) != len(mods):
        raise ValueError(f"{len(plans)} layer plans for {len(mods)} layers")
    for i, (mod, plan) in enumerate(zip(mods, plans)):
        if getattr(mod, "lowrank_plan", None) is not None:
            raise ValueError(f"layer {i} is already compressed")
        mode = mode_of(plan.mode)
        mod.layer_idx = i
        mode.install(mod, plan, family)
        mod.lowrank_plan = plan
        mod.lowrank_mode = mode
        mod.lowrank_family = adapters.adapter_for_config(family.config)  # config only: no reference to the model
        mod.__class__ = _lowrank_class(mod)
    return model


def plans_from_config(cfg: dict, layout: adapters.HeadLayout) -> list[LayerPlan]:
    """Plans with zero maps of the right shapes (the weights file fills them)."""
    mode = mode_of(cfg["mode"])
    return [mode.empty_plan(cfg, i, layout) for i in range(len(cfg["ranks"]))]


def plans_config(plans: list[LayerPlan]) -> dict:
    """What a checkpoint config stores of the plans' modes: the mode name and the mode's own fields (rope-pairs:
    planes), the inverse of ``plans_from_config`` for them."""
    mode = mode_of(plans[0].mode)
    return {"mode": mode.name, **mode.config(plans)}
