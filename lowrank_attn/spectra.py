"""Pure math: spectra of the row-centred logit field E~ and of W_Q^T W_K, and rank measures.

No torch.nn, no I/O. Everything in float64 numpy.

For queries Q (n×d) and keys K (n×d) entering the dot product, logits are
L = s·Q K^T with s the model's score scale (1/sqrt(d_h) for most models).
Row-centring L (removing each query row's mean) equals centring the keys:
E~ = s·Q K_c^T. Its squared singular values are the eigenvalues of
s²·G_k^{1/2} G_q G_k^{1/2} with G_q = Q^T Q and G_k = K_c^T K_c (d×d), so the
n×n matrix is never built (DESIGN §2).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@contextmanager
def single_threaded_blas():
    """Run numpy's BLAS/LAPACK on one thread (also usable as a decorator).

    The decompositions here are small (d×d, D×d); threads only add synchronisation, and
    on a busy machine (torch's threads on every core) OpenBLAS's waiting threads made a
    576×64 QR 30–200× slower than single-threaded (measured: 70–450 ms vs 1.7 ms).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (ships with scikit-learn); without it, numpy's default
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def psd_sqrt(g: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clipped)."""
    lam, u = np.linalg.eigh((g + g.T) / 2)
    return (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T


def logit_field_sv2(gq: np.ndarray, gk: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Squared singular values (descending) of E~ = scale·Q K_c^T from its Grams (d×d each)."""
    r = psd_sqrt(gk)
    m = r @ gq @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)[::-1]
    return np.clip(ev, 0.0, None) * scale**2


def explicit_logit_field_sv2(q: np.ndarray, k: np.ndarray, scale: float = 1.0, causal: bool = False) -> np.ndarray:
    """Reference: squared singular values of the explicitly built row-centred logit field.

    q: (n, d), k: (m, d). ``causal=True`` centres each row over its valid prefix
    (keys j <= i, with m == n) and zeroes the masked entries.
    """
    logits = scale * (q @ k.T)  # (n, m)
    if causal:
        n = logits.shape[0]
        valid = np.tril(np.ones((n, n), dtype=bool))
        means = (logits * valid).sum(1, keepdims=True) / valid.sum(1, keepdims=True)
        field = np.where(valid, logits - means, 0.0)
    else:
        field = logits - logits.mean(1, keepdims=True)
    s = np.linalg.svd(field, compute_uv=False)
    return s**2


def weight_sv2(wq: np.ndarray, wk: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Squared singular values of scale·W_q^T W_k (D×D, rank ≤ d) via QR, without the D×D matrix.

    wq: (g·d, D) — one query head (g=1) or a GQA group stacked; wk: (d, D).
    For a stacked group this is the spectrum of [W_q1^T W_k; …; W_qg^T W_k]
    (every query head's interaction with the shared key head), matching a
    logit field whose rows are the queries of all heads in the group.
    """
    d = wk.shape[0]
    g = wq.shape[0] // d
    _, rk = np.linalg.qr(wk.T)  # wk^T = Qk Rk, rk: (d, d)
    blocks = []
    for h in range(g):
        _, rq = np.linalg.qr(wq[h * d : (h + 1) * d].T)
        blocks.append(rq @ rk.T)
    s = np.linalg.svd(np.concatenate(blocks, axis=0), compute_uv=False)
    return s**2 * scale**2


@dataclass(frozen=True)
class RankMeasures:
    r90: int
    r99: int
    entropy_rank: float  # exp(Shannon entropy of sigma/sum(sigma))  (Roy & Vetterli)
    stable_rank: float  # sum(sigma^2) / max(sigma^2)


def energy(sv2: np.ndarray) -> np.ndarray:
    """Normalised energy spectrum (sums to 1). All-zero input gives all zeros."""
    sv2 = np.clip(np.asarray(sv2, dtype=np.float64), 0.0, None)
    total = sv2.sum()
    return sv2 / total if total > 0 else np.zeros_like(sv2)


def rank_for_energy(sv2: np.ndarray, tau: float) -> int:
    """Smallest r whose leading r components keep at least tau of the energy."""
    e = energy(sv2)
    if e.sum() == 0:
        return 0
    c = np.cumsum(e)
    return int(min(np.searchsorted(c, tau - 1e-12) + 1, len(e)))


def rank_measures(sv2: np.ndarray) -> RankMeasures:
    sv2 = np.clip(np.asarray(sv2, dtype=np.float64), 0.0, None)
    if sv2.sum() <= 0:
        return RankMeasures(0, 0, 0.0, 0.0)
    s = np.sqrt(sv2)
    p = s / s.sum()
    p = p[p > 0]
    return RankMeasures(
        r90=rank_for_energy(sv2, 0.90),
        r99=rank_for_energy(sv2, 0.99),
        entropy_rank=float(np.exp(-(p * np.log(p)).sum())),
        stable_rank=float(sv2.sum() / sv2.max()),
    )
