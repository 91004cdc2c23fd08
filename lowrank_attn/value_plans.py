"""The value side of ``compress``: fit the value maps from the calibration statistics, choose a rank per layer,
and set them (with value quantisation) on the layer plans. Orchestration only: the math is ``vfit``, the
runtime is ``runtime.values`` and the cache ``runtime.kcache``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import RecipeError
from .plans import EXACT_SHARE, exact_windows
from .recipe import Recipe
from .runtime import adapters
from .runtime.plan import LayerPlan
from .vfit import ValueFit, allocate_value_ranks, fit_value_head
from .vrotation import ROTATIONS, value_maps

VALUE_GRANULARITY = 8  # value ranks are multiples of 8: whole bytes of bit-packed codes per channel group
DEFAULT_VALUE_WINDOW = 256  # unquantised recent values at 16 bits; scaled by v_bits/16 (4 bits: 64), as keys


def value_windows(recipe: Recipe, slidings, seq_len: int) -> list[int]:
    """Per layer, the most recent values kept unquantised: ``v_window``, or by default 256·v_bits/16 (at most
    seq_len/8), at most 1/8 of a sliding window (the same rule as the exact keys)."""
    if not recipe.v_bits:
        return [0] * len(slidings)
    window = recipe.v_window
    if window is None:
        window = min(DEFAULT_VALUE_WINDOW * recipe.v_bits // 16, seq_len // EXACT_SHARE)
    return exact_windows(window, slidings)


def fit_values(stats, model, layout: adapters.HeadLayout, ridge: float) -> list[list[ValueFit]]:
    """Per layer and KV head, the closed-form value map (``vfit``) from the attention-output Grams of the
    calibration pass and the layer's output projection."""
    d, g = layout.head_dim, layout.group_size
    fits = []
    for layer in range(layout.num_layers):
        w = adapters.o_weight(model, layer).double().cpu().numpy()  # (D, H·d)
        row = []
        for j in range(layout.num_kv_heads):
            m = sum(w[:, h * d : (h + 1) * d].T @ w[:, h * d : (h + 1) * d] for h in range(j * g, (j + 1) * g))
            row.append(fit_value_head(stats.output_gram_group(layer, j), m, ridge=ridge))
        fits.append(row)
    return fits


def value_ranks(fits: list[list[ValueFit]], recipe: Recipe, head_dim: int, resid_sq: dict | None = None) -> list[int]:
    """One value rank per layer. Each layer's output energy is weighed against the residual stream it is added to
    (``resid_sq``: median ‖h‖² entering each layer, from the held-out sample; measured on SmolLM2 slightly better
    than weighing by the layer's own energy, eval/results/kv/NOTES.md); unweighted without a held-out sample."""
    if recipe.v_rank_ratio >= 1:
        return [head_dim] * len(fits)
    if head_dim % VALUE_GRANULARITY:
        raise RecipeError(f"v_rank_ratio: value ranks are multiples of {VALUE_GRANULARITY}, and head_dim {head_dim} "
                          "is not; use v_rank_ratio 1.0")
    eig = [np.stack([f.eigvals for f in row]) for row in fits]  # per layer (Hkv, d)
    n = len(eig)
    weights = [1.0 / max(resid_sq.get(min(i + 1, n - 1), resid_sq.get(i, 1.0)), 1e-300) for i in range(n)] \
        if resid_sq else None
    return allocate_value_ranks(eig, recipe.v_rank_ratio, granularity=VALUE_GRANULARITY, weights=weights)


def attach(plans: list[LayerPlan], fits, ranks: list[int], recipe: Recipe, windows: list[int], head_dim: int) -> None:
    """Set each plan's value side: maps where the layer keeps fewer than head_dim values or quantised values are
    rotated (``vrotation``), and quantisation. ``fits`` None: no value fit (full rank, a data-free rotation)."""
    rotation = recipe.v_rotation if recipe.v_bits else "none"  # a rotation only helps a quantiser
    for plan, row, r, window in zip(plans, fits or [None] * len(plans), ranks, windows):
        maps = [value_maps(rotation, f, r, head_dim) for f in (row or [None] * len(plan.ranks))]
        plan.v_enc = plan.v_dec = None
        if maps[0] is not None:
            plan.v_enc = torch.from_numpy(np.stack([enc for enc, _ in maps])).float()  # (Hkv, r, d)
            plan.v_dec = torch.from_numpy(np.stack([dec for _, dec in maps])).float()  # (Hkv, d, r)
        plan.v_bits, plan.v_group, plan.v_window = recipe.v_bits, recipe.v_group, window
        plan.v_rotation, plan.v_clip = rotation, recipe.v_clip


@dataclass
class ValueSide:
    """The value side of a compression, fitted once: maps (``fits`` None: values keep every dim) and ranks per
    layer; ``attach`` sets it on a set of plans for a recipe's value width (the fidelity policy tries several)."""

    fits: list | None
    ranks: list[int]
    slidings: list
    seq_len: int
    head_dim: int

    def windows(self, recipe: Recipe) -> list[int]:
        return value_windows(recipe, self.slidings, self.seq_len)

    def attach(self, plans: list[LayerPlan], recipe: Recipe) -> None:
        attach(plans, self.fits, self.ranks, recipe, self.windows(recipe), self.head_dim)


def fit_value_side(stats, model, layout: adapters.HeadLayout, recipe: Recipe, slidings, seq_len: int,
                   resid_sq: dict | None = None) -> ValueSide:
    """Value maps and ranks, for every value width the recipe allows: fitted when ``v_rank_ratio`` < 1 or the
    value rotation works in the fitted output basis (else none)."""
    needs_fit = recipe.v_rank_ratio < 1 or (ROTATIONS[recipe.v_rotation].needs_fit and any(recipe.value_bit_options))
    fits = fit_values(stats, model, layout, recipe.ridge) if needs_fit else None
    ranks = value_ranks(fits, recipe, layout.head_dim, resid_sq) if fits else [layout.head_dim] * layout.num_layers
    return ValueSide(fits, ranks, list(slidings), seq_len, layout.head_dim)


def report_layer(row: list[ValueFit] | None, rank: int, window: int) -> dict:
    """The value side of one layer in the compression report (``row`` None: values not projected)."""
    out = {"v_rank": rank, "v_window": window}
    if row is not None and rank < len(row[0].eigvals):  # a fit at full rank only rotates
        out["v_retained_energy"] = [round(f.retained(rank), 6) for f in row]
    return out
