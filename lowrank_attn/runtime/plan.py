"""``LayerPlan``: what one compressed layer keeps (its mode's name, ranks and maps, the cache settings and the
value side). Plain data: what a mode does with it is ``modes``; installing it is ``surgery``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerPlan:
    """What one layer keeps. Maps are (Hkv, r_max, d) float tensors; rows ≥ ranks[j] are zero."""

    mode: str
    ranks: list[int]
    q_map: torch.Tensor | None = None  # post-rope / bilinear
    k_map: torch.Tensor | None = None
    planes: torch.Tensor | None = None  # rope-pairs: (Hkv, r_max // 2) plane indices (long), padded with -1
    window: int = 0
    k_bits: int | None = None
    k_group: int = 32
    sink: int = 0  # the first `sink` positions' keys kept exact (attention sinks); not on sliding layers
    k_mean: torch.Tensor | None = None  # post-rope: (Hkv, d) key mean subtracted from every key before caching
    # the value side (``values``), whatever the mode: low-rank values (encoder (Hkv, r_v, d), decoder
    # (Hkv, d, r_v); None = values as they are) and/or KIVI-style quantised values (the last v_window exact)
    v_enc: torch.Tensor | None = None
    v_dec: torch.Tensor | None = None
    v_bits: int | None = None
    v_group: int = 32
    v_window: int = 0
    v_rotation: str = "none"  # the basis values are quantised in (``vrotation``): the maps carry it; for the card
    k_clip: str = "minmax"  # how quantised keys / values pick each group's range (``coded.CLIPS``)
    v_clip: str = "minmax"

    @property
    def v_rank(self) -> int | None:
        return None if self.v_enc is None else int(self.v_enc.shape[1])

    @property
    def r_max(self) -> int:
        return max(self.ranks)
