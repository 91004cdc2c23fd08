"""The compression modes, one object each (issue #11, runtime side): what a mode installs into an attention
module, how its forward gets the low-rank queries and keys, which keys its cache can keep exact, its per-head
maps, and what of it a checkpoint config stores.

  post-rope   q' = A_j q_rope, k' = B_j k_rope (A, B: (Hkv, r_max, d) buffers ``lowrank_q_map``/``lowrank_k_map``,
              post-projection on a layer without RoPE); the cache stores k' (r_max dims) and can keep the last
              ``window`` and first ``sink`` keys exact.
  bilinear    (no RoPE) A, B folded into the q/k projection weights and biases: the projections output r_max
              dims per head. Full keys never exist: no exact keys.
  rope-pairs  whole RoPE frequency planes kept per KV head: the q/k weight rows of the kept planes stay (r_max
              rows per head, buffer ``lowrank_dims``), cos/sin gathered to match. No exact keys.

``MODES`` maps a mode name (``LayerPlan.mode``) to its object; nothing else in the runtime, and nothing in the
compression pipeline, branches on the name: what the pipeline needs of a mode is a property here (whether it keeps
full keys, folds weights, needs or forbids RoPE, refuses a q/k norm, its rank step and own fit, ``check`` for the
model and recipe it refuses, ``new_plan`` for the plan it installs). A new mode is one class here plus its test.
"""

from __future__ import annotations

import torch

from .kernels import apply_rope, project, repeat_kv, rope_plane_dims, rotate_half
from .plan import LayerPlan
from .placement import execution_device


class Mode:
    name = ""
    keeps_full_keys = False  # cache layout: can keep exact (full, post-RoPE) keys — the window and sinks
    folds_weights = False  # installing changes the q/k projection weights (not possible on offloaded weights)
    needs_rope = False  # refuses a model without RoPE
    forbids_rope = False  # refuses a model with RoPE
    forbids_qk_norm = False  # refuses a model with a q/k norm after the projections
    rank_multiple = 1  # ranks come in multiples of this (rope-pairs: whole planes)
    fit: str | None = None  # the fit (``fits.FITS`` name) this mode always uses, whatever ``recipe.fit``
    hint = ""  # what to use instead, in refusals

    def check(self, layout, exact_window: int | None = None, exact_sink: int | None = None) -> str | None:
        """Why this mode cannot compress a model of ``layout`` with these exact-key counts, or None."""
        if self.forbids_rope and layout.has_rope:
            return (f"mode: {self.name} folds the maps into W_q/W_k, which is wrong under RoPE "
                    f"(a projection does not commute with the rotation); {self.hint}")
        if self.needs_rope and not layout.has_rope:
            return f"mode: {self.name} selects RoPE frequency planes, but this model has no RoPE; {self.hint}"
        if self.forbids_qk_norm and layout.has_qk_norm:
            return (f"mode: {self.name} cannot fold into W_q/W_k under a q/k norm (it needs the full head); "
                    f"use {DEFAULT_MODE}")
        for field, value, what in (("exact_window", exact_window, "window"), ("exact_sink", exact_sink, "sink keys")):
            if value and not self.keeps_full_keys:
                return (f"{field}: mode {self.name} drops the full keys, so no exact {what} can be kept; "
                        f"set {field}: 0 (or use {DEFAULT_MODE})")
        return None

    def new_plan(self, heads, ranks: list[int], *, head_dim: int, k_bits: int | None, k_group: int, window: int,
                 sink: int, k_mean: torch.Tensor | None) -> LayerPlan:
        """The plan of one layer from its per-KV-head fits (``heads[j].q_map``/``.k_map``: (d, d) rows in keep
        order; ``.planes``: plane order) at ``ranks``; ``window``/``sink``/``k_mean`` are dropped by a mode that
        keeps no full keys."""
        r_max = max(ranks)
        qm = torch.zeros(len(heads), r_max, head_dim, dtype=torch.float64)
        km = torch.zeros_like(qm)
        for j, head in enumerate(heads):
            qm[j, : ranks[j]] = torch.as_tensor(head.q_map[: ranks[j]])
            km[j, : ranks[j]] = torch.as_tensor(head.k_map[: ranks[j]])
        # at full rank (and unquantised) the stored keys are exact already: no exact copies
        exact = self.keeps_full_keys and (r_max < head_dim or bool(k_bits))
        return LayerPlan(mode=self.name, ranks=list(ranks), q_map=qm.float(), k_map=km.float(),
                         k_mean=k_mean if self.keeps_full_keys else None, window=window if exact else 0,
                         sink=sink if exact else 0, k_bits=k_bits, k_group=k_group)

    def install(self, attn, plan: LayerPlan, family) -> None:
        """Buffers and weight folds of ``plan`` on one attention module (device of its weights)."""
        raise NotImplementedError

    def qk(self, attn, family, plan: LayerPlan, hidden, rope):
        """hidden (B,S,D), rope (cos, sin) or None on a NoPE layer → q_low (B,H,S,r), k_low (B,Hkv,S,r),
        v (B,Hkv,S,dv), q_full (B,H,S,d) | None, k_full (B,Hkv,S,d) | None (full only where keys can stay exact)."""
        raise NotImplementedError

    def maps(self, plan: LayerPlan, j: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_map, k_map) of KV head j as (r_j, d) float64 matrices acting on post-RoPE q/k."""
        r = plan.ranks[j]
        return plan.q_map[j, :r].double(), plan.k_map[j, :r].double()

    def empty_plan(self, cfg: dict, layer: int, layout) -> LayerPlan:
        """The plan of ``layer`` from a checkpoint config, its tensors zero (the weights file fills them)."""
        ranks = list(cfg["ranks"][layer])
        shape = (layout.num_kv_heads, max(ranks), layout.head_dim)
        return LayerPlan(mode=self.name, ranks=ranks, q_map=torch.zeros(shape), k_map=torch.zeros(shape),
                         **_cache_fields(cfg, layer, self.keeps_full_keys))

    def config(self, plans: list[LayerPlan]) -> dict:
        """The mode's own fields of a checkpoint config (beyond mode, ranks and the cache settings)."""
        return {}


