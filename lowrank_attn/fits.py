"""Fits: how a method turns one layer's calibration statistics into ranked per-KV-head maps — ours and each
baseline is one function, registered by name (``recipe.fit``); ``fit_all`` is the one entry.

    fits = fit_all(stats, layout, mode, recipe, model)   # per layer, per KV head: HeadMaps(q_map, k_map, energy, planes)

Each map's rows are in keep order (the first r rows are the rank-r method), ``energy`` (d,) the logit
energy per component (what the energy signal allocates by), ``planes`` the RoPE planes (rope-pairs) or None.
A mode may impose its own fit (``runtime.modes.Mode.fit``: rope-pairs uses ``rope-planes``); fits registered
with ``choosable=False`` are such mode fits, not a ``recipe.fit`` choice; ``baseline=True`` marks the published
methods a sweep compares against. A new fit or baseline is one function here (``@register``) plus its test:
recipe validation, the CLI help and the sweep's methods read ``FITS``.

Fits whose method changes the weights before RoPE (``Fit.fold``: weight-svd on RoPE models, palu) are
installed by folding, not by post-RoPE maps: logits change through the weights, the model's K cache keeps
full keys (fidelity baselines, not checkpoints). ``Fit.pre_rope_keys``: the fit needs the second moments of
the keys before RoPE, gathered by one more pass over the calibration windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch

from . import baselines, fit as fitmod
from .calibrate import FitStats
from .errors import RecipeError
from .runtime import adapters
from .runtime.modes import mode_of

if TYPE_CHECKING:
    from .recipe import Recipe


@dataclass
class LayerInputs:
    """What a fit may read for one layer."""

    stats: FitStats
    layer: int
    layout: adapters.HeadLayout
    recipe: Recipe
    model: torch.nn.Module
    pre_rope: np.ndarray | None = None  # (Hkv, d, d) key second moments before RoPE, for fits that ask

    @cached_property
    def gk(self) -> np.ndarray:  # (Hkv, d, d) centred (attention-weighted) key Grams
        return self.stats.key_gram_centred(self.layer)

    def gq(self, j: int) -> np.ndarray:  # (d, d) the query Gram of KV head j's group
        return self.stats.query_gram_group(self.layer, j)

    @property
    def scale(self) -> float:
        return float(self.stats.scale[self.layer])

    @cached_property
    def weights(self) -> tuple[np.ndarray, np.ndarray]:  # (H·d, D), (Hkv·d, D) float64
        return tuple(w.detach().double().cpu().numpy() for w in adapters.qk_weights(self.model, self.layer))


class HeadMaps(NamedTuple):
    """One KV head's fit: maps with rows in keep order (the first r rows are the rank-r method)."""

    q_map: np.ndarray  # (d, d)
    k_map: np.ndarray  # (d, d)
    energy: np.ndarray  # (d,) logit energy per component
    planes: np.ndarray | None = None  # rope-planes: RoPE plane indices in keep order


@dataclass(frozen=True)
class Fit:
    name: str
    head: Callable[[LayerInputs, int], HeadMaps]  # one KV head's maps
    fold: Callable | None = None  # fold(model, layer, row, layer_ranks, layout): install before RoPE
    pre_rope_keys: bool = False
    check: Callable[[adapters.HeadLayout], None] | None = None  # refuses a model the fit cannot take
    baseline: bool = False  # a published method the sweep compares against (``sweep.METHODS``)
    choosable: bool = True  # a ``recipe.fit`` value (False: a mode's own fit, ``Mode.fit``)

    def check_model(self, layout: adapters.HeadLayout) -> None:
        """Refuse a model this fit cannot take (RecipeError, one line)."""
        if self.check is not None:
            self.check(layout)


FITS: dict[str, Fit] = {}


def register(name: str, *, fold: Callable | None = None, pre_rope_keys: bool = False, check: Callable | None = None,
             baseline: bool = False, choosable: bool = True):
    def deco(fn):
        FITS[name] = Fit(name, fn, fold, pre_rope_keys, check, baseline, choosable)
        return fn
    return deco


def fit_names() -> tuple[str, ...]:
    """The values ``recipe.fit`` takes."""
    return tuple(name for name, f in FITS.items() if f.choosable)


def fit_all(stats: FitStats, layout: adapters.HeadLayout, mode: str, recipe: Recipe, model,
            pre_rope: np.ndarray | None = None) -> list[list[HeadMaps]]:
    """Per layer, per KV head, the fit of ``recipe.fit`` (or the mode's own, ``Mode.fit``: rope-pairs' plane
    order, whatever the fit). ``pre_rope``: (L, Hkv, d, d) key moments before RoPE, for fits that need them."""
    fit = FITS[mode_of(mode).fit or recipe.fit]
    out = []
    for layer in range(layout.num_layers):
        li = LayerInputs(stats, layer, layout, recipe, model, None if pre_rope is None else pre_rope[layer])
        out.append([HeadMaps(*fit.head(li, j)) for j in range(layout.num_kv_heads)])
    return out


# ---------------------------------------------------------------- ours


@register("closed-form")
def closed_form(li: LayerInputs, j: int) -> HeadMaps:
    hf = fitmod.fit_head(li.gq(j), li.gk[j], scale=li.scale, ridge=li.recipe.ridge)
    return HeadMaps(hf.q_map, hf.k_map, hf.eigvals, None)


