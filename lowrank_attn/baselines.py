"""Pure math: the baseline query/key maps, in the same (q_map, k_map, energy) form as the fit,
so every method runs through the same attention, cache, certificate and evaluation.

* weight-svd  data-free: the closed form with G_q = W_q W_q^T, G_k = W_k W_k^T (isotropic
              inputs), whose spectrum is that of W_Q^T W_K — the optimal rank-r approximation of
              the weights' interaction. On RoPE models compress() folds it per query head into
              W_q before RoPE (as published; see fits._fold_weight_svd); without
              RoPE it is a bilinear map like ours;
* key-pca     Loki / Eigen-Attention style: the top principal directions of the keys,
              the same orthonormal basis for queries and keys;
* think       ThinK-style channel pruning: keep the channels with the largest
              ‖Q_c‖·‖K_c‖ (query·key magnitude), drop the rest;
* palu        (fits.palu) key-pca of the keys *before* RoPE: a rank-r latent per KV head, folded into
              W_k (keys reconstructed, then rotated), as Palu caches latents;
K-cache quantisation alone (KIVI-style) is full rank with ``k_bits`` set: no maps needed.
Each returns maps with rows in keep order; the first r rows are the rank-r method.
"""

from __future__ import annotations

import numpy as np

from .fit import canonical_basis, fit_head


def weight_svd(wq_group: np.ndarray, wk: np.ndarray, scale: float = 1.0):
    """wq_group: (g·d, D) the group's query weights stacked; wk: (d, D)."""
    d = wk.shape[0]
    g = wq_group.shape[0] // d
    gq = sum(wq_group[h * d : (h + 1) * d] @ wq_group[h * d : (h + 1) * d].T for h in range(g))
    hf = fit_head(gq, wk @ wk.T, scale=scale, ridge=1e-9)
    return hf.q_map, hf.k_map, hf.eigvals


def key_pca(skk: np.ndarray):
    """skk: (d, d) uncentred key second moment → (P^T, P^T, eigenvalues)."""
    lam, u = canonical_basis(*np.linalg.eigh((skk + skk.T) / 2))  # descending, signs canonical
    p_t = u.T
    return p_t, p_t.copy(), np.clip(lam, 0.0, None)


def think(gq: np.ndarray, gk_raw: np.ndarray):
    """Channel selection by sqrt(G_q[c,c]·G_k[c,c]) (diagonals of the query/key second moments)."""
    score = np.sqrt(np.clip(np.diag(gq), 0, None) * np.clip(np.diag(gk_raw), 0, None))
    energy, sel_t = canonical_basis(score**2, np.eye(len(score)))  # descending score, ties by channel index
    sel = np.ascontiguousarray(sel_t.T)
    return sel, sel.copy(), energy
