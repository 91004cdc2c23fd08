"""Deterministic fits: eigenvector signs (and the order of equal eigenvalues) depend on the BLAS/LAPACK build
and thread count, so every decomposition that produces a map is put in one canonical form
(``fit.canonical_basis``). The float32 maps that go into a checkpoint are then byte-identical under other
thread counts (torch and numpy's BLAS), for Grams scaled by a constant (the token count), and when the
solver returns an eigenvector with the other sign. Every assertion compares this process's results with
themselves, never with stored bytes, so it holds whatever BLAS or thread count the machine has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_attn import baselines, fits
from lowrank_attn.calibrate import FitStats
from lowrank_attn.plans import build_plans
from lowrank_attn.fit import canonical_basis, fit_head
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime.adapters import HeadLayout

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS, HEADS, KV_HEADS, D, D_MODEL = 2, 4, 2, 64, 96  # d = 64: a real head size, large enough for BLAS to thread
FITS = ("closed-form", "key-pca", "think")
LAYOUT = HeadLayout(num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=D, hidden_size=D_MODEL,
                    has_rope=True, has_qk_norm=False, has_qk_bias=False, max_positions=2048)


def _stats(factor: float = 1.0, seed: int = 0) -> FitStats:
    """Second moments of anisotropic random queries/keys (keys with a mean), every sum times ``factor``."""
    rng = np.random.default_rng(seed)
    st = FitStats(LAYERS, HEADS, KV_HEADS, D)
    n = 300
    for layer in range(LAYERS):
        x = rng.standard_normal((n, D_MODEL)) * np.exp(rng.uniform(-2, 1, D_MODEL))
        for h in range(HEADS):
            q = x @ rng.standard_normal((D_MODEL, D))
            st.gq[layer, h] = q.T @ q
        for j in range(KV_HEADS):
            k = x @ rng.standard_normal((D_MODEL, D)) + rng.standard_normal(D)
            st.skk[layer, j], st.sk[layer, j], st.sa[layer, j] = k.T @ k, k.sum(0), n
    st.gq, st.skk, st.sk, st.sa = (a * factor for a in (st.gq, st.skk, st.sk, st.sa))
    st.scale[:] = D**-0.5
    st.tokens = n
    return st


def _weights(seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2 * D, D_MODEL)), rng.standard_normal((D, D_MODEL))


def checkpoint_maps(factor: float = 1.0) -> dict[str, np.ndarray]:
    """The float32 maps a checkpoint would hold, for each fit (through ``fits.fit_all`` and ``build_plans``),
    plus the weight-SVD baseline's; keys name the fit, layer and map."""
    stats, out = _stats(factor), {}
    for name in FITS:
        recipe = Recipe(fit=name, exact_window=0, exact_sink=0)
        row = fits.fit_all(stats, LAYOUT, "post-rope", recipe, None)
        plans = build_plans(row, [[D] * KV_HEADS] * LAYERS, recipe, "post-rope", LAYOUT)
        for layer, plan in enumerate(plans):
            out[f"{name}/{layer}/q"] = plan.q_map.numpy()
            out[f"{name}/{layer}/k"] = plan.k_map.numpy()
    qm, km, _ = baselines.weight_svd(*_weights())
    out["weight-svd/q"], out["weight-svd/k"] = (torch.as_tensor(m).float().numpy() for m in (qm, km))
    assert all(m.dtype == np.float32 for m in out.values())
    return out


def _assert_bytewise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not bad, f"{what}: maps differ bytewise: {bad}"


# ---------------------------------------------------------------- canonical_basis (pure)


def test_canonical_basis_order_and_signs():
    vals = np.array([1.0, 3.0, 3.0, 0.5])
    vecs = np.array([[0.6, -0.5, 0.0, 0.0],
                     [-0.8, 0.5, 0.0, 0.0],   # column 1: |-0.5| = |0.5| tie → the lowest index decides
                     [0.0, 0.5, -1.0, 0.0],
                     [0.0, -0.5, 0.0, 0.0]])  # column 3: zero, left as it is
    lam, u = canonical_basis(vals, vecs)
    np.testing.assert_array_equal(lam, [3.0, 3.0, 1.0, 0.5])  # descending; equal values keep their order
    np.testing.assert_array_equal(u, [[0.5, 0.0, -0.6, 0.0],
                                      [-0.5, 0.0, 0.8, 0.0],
                                      [-0.5, 1.0, 0.0, 0.0],
                                      [0.5, 0.0, 0.0, 0.0]])


