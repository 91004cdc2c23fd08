"""From fits and ranks to layer plans: what ``compress`` installs and what the allocation policies measure.

``build_plans`` turns per-head fits (``fits.HeadMaps``) at chosen ranks into ``runtime.plan.LayerPlan`` s, each
through its mode's ``new_plan``; ``exact_windows``/``layer_windows`` say how many recent keys a layer keeps exact.
Used by ``compression`` (the pipeline) and ``policies`` (which measures the plans it would install), so neither
imports the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .runtime.modes import mode_of
from .runtime.plan import LayerPlan

if TYPE_CHECKING:
    from .recipe import Recipe

EXACT_SHARE = 8  # at most 1/8 of the keys a layer sees exact: of a sliding window, of the calibration window if unset


def exact_windows(window: int, slidings) -> list[int]:
    """Per layer, the most recent keys kept exact: ``window`` on full-attention layers, at most 1/8 of the
    window on a sliding-window layer (its whole cache is its window: 256 exact keys of Gemma-3's 512 keep half
    of it exact, worse per byte than rank; eval/results/targets/ab)."""
    return [min(window, s // EXACT_SHARE) if s else window for s in slidings]


def layer_windows(mode: str, window: int, slidings) -> list[int]:
    """Per layer, the exact recent keys the plans of ``mode`` keep: ``exact_windows``, or none where the mode
    keeps no full keys."""
    slidings = list(slidings)
    return exact_windows(window, slidings) if mode_of(mode).keeps_full_keys else [0] * len(slidings)


def build_plans(fits, ranks, recipe: Recipe, mode: str, layout, k_means=None, windows=None) -> list[LayerPlan]:
    """Per layer, the plan of ``ranks``; ``k_means`` (per layer (Hkv, d)): keys cached centred (modes that keep
    full keys); ``windows``: per layer, the exact recent keys (``exact_windows``; default ``recipe.exact_window``
    everywhere)."""
    windows = windows or [recipe.exact_window] * len(fits)
    m = mode_of(mode)
    plans = []
    for layer, (row, layer_ranks) in enumerate(zip(fits, ranks)):
        k_mean = None if k_means is None or k_means[layer] is None else torch.as_tensor(k_means[layer]).float()
        plans.append(m.new_plan(row, list(layer_ranks), head_dim=layout.head_dim, k_bits=recipe.k_bits,
                                k_group=recipe.k_group, window=windows[layer], sink=recipe.exact_sink, k_mean=k_mean))
        plans[-1].k_clip = recipe.k_clip
    return plans