def per_layer(value, layer: int):
    """``layer``'s entry of a checkpoint-config field stored as one value for every layer or a list of one per layer."""
    return value[layer] if isinstance(value, list) else value


def layer_window(cfg: dict, layer: int) -> int:
    """The exact window of ``layer`` in a checkpoint config: one int for every layer, or one per layer."""
    return int(per_layer(cfg.get("window", 0), layer))


def layer_sink(cfg: dict, layer: int) -> int:
    """The exact sink keys of ``layer`` in a checkpoint config: one int for every layer, or one per layer (a layer
    at full rank with unquantised keys keeps none)."""
    return int(per_layer(cfg.get("sink", 0), layer))


def _cache_fields(cfg: dict, layer: int, keeps_full_keys: bool) -> dict:
    exact = dict(window=layer_window(cfg, layer), sink=layer_sink(cfg, layer)) if keeps_full_keys else dict(window=0, sink=0)
    return dict(k_bits=cfg["k_bits"], k_group=cfg["k_group"], **exact)


class PostRope(Mode):
    name = "post-rope"
    keeps_full_keys = True

    def install(self, attn, plan, family):
        dev = execution_device(attn)  # every map follows its layer (GPU, device_map; offloaded: where it computes)
        # maps kept float32 whatever the model dtype (tiny; see kernels.project)
        attn.register_buffer("lowrank_q_map", plan.q_map.to(device=dev, dtype=torch.float32).contiguous())
        attn.register_buffer("lowrank_k_map", plan.k_map.to(device=dev, dtype=torch.float32).contiguous())
        if plan.k_mean is not None and family.softcap(attn.layer_idx):
            # centring keys shifts each row's logits by a constant, which softmax ignores but a soft cap
            # (c·tanh(logit / c)) does not: soft-capped layers cache their keys as they are
            plan.k_mean = None
        k_mean = plan.k_mean if plan.k_mean is not None else plan.k_map.new_zeros(plan.k_map.shape[0], plan.k_map.shape[2])
        attn.register_buffer("lowrank_k_mean", k_mean.to(device=dev, dtype=torch.float32).contiguous())

    def qk(self, attn, family, plan, hidden, rope):
        q, k, v = family.qkv(attn, hidden)  # (B,H,S,d), (B,Hkv,S,d), (B,Hkv,S,dv)
        q_full, k_full = (apply_rope(q, *rope), apply_rope(k, *rope)) if rope is not None else (q, k)
        # Keys cached centred on the fit's mean key (zero where there is none): a constant key shifts every logit
        # of a row equally, which softmax ignores, so this is exact; without it the fit (on centred keys) would
        # shift projected logits against the exact window and sink keys by s·qᵀ(I − AᵀB)k̄ per row.
        k_full = k_full - attn.lowrank_k_mean[None, :, None, :].to(k_full.dtype)
        q_low = project(q_full, attn.lowrank_q_map, family.group_size)  # (B,H,S,r)
        k_low = project(k_full, attn.lowrank_k_map, 1)  # (B,Hkv,S,r)
        return q_low, k_low, v, q_full, k_full