@register("rope-planes", choosable=False)
def rope_planes(li: LayerInputs, j: int) -> HeadMaps:
    """Whole RoPE planes (dims p, p+d/2), most important first (the rope-pairs mode's fit)."""
    d = li.layout.head_dim
    order, costs = plane_order(li.gq(j), li.gk[j])
    perm = np.stack([np.array(order), np.array(order) + d // 2], 1).reshape(-1)
    sel = np.eye(d)[perm]  # components in keep order: plane i → dims order[i], order[i]+d/2
    return HeadMaps(sel, sel, np.repeat(costs / 2, 2) * li.scale**2, np.array(order))


def plane_order(gq: np.ndarray, gk: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Greedy backward elimination of RoPE planes (dims p, p+d/2) on the quadratic logit error.

    Returns planes in keep order (most important first) and each plane's marginal error
    (the error added when it is dropped; aligned with the keep order)."""
    d = gq.shape[0]
    half = d // 2
    kept = list(range(half))
    dropped, costs = [], []

    def err(planes):
        if not planes:
            return 0.0
        idx = np.array(planes + [p + half for p in planes])
        return float(np.trace(gq[np.ix_(idx, idx)] @ gk[np.ix_(idx, idx)]))

    current = 0.0
    while kept:
        best = min(kept, key=lambda p: err(dropped + [p]))
        new = err(dropped + [best])
        costs.append(max(new - current, 0.0))
        current = new
        dropped.append(best)
        kept.remove(best)
    order = dropped[::-1]
    return order, np.array(costs[::-1])


# ---------------------------------------------------------------- baselines (lowrank_attn.baselines: the math)


@register("key-pca", baseline=True)
def key_pca(li: LayerInputs, j: int) -> HeadMaps:
    return HeadMaps(*baselines.key_pca(li.stats.skk[li.layer, j]), None)


@register("think", baseline=True)
def think(li: LayerInputs, j: int) -> HeadMaps:
    return HeadMaps(*baselines.think(li.gq(j), li.stats.skk[li.layer, j]), None)


def _fold_weight_svd(model, layer: int, row, layer_ranks, layout) -> None:
    """Per query head, the best rank-r approximation of W_q,h^T W_k (the data-free closed form with isotropic
    inputs) folded into W_q,h before RoPE, as published for RoPE models."""
    d, g = layout.head_dim, layout.group_size
    wq, wk = (w.detach().double().cpu().numpy() for w in adapters.qk_weights(model, layer))
    maps = []
    for h in range(layout.num_heads):
        j, r = h // g, layer_ranks[h // g]
        qm, km, _ = baselines.weight_svd(wq[h * d : (h + 1) * d], wk[j * d : (j + 1) * d])
        maps.append(torch.as_tensor(qm[:r].T @ km[:r]))  # (d, d), rank r: logits q^T M k
    adapters.fold_query_interaction(adapters.attention_modules(model)[layer], torch.stack(maps), layout)


@register("weight-svd", fold=_fold_weight_svd, baseline=True)
def weight_svd(li: LayerInputs, j: int) -> HeadMaps:
    d, g = li.layout.head_dim, li.layout.group_size
    wq, wk = li.weights
    qm, km, ev = baselines.weight_svd(wq[j * g * d : (j + 1) * g * d], wk[j * d : (j + 1) * d], li.scale)
    return HeadMaps(qm, km, ev, None)


def _fold_palu(model, layer: int, row, layer_ranks, layout) -> None:
    """Keys through their rank-r pre-RoPE latent: W_k,j ← U_r U_rᵀ W_k,j (and the bias), so each key is
    reconstructed from r numbers and then rotated, as a Palu cache of latents does at attention time."""
    d = layout.head_dim
    family = adapters.adapter(model)
    attn = family.attention_modules()[layer]
    (wq, bq), (wk, bk) = family.q_weight_bias(attn), family.k_weight_bias(attn)
    proj = torch.zeros(len(row) * d, len(row) * d, dtype=torch.float64)
    for j, (head, r) in enumerate(zip(row, layer_ranks)):
        u = torch.as_tensor(head.k_map[:r])  # (r, d) orthonormal rows: the top-r principal directions
        proj[j * d : (j + 1) * d, j * d : (j + 1) * d] = u.T @ u
    with torch.no_grad():
        new_k = ((proj @ wk.double()).to(wk), None if bk is None else (proj @ bk.double()).to(bk))
        family.set_qk(attn, (wq.detach().clone(), None if bq is None else bq.detach().clone()), new_k)


def _palu_model(layout: adapters.HeadLayout) -> None:
    if layout.has_qk_norm:
        raise RecipeError("fit: palu folds its key latent into W_k, but this model normalises each key after the "
                          "projection (q/k norm); use another baseline")
    if not layout.has_rope:
        raise RecipeError("fit: palu is a pre-RoPE latent and this model has no RoPE; use key-pca")


@register("palu", fold=_fold_palu, pre_rope_keys=True, check=_palu_model, baseline=True)
def palu(li: LayerInputs, j: int) -> HeadMaps:
    """Palu-style low-rank key latent: the principal directions of the keys before RoPE (data-aware SVD of
    W_k), the latent cached before RoPE and keys reconstructed then rotated. Energies: the key variance."""
    if li.pre_rope is None:
        raise RecipeError("fit: palu needs the pre-RoPE key moments (compress gathers them)")
    u, _, lam = baselines.key_pca(li.pre_rope[j])
    return HeadMaps(u, u.copy(), lam, None)
