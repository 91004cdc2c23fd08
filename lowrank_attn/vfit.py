"""Pure math: the closed-form low-rank value map and the value-rank allocation (the value side of DESIGN §12).

A KV head's values v (d) are averaged by each query head h of its group into an output o_h = Σ_j p_hj v_j,
which ``o_proj`` sees through its d_model×d slice W_h. A rank-r map applied to the values is the same map
applied to every o_h (attention is linear in the values), so what it loses is Σ_h ‖W_h (o_h − ô_h)‖². With

    M  = Σ_h W_hᵀ W_h                           # d × d, what o_proj can see of this KV head
    Σ_o = mean_h Σ_tokens o_h o_hᵀ              # d × d, the group's attention outputs (averaged over its heads)
    S  = M^{1/2} Σ_o M^{1/2} = U diag(λ) Uᵀ      # λ descending

the encoder E = U_rᵀ M^{1/2} (r × d, what the cache stores: v' = E v) and decoder D = M^{-1/2} U_r (d × r, in
front of o_proj: ô = D o') keep Σ_{i≤r} λ_i and lose exactly Σ_{i>r} λ_i of the output energy Σ_h ‖W_h o_h‖² when the
group's heads share one output distribution (always for multi-head attention, g = 1); for a GQA group it is the
closed form of that assumption, the heads' own Grams averaged. At r = d, D E = I.
M is regularised by a ridge relative to its mean eigenvalue (a head o_proj ignores in some direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fit import canonical_basis, round_rank


@dataclass(frozen=True)
class ValueFit:
    enc: np.ndarray  # (d, d): rows ordered by kept output energy; the first r rows encode values to rank r
    dec: np.ndarray  # (d, d): matching columns decode (o ≈ dec[:, :r] @ enc[:r] o)
    eigvals: np.ndarray  # (d,) descending: output energy per component

    def retained(self, rank: int) -> float:
        total = float(self.eigvals.sum())
        return 1.0 if total <= 0 else float(self.eigvals[:rank].sum()) / total


def _eig_desc(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, u = canonical_basis(*np.linalg.eigh((s + s.T) / 2))  # descending, signs fixed (same bytes anywhere)
    return np.clip(lam, 0.0, None), u


def fit_value_head(go: np.ndarray, m: np.ndarray, *, ridge: float = 1e-6) -> ValueFit:
    """go: (d, d) output Gram of the KV head's group (mean over its heads); m: (d, d) Σ_h W_hᵀ W_h of its o_proj
    slices."""
    d = m.shape[0]
    m = (m + m.T) / 2
    mean_eig = max(float(np.trace(m)) / d, 1e-30)
    lam_m, u_m = np.linalg.eigh(m + ridge * mean_eig * np.eye(d))
    lam_m = np.clip(lam_m, 1e-12 * mean_eig, None)
    half = (u_m * np.sqrt(lam_m)) @ u_m.T
    inv_half = (u_m / np.sqrt(lam_m)) @ u_m.T
    lam, u = _eig_desc(half @ go @ half)
    return ValueFit(enc=u.T @ half, dec=inv_half @ u, eigvals=lam)


def allocate_value_ranks(eigvals: list[np.ndarray], ratio: float, *, granularity: int = 8,
                         min_rank: int | None = None, weights: list[float] | None = None) -> list[int]:
    """One value rank per layer (every KV head of a layer stores the same number of values per token, so a
    cache holds no padding), from a global budget ratio·Σ_layers d: greedily add ``granularity`` components to the
    layer whose next block keeps the most output energy summed over its heads, times the layer's ``weights``
    (default 1). ``eigvals[l]``: (Hkv, d)."""
    d = eigvals[0].shape[-1]
    lo = round_rank(min_rank or granularity, granularity, 1, d)
    ranks = [lo] * len(eigvals)
    budget = ratio * d * len(eigvals) + 1e-9
    used = sum(ranks)
    w = weights or [1.0] * len(eigvals)
    gains = [wl * lam.sum(axis=0) for wl, lam in zip(w, eigvals)]  # (d,) per layer: (weighted) energy of component i
    while True:
        best, best_gain = None, -1.0
        for layer, r in enumerate(ranks):
            step = min(granularity, d - r)
            if step and used + step <= budget:
                g = float(gains[layer][r : r + step].sum())
                if g > best_gain:
                    best, best_gain = layer, g
        if best is None:
            return ranks
        step = min(granularity, d - ranks[best])
        ranks[best] += step
        used += step