class Bilinear(Mode):
    name = "bilinear"
    folds_weights = True
    forbids_rope = True
    hint = "use post-rope or rope-pairs"

    def install(self, attn, plan, family):
        family.fold_bilinear(attn, plan.q_map, plan.k_map)

    def qk(self, attn, family, plan, hidden, rope):
        q_low, k_low, v = family.qkv(attn, hidden, plan.r_max)  # the projections output r_max dims per head
        return q_low, k_low, v, None, None


class RopePairs(Mode):
    name = "rope-pairs"
    folds_weights = True
    needs_rope = True
    forbids_qk_norm = True
    rank_multiple = 2
    fit = "rope-planes"
    hint = "use bilinear"

    def new_plan(self, heads, ranks, *, head_dim, k_bits, k_group, window, sink, k_mean):
        planes = torch.full((len(heads), max(ranks) // 2), -1, dtype=torch.long)
        for j, head in enumerate(heads):
            planes[j, : ranks[j] // 2] = torch.as_tensor(head.planes[: ranks[j] // 2])
        return LayerPlan(mode=self.name, ranks=list(ranks), planes=planes, window=0, k_bits=k_bits, k_group=k_group)

    def install(self, attn, plan, family):
        d = family.head_dim
        dims = rope_plane_dims(plan.planes, d)  # (Hkv, r_max), -1 (and -1+d/2) = padding
        valid = plan.planes.ge(0).repeat(1, 2)
        dims = torch.where(valid, dims, torch.zeros_like(dims))
        family.select_qk_rows(attn, dims, valid)
        attn.register_buffer("lowrank_dims", dims.long().to(execution_device(attn)).contiguous())

    def qk(self, attn, family, plan, hidden, rope):
        q_low, k_low, v = family.qkv(attn, hidden, plan.r_max)  # (B,H,S,r), (B,Hkv,S,r), (B,Hkv,S,dv)
        if rope is not None:  # rotate the kept planes: cos/sin at their dims (a NoPE layer keeps them as they are)
            cos, sin = rope  # (B,S,d)
            b, s = hidden.shape[:2]
            idx = attn.lowrank_dims  # (Hkv, r) dims of the kept planes in rotate_half layout
            hkv, d = idx.shape[0], cos.shape[-1]
            gather = idx[None, :, None, :].expand(b, -1, s, -1)
            cos_k = cos[:, None, :, :].expand(b, hkv, s, d).gather(-1, gather)  # (B,Hkv,S,r)
            sin_k = sin[:, None, :, :].expand(b, hkv, s, d).gather(-1, gather)
            groups = family.group_size
            cos_q, sin_q = repeat_kv(cos_k, groups), repeat_kv(sin_k, groups)
            q_low = q_low * cos_q + rotate_half(q_low) * sin_q
            k_low = k_low * cos_k + rotate_half(k_low) * sin_k
        return q_low, k_low, v, None, None

    def maps(self, plan, j, head_dim):
        r = plan.ranks[j]
        dims = rope_plane_dims(plan.planes[j : j + 1, : r // 2], head_dim)[0]
        sel = torch.zeros(r, head_dim, dtype=torch.float64)
        sel[torch.arange(r), dims] = 1.0
        return sel, sel

    def empty_plan(self, cfg, layer, layout):
        return LayerPlan(mode=self.name, ranks=list(cfg["ranks"][layer]),
                         planes=torch.tensor(cfg["planes"][layer], dtype=torch.long), **_cache_fields(cfg, layer, False))

    def config(self, plans):
        return {"planes": [p.planes.tolist() for p in plans]}


MODES: dict[str, Mode] = {m.name: m for m in (PostRope(), RopePairs(), Bilinear())}
DEFAULT_MODE = PostRope.name  # what recipe mode "auto" means, for every family: the one that keeps exact keys


def mode_of(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; known: {', '.join(MODES)}")
    return MODES[name]


def head_maps(plan: LayerPlan, j: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_map, k_map) of KV head j of ``plan`` as (r_j, d) float64 matrices acting on post-RoPE q/k, whatever
    the mode (rope-pairs: row selections of the kept planes' dims)."""
    return mode_of(plan.mode).maps(plan, j, head_dim)
