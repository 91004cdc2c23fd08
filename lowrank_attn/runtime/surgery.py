"""Model surgery: install layer plans into a loaded model's attention modules, in place.

``install_plans(model, plans)`` turns each attention module into a ``LowRank*`` subclass of its own class
(same parameters, plus buffers for the maps), whose forward is ``attention.LowRankAttention.forward``, so
``state_dict`` keeps working. The model's own class is left alone here: ``modeling_lowrank.apply_lowrank``
(what callers use) also makes it ``compressed_class`` of its class, so a plain ``model.save_pretrained(DIR)``
writes a ``lowrank_attn`` checkpoint, never one that loads as the dense model. What a layer gets is the business of its mode object
(``modes``), which reaches the weights through the family adapter (``adapters``): nothing here names a
module or branches on a mode. ``plans_from_config`` rebuilds empty plans of the right shapes from a
checkpoint's config (its weights file fills them); ``plans_config`` is that config (``config.lowrank_attn``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .adapters import HeadLayout, adapter, adapter_for_config
from .attention import LowRankAttention
from .modes import mode_of, per_layer
from .plan import LayerPlan
from .placement import execution_device
from .values import install as install_values


def _lowrank_class(module: nn.Module) -> type:
    base = type(module)
    if getattr(base, "_is_lowrank", False):
        return base
    return type(f"LowRank{base.__name__}", (base,), {"forward": LowRankAttention.forward, "_is_lowrank": True})


CONFIG_VERSION = 2  # of config.lowrank_attn: 2 = model_type lowrank_attn (base nested), runtime files, dtype, delta


def install_plans(model: nn.Module, plans: list[LayerPlan]) -> nn.Module:
    """Install the plans in place: each layer's mode adds its buffers or folds its maps into the q/k weights,
    and the attention module's class becomes its ``LowRank*`` subclass (the model's class is not changed)."""
    family = adapter(model)
    mods = family.attention_modules()
    if len(plans) != len(mods):
        raise ValueError(f"{len(plans)} layer plans for {len(mods)} layers")
    for i, (mod, plan) in enumerate(zip(mods, plans)):
        if getattr(mod, "lowrank_plan", None) is not None:
            raise ValueError(f"layer {i} is already compressed")
        mode = mode_of(plan.mode)
        mod.layer_idx = i
        mode.install(mod, plan, family)
        install_values(mod, plan, execution_device(mod))
        mod.lowrank_plan = plan
        mod.lowrank_mode = mode
        mod.lowrank_prefill = serving_prefill(mode)
        mod.lowrank_family = adapter_for_config(family.config)  # config only: no reference to the model
        swap_class(mod, _lowrank_class(mod))
    return model


PREFILL = ("compressed", "exact")


def serving_prefill(mode) -> str:
    """A layer's prefill until ``set_prefill`` says otherwise: ``exact`` where its mode keeps the full keys
    (post-rope), else ``compressed`` (the only one it has)."""
    return "exact" if mode.keeps_full_keys else "compressed"


def set_prefill(model: nn.Module, prefill: str) -> nn.Module:
    """How a forward's tokens attend each other (a prompt, or a chunk after cached tokens):

    * ``exact`` (the default where the mode keeps the full keys, post-rope): dense attention over the prompt's
      full keys and values, as transformers' ``QuantizedCache`` and KIVI run; the cache still stores them
      compressed, and every later token reads that. A chunk after cached tokens (chunked prefill, a second turn)
      attends its own tokens exactly and the cached ones as stored; a decode step is unchanged (its own key and
      value sit in the exact windows, ``exact_window``/``v_window`` ≥ 1). A single forward over a text then
      gives the dense model's logits (with low-rank values, ``v_rank_ratio`` < 1: over the values as encoded):
      measure with ``compressed`` (``prefill_as``) or through the cache (``cachepath``);
    * ``compressed`` (the default of the other modes): over what the cache stores — low-rank, quantised keys and
      values — as every later token attends, each row its own most recent keys and values exact as a decode step
      reads them; a single forward (perplexity, the fidelity policy) measures the compression.

    Not saved with a checkpoint: a loaded one starts at the default."""
    mods = _compressed_modules(model)
    if not mods:
        raise ValueError("set_prefill: the model has no compressed attention layers")
    _check_prefill(prefill, mods)
    for m in mods:
        m.lowrank_prefill = prefill
    return model


def prefill_of(model: nn.Module) -> str | None:
    """The prefill of the model's compressed layers (``set_prefill``; "exact" or "compressed"), or None for a
    model not compressed."""
    mods = _compressed_modules(model)
    return getattr(mods[0], "lowrank_prefill", "compressed") if mods else None


@contextmanager
def prefill_as(model: nn.Module, prefill: str):
    """Within the block, every compressed layer of ``model`` runs ``prefill``; each layer's own setting is
    restored after. What measurements use: a single forward's perplexity or KL measures the compression only
    with ``compressed``. A model with no compressed layer is left as it is."""
    mods = _compressed_modules(model)
    before = [getattr(m, "lowrank_prefill", "compressed") for m in mods]
    _check_prefill(prefill, mods)
    try:
        for m in mods:
            m.lowrank_prefill = prefill
        yield model
    finally:
        for m, p in zip(mods, before):
            m.lowrank_prefill = p


def _check_prefill(prefill: str, mods: list[nn.Module]) -> None:
    if prefill not in PREFILL:
        raise ValueError(f"prefill must be one of {', '.join(PREFILL)}, got {prefill!r}")
    if prefill == "exact" and not all(m.lowrank_mode.keeps_full_keys for m in mods):
        raise ValueError("prefill 'exact' needs the full keys, which only the post-rope mode computes")


def _compressed_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "lowrank_plan", None) is not None]  # any architecture


def swap_class(module: nn.Module, cls: type) -> None:
    """``module.__class__ = cls``, and where accelerate has hooked the module (a device_map across devices or
    with offloading) its hook's wrapped forward too: the hook calls the instance's ``_old_forward``, bound to
    the old class, so without this the compressed forward would never run (the model would stay dense)."""
    module.__class__ = cls
    if "_old_forward" in module.__dict__:
        module._old_forward = cls.forward.__get__(module)


def plans_from_config(cfg: dict, layout: HeadLayout) -> list[LayerPlan]:
    """Plans with zero maps of the right shapes: the weights file fills the modules' buffers, which
    ``plans_follow_buffers`` then gives the plans."""
    mode = mode_of(cfg["mode"])
    plans = [mode.empty_plan(cfg, i, layout) for i in range(len(cfg["ranks"]))]
    for i, plan in enumerate(plans):
        _value_fields(plan, cfg, i, layout)
        plan.k_clip = cfg.get("k_clip", "minmax")  # absent before it was recorded: KIVI's min/max
    return plans


def _value_fields(plan: LayerPlan, cfg: dict, layer: int, layout: HeadLayout) -> None:
    """The value side of ``layer`` from a checkpoint config (absent in checkpoints without one: values as they are)."""
    rank = per_layer(cfg.get("v_ranks"), layer)
    if rank is not None:
        plan.v_enc = torch.zeros(layout.num_kv_heads, rank, layout.head_dim)
        plan.v_dec = torch.zeros(layout.num_kv_heads, layout.head_dim, rank)
    plan.v_bits, plan.v_group = cfg.get("v_bits"), cfg.get("v_group", 32)
    plan.v_window = int(per_layer(cfg.get("v_window", 0), layer))
    plan.v_rotation = cfg.get("v_rotation", "none")
    plan.v_clip = cfg.get("v_clip", "minmax")


# plan fields and the module buffers that hold them once installed (modes.PostRope, values.install)
_PLAN_BUFFERS = (("q_map", "lowrank_q_map"), ("k_map", "lowrank_k_map"), ("k_mean", "lowrank_k_mean"),
                 ("v_enc", "lowrank_v_enc"), ("v_dec", "lowrank_v_dec"))


def plans_follow_buffers(model: nn.Module) -> None:
    """After a checkpoint's tensors are assigned to the modules (``load_state_dict(assign=True)``), point each
    layer's plan at the maps its module now computes with: ``plans_from_config`` made zero maps, and what reads
    plans (``heldout.attention_kl``, reports) would otherwise measure those."""
    for mod in adapter(model).attention_modules():
        plan = getattr(mod, "lowrank_plan", None)
        if plan is None:
            continue
        for field, name in _PLAN_BUFFERS:
            t = getattr(mod, name, None)
            if isinstance(t, torch.Tensor) and not t.is_meta:
                setattr(plan, field, t)


def _one_or_list(values: list):
    return values[0] if len(set(values)) == 1 else values


# plan fields a checkpoint config holds once for every layer (the rest: one value, or one per layer)
_SHARED_FIELDS = ("mode", "k_bits", "k_group", "k_clip", "v_bits", "v_group", "v_rotation", "v_clip")


def plans_config(plans: list[LayerPlan]) -> dict:
    """What a checkpoint config stores of the plans (``config.lowrank_attn``), the inverse of
    ``plans_from_config``: ranks, exact keys, quantisation, and the mode's own fields (rope-pairs: planes)."""
    p0 = plans[0]
    for field in _SHARED_FIELDS:
        if len({getattr(p, field) for p in plans}) > 1:
            raise ValueError(f"layers differ in {field} ({', '.join(sorted({repr(getattr(p, field)) for p in plans}))}): a "
                             "checkpoint holds one setting for every layer")
    mode = mode_of(p0.mode)
    cfg = {"format_version": CONFIG_VERSION, "mode": mode.name,
           "window": _one_or_list([p.window for p in plans]),  # one int when every layer agrees, else one per layer
           "sink": _one_or_list([p.sink for p in plans]),
           "k_bits": p0.k_bits, "k_group": p0.k_group, "ranks": [list(map(int, p.ranks)) for p in plans],
           "k_clip": p0.k_clip, "planes": None, **mode.config(plans)}
    if any(p.v_enc is not None or p.v_bits for p in plans):
        cfg.update(v_ranks=_one_or_list([p.v_rank for p in plans]), v_bits=p0.v_bits, v_group=p0.v_group,
                   v_window=_one_or_list([p.v_window for p in plans]), v_rotation=p0.v_rotation,
                   v_clip=p0.v_clip)
    return cfg
