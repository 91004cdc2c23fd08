"""Model surgery: install layer plans into a loaded model, in place.

``apply_lowrank(model, plans)`` turns each attention module into a ``LowRank*`` subclass of its own class
(same parameters, plus buffers for the maps), whose forward is ``attention.LowRankAttention.forward``, so
``state_dict`` / ``save_pretrained`` keep working. Folded modes rewrite the q/k projection weights through
the family adapter (``adapters``); nothing here names a module. ``plans_from_config`` rebuilds empty plans
of the right shapes from a checkpoint's config (its weights file fills them).
"""

from __future__ import annotations

import torch
from torch import nn

from . import adapters
from .attention import LayerPlan, LowRankAttention, rope_plane_dims


def _lowrank_class(module: nn.Module) -> type:
    base = type(module)
    if getattr(base, "_is_lowrank", False):
        return base
    return type(f"LowRank{base.__name__}", (base,), {"forward": LowRankAttention.forward, "_is_lowrank": True})


def apply_lowrank(model: nn.Module, plans: list[LayerPlan]) -> nn.Module:
    """Install the plans in place. Folded modes rewrite q/k projection weights."""
    family = adapters.adapter(model)
    layout = family.head_layout()
    mods = family.attention_modules()
    if len(plans) != len(mods):
        raise ValueError(f"{len(plans)} layer plans for {len(mods)} layers")
    for i, (mod, plan) in enumerate(zip(mods, plans)):
        if getattr(mod, "lowrank_plan", None) is not None:
            raise ValueError(f"layer {i} is already compressed")
        mod.layer_idx = i
        dev = next(mod.parameters()).device  # every map follows its layer's weights (GPU, device_map)
        if plan.mode == "post-rope":  # maps kept float32 whatever the model dtype (tiny; see _project)
            mod.register_buffer("lowrank_q_map", plan.q_map.to(device=dev, dtype=torch.float32).contiguous())
            mod.register_buffer("lowrank_k_map", plan.k_map.to(device=dev, dtype=torch.float32).contiguous())
            if plan.k_mean is not None and family.softcap(i):
                # centring keys shifts each row's logits by a constant, which softmax ignores but a soft cap
                # (c·tanh(logit / c)) does not: soft-capped layers cache their keys as they are
                plan.k_mean = None
            k_mean = plan.k_mean if plan.k_mean is not None else plan.k_map.new_zeros(plan.k_map.shape[0], plan.k_map.shape[2])
            mod.register_buffer("lowrank_k_mean", k_mean.to(device=dev, dtype=torch.float32).contiguous())
        elif plan.mode == "bilinear":
            family.fold_bilinear(mod, plan.q_map, plan.k_map)
        elif plan.mode == "rope-pairs":
            dims = rope_plane_dims(plan.planes, layout.head_dim)  # (Hkv, r_max), -1 (and -1+d/2) = padding
            valid = plan.planes.ge(0).repeat(1, 2)
            dims = torch.where(valid, dims, torch.zeros_like(dims))
            family.select_qk_rows(mod, dims, valid)
            mod.register_buffer("lowrank_dims", dims.long().to(dev).contiguous())
        else:
            raise ValueError(f"unknown mode {plan.mode!r}")
        mod.lowrank_plan = plan
        mod.lowrank_family = adapters.adapter_for_config(family.config)  # config only: no reference to the model
        mod.__class__ = _lowrank_class(mod)
    return model


def plans_from_config(cfg: dict, layout: adapters.HeadLayout) -> list[LayerPlan]:
    """Plans with zero maps of the right shapes (the weights file fills them)."""
    plans = []
    for i, ranks in enumerate(cfg["ranks"]):
        r_max = max(ranks)
        kw = dict(mode=cfg["mode"], ranks=list(ranks), window=cfg["window"], k_bits=cfg["k_bits"], k_group=cfg["k_group"],
                  sink=cfg.get("sink", 0))
        if cfg["mode"] == "rope-pairs":
            kw["planes"] = torch.tensor(cfg["planes"][i], dtype=torch.long)
        else:
            kw["q_map"] = torch.zeros(layout.num_kv_heads, r_max, layout.head_dim)
            kw["k_map"] = torch.zeros(layout.num_kv_heads, r_max, layout.head_dim)
        plans.append(LayerPlan(**kw))
    return plans