def test_a_flipped_eigenvector_gives_the_same_canonical_basis():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((D, D))
    lam, u = np.linalg.eigh(a @ a.T)
    ref_lam, ref_u = canonical_basis(lam, u)
    for cols in ([0], [7], [D - 1], list(range(0, D, 2))):
        flipped = u.copy()
        flipped[:, cols] *= -1
        got_lam, got_u = canonical_basis(lam, flipped)
        assert np.array_equal(got_lam, ref_lam) and np.array_equal(got_u, ref_u), cols
    # each vector's largest entry is positive
    idx = np.abs(ref_u).argmax(0)
    assert (ref_u[idx, np.arange(D)] > 0).all()


def test_svd_vectors_flip_together():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((12, 8))
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    ref = canonical_basis(s, u, vh.T)
    np.testing.assert_allclose(ref[1] * ref[0] @ ref[2].T, m, atol=1e-12)  # U diag(s) V^T unchanged
    flip = np.where(np.arange(8) % 3 == 0, -1.0, 1.0)
    got = canonical_basis(s, u * flip, vh.T * flip)  # the other valid SVD
    assert all(np.array_equal(x, y) for x, y in zip(got, ref))


# ---------------------------------------------------------------- the fits, end to end to float32 maps


def test_solver_sign_flips_do_not_reach_the_maps(monkeypatch):
    """A LAPACK that returns some eigenvectors with the other sign (another BLAS, another thread count) gives
    byte-identical checkpoint maps: query and key rows come from the same eigenvectors and flip together."""
    ref = checkpoint_maps()
    real = np.linalg.eigh
    calls = []

    def eigh_other_signs(a, *args, **kw):
        lam, u = real(a, *args, **kw)
        calls.append(1)
        return lam, u * np.where(np.arange(u.shape[-1]) % 2 == 0, -1.0, 1.0)  # every other vector flipped

    monkeypatch.setattr(np.linalg, "eigh", eigh_other_signs)
    got = checkpoint_maps()
    assert calls  # the fits really went through the flipped solver
    _assert_bytewise(got, ref, "eigenvectors with other signs")


def test_closed_form_flipped_without_canonical_signs_would_differ(monkeypatch):
    """The check above is not vacuous: the closed form's raw eigenvectors do come out with the other signs."""
    gq, gk = _stats().query_gram_group(0, 0), _stats().key_gram_centred(0)[0]
    monkeypatch.setattr("lowrank_attn.fit.canonical_basis", lambda vals, vecs: (vals[::-1], vecs[:, ::-1]))
    plain = fit_head(gq, gk)
    real = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: (lambda lam, u: (lam, -u))(*real(a)))
    assert not np.array_equal(fit_head(gq, gk).q_map, plain.q_map)


def test_maps_bytewise_for_grams_scaled_by_a_constant():
    """Gram sums scale with the token count: scaled by a power of four (exact in floating point, and so is
    its square root) the checkpoint maps are the very same bytes; by 1e6 equal to float32 round-off."""
    ref = checkpoint_maps()
    _assert_bytewise(checkpoint_maps(4.0**5), ref, "Grams × 4^5")
    big = checkpoint_maps(1e6)
    for key in ref:
        np.testing.assert_allclose(big[key], ref[key], rtol=1e-4, atol=1e-5 * np.abs(ref[key]).max(), err_msg=key)


def test_maps_bytewise_under_torch_thread_counts():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = checkpoint_maps()
        torch.set_num_threads(2)
        two = checkpoint_maps()
    finally:
        torch.set_num_threads(n)
    _assert_bytewise(one, two, "torch threads 1 vs 2")


_CHILD = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({n})
from test_determinism import checkpoint_maps
np.savez({out!r}, **checkpoint_maps())
"""


def test_maps_bytewise_under_blas_thread_counts(tmp_path):
    """numpy's BLAS/LAPACK thread count is fixed when it loads: the same code in fresh processes with 1 and 2
    threads (OpenBLAS, MKL, OpenMP and torch alike) writes the same bytes as this process."""
    ref = checkpoint_maps()
    for n in (1, 2):
        out = tmp_path / f"maps{n}.npz"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               **{v: str(n) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
        code = _CHILD.format(tests=str(REPO_ROOT / "tests"), n=n, out=str(out))
        res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        with np.load(out) as got:
            _assert_bytewise({k: got[k] for k in got.files}, ref, f"{n} BLAS threads")
