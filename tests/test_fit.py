"""Pure math of the closed-form fit (DESIGN §3) and rank allocation: numpy only, float64."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_attn import baselines
from lowrank_attn.fit import allocate_budget, allocate_energy, allocate_uniform, fit_head, logit_error


def _rand_psd(rng, d, n=None):
    """A random full-rank PSD Gram with a spread-out spectrum."""
    n = n or 3 * d
    x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-2, 1, d))  # anisotropic columns
    return x.T @ x


def _data(rng, n_q=200, n_k=150, d=12, d_model=20, g=1):
    """Queries/keys as linear images of shared anisotropic inputs (like a real head), keys centred."""
    x = rng.standard_normal((max(n_q, n_k), d_model)) * np.exp(rng.uniform(-1.5, 1.0, d_model))
    wq = rng.standard_normal((g * d, d_model))
    wk = rng.standard_normal((d, d_model))
    qs = [x[:n_q] @ wq[h * d : (h + 1) * d].T for h in range(g)]
    k = x[:n_k] @ wk.T + rng.standard_normal(d)  # a non-zero key mean
    return qs, k, wq, wk


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_predicted_error_equals_gram_error(seed, scale):
    rng = np.random.default_rng(seed)
    d = 10
    gq, gk = _rand_psd(rng, d), _rand_psd(rng, d)
    hf = fit_head(gq, gk, scale=scale, ridge=0.0)
    assert np.all(np.diff(hf.eigvals) <= 1e-9 * hf.eigvals[0])  # descending
    total = logit_error(gq, gk, np.zeros((0, d)), np.zeros((0, d)), scale)  # rank 0: all of the logit energy
    assert hf.error(0) == pytest.approx(total, rel=1e-6)
    for r in range(d + 1):
        got = logit_error(gq, gk, hf.q_map[:r], hf.k_map[:r], scale)
        pred = hf.error(r)
        assert abs(got - pred) <= 1e-6 * total, (r, got, pred)


@pytest.mark.parametrize("seed", range(3))
def test_predicted_error_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    d, s = 8, 0.3
    q = rng.standard_normal((60, d)) @ rng.standard_normal((d, d))
    k = rng.standard_normal((45, d)) @ rng.standard_normal((d, d)) + 2.0
    kc = k - k.mean(0)
    hf = fit_head(q.T @ q, kc.T @ kc, scale=s, ridge=0.0)
    exact = s * q @ kc.T  # (n_q, n_k)
    for r in (0, 1, 3, 5, d):
        approx = s * (q @ hf.q_map[:r].T) @ (kc @ hf.k_map[:r].T).T
        brute = float(((exact - approx) ** 2).sum())
        assert brute == pytest.approx(hf.error(r), rel=1e-6, abs=1e-9 * float((exact**2).sum()))
    # raw (uncentred) keys give the same logits up to a per-row constant: row-centred errors agree
    r = 3
    approx_raw = s * (q @ hf.q_map[:r].T) @ (k @ hf.k_map[:r].T).T
    exact_raw = s * q @ k.T
    diff = exact_raw - approx_raw
    diff -= diff.mean(1, keepdims=True)
    assert float((diff**2).sum()) == pytest.approx(hf.error(r), rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_full_rank_maps_are_exact_inverses(seed):
    rng = np.random.default_rng(200 + seed)
    d = 16
    hf = fit_head(_rand_psd(rng, d), _rand_psd(rng, d), ridge=0.0)
    np.testing.assert_allclose(hf.q_map.T @ hf.k_map, np.eye(d), atol=1e-8)
    assert hf.error(d) == 0.0


def test_ridge_only_perturbs_slightly():
    rng = np.random.default_rng(7)
    d = 12
    gq, gk = _rand_psd(rng, d), _rand_psd(rng, d)
    hf = fit_head(gq, gk, ridge=1e-6)
    np.testing.assert_allclose(hf.q_map.T @ hf.k_map, np.eye(d), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("g", [1, 3])
def test_closed_form_beats_baselines(seed, g):
    """The fit is optimal among rank-r maps: its squared logit error (on the centred Grams it
    was fitted to) is ≤ key PCA, weight SVD and ThinK at every rank."""
    rng = np.random.default_rng(300 + seed)
    d = 12
    qs, k, wq, wk = _data(rng, d=d, g=g)
    gq = sum(q.T @ q for q in qs)
    kc = k - k.mean(0)
    gk = kc.T @ kc
    skk = k.T @ k
    ours = fit_head(gq, gk, ridge=0.0)
    methods = {
        "key-pca": baselines.key_pca(skk),
        "weight-svd": baselines.weight_svd(wq, wk),
        "think": baselines.think(gq, skk),
    }
    total = logit_error(gq, gk, np.zeros((0, d)), np.zeros((0, d)))
    strictly_better = 0
    for r in (1, 2, 4, 6, 9):
        e_ours = logit_error(gq, gk, ours.q_map[:r], ours.k_map[:r])
        assert e_ours == pytest.approx(ours.error(r), rel=1e-6, abs=1e-9 * total)
        for name, (qm, km, _) in methods.items():
            e_base = logit_error(gq, gk, qm[:r], km[:r])
            assert e_ours <= e_base * (1 + 1e-9) + 1e-9 * total, (name, r, e_ours, e_base)
            strictly_better += e_ours < 0.99 * e_base
    assert strictly_better > 0  # the comparison is not vacuous


def test_baseline_maps_shapes_and_order():
    rng = np.random.default_rng(5)
    d = 8
    qs, k, wq, wk = _data(rng, d=d, g=2)
    gq = sum(q.T @ q for q in qs)
    for qm, km, ev in (baselines.key_pca(k.T @ k), baselines.weight_svd(wq, wk), baselines.think(gq, k.T @ k)):
        assert qm.shape == km.shape == (d, d) and ev.shape == (d,)
        assert np.all(np.diff(ev) <= 1e-9 * max(ev[0], 1e-300))
    qm, km, _ = baselines.key_pca(k.T @ k)
    np.testing.assert_allclose(qm @ qm.T, np.eye(d), atol=1e-10)  # orthonormal, same basis for q and k
    np.testing.assert_array_equal(qm, km)
    qm, km, _ = baselines.think(gq, k.T @ k)
    assert set(np.abs(qm).sum(1)) == {1.0}  # channel selection


# ---------------------------------------------------------------- allocation


def _spectra(rng, n_heads=6, d=16):
    out = []
    for _ in range(n_heads):
        lam = np.sort(rng.exponential(1.0, d) * np.exp(-np.arange(d) * rng.uniform(0.05, 0.6)))[::-1]
        out.append(lam * rng.uniform(0.5, 20))
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.8])
def test_allocate_budget_keeps_largest_eigenvalues(seed, ratio):
    rng = np.random.default_rng(400 + seed)
    eig = _spectra(rng)
    d = len(eig[0])
    budget = int(round(ratio * d * len(eig)))
    ranks = allocate_budget(eig, ratio)
    assert sum(ranks) == budget
    assert all(1 <= r <= d for r in ranks)
    kept = sum(lam[:r].sum() for lam, r in zip(eig, ranks))
    # optimum with every head keeping ≥ 1 component: its first, plus the largest of the rest
    firsts = sum(lam[0] for lam in eig)
    rest = np.sort(np.concatenate([lam[1:] for lam in eig]))[::-1]
    best = firsts + rest[: budget - len(eig)].sum()
    assert kept == pytest.approx(best, rel=1e-12)
    # and no swap helps: the smallest kept tail component ≥ the largest dropped one
    smallest_kept = min(lam[r - 1] for lam, r in zip(eig, ranks) if r > 1)
    largest_dropped = max((lam[r] for lam, r in zip(eig, ranks) if r < d), default=-1.0)
    assert smallest_kept >= largest_dropped


def test_allocate_budget_granularity_min_max_and_weights():
    rng = np.random.default_rng(11)
    eig = _spectra(rng, n_heads=5, d=16)
    ranks = allocate_budget(eig, 0.5, granularity=4, min_rank=4, max_rank=12)
    assert all(r % 4 == 0 and 4 <= r <= 12 for r in ranks)
    assert sum(ranks) <= round(0.5 * 16 * 5) + 4 - 1
    assert sum(ranks) >= round(0.5 * 16 * 5) - 4 + 1
    # a head weighted to zero gets only its minimum
    w = [1.0] * 5
    w[2] = 0.0
    ranks = allocate_budget(eig, 0.4, weights=w, min_rank=2)
    assert ranks[2] == 2
    # budget above the whole capacity: everything full, never past d
    assert allocate_budget(eig, 1.0) == [16] * 5


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99, 1.0])
def test_allocate_energy_meets_tau_minimally(tau):
    rng = np.random.default_rng(12)
    eig = _spectra(rng)
    ranks = allocate_energy(eig, tau)
    for lam, r in zip(eig, ranks):
        frac = np.cumsum(lam) / lam.sum()
        assert frac[r - 1] >= tau - 1e-12
        if r > 1:
            assert frac[r - 2] < tau  # smallest such rank


def test_allocate_energy_granularity_and_limits():
    rng = np.random.default_rng(13)
    eig = _spectra(rng)
    for gran in (2, 4, 8):
        ranks = allocate_energy(eig, 0.9, granularity=gran)
        plain = allocate_energy(eig, 0.9)
        assert all(r % gran == 0 and r >= p and r - p < gran for r, p in zip(ranks, plain))
    ranks = allocate_energy(eig, 0.999, max_rank=5)
    assert max(ranks) <= 5
    ranks = allocate_energy(eig, 0.01, min_rank=3)
    assert min(ranks) == 3
    assert allocate_energy([np.zeros(8)], 0.9) == [8]  # no energy: keep everything


def test_allocate_uniform():
    assert allocate_uniform(64, 3, 0.5) == [32, 32, 32]
    assert allocate_uniform(64, 2, 0.25) == [16, 16]
    assert allocate_uniform(16, 4, 1.0) == [16] * 4
    assert allocate_uniform(16, 2, 0.01) == [1, 1]  # min_rank 1
    assert allocate_uniform(16, 2, 0.3, granularity=4) == [8, 8]  # round(4.8)=5 → 8
    assert allocate_uniform(16, 2, 0.3, granularity=2) == [6, 6]
    assert allocate_uniform(16, 2, 0.9, max_rank=10) == [10, 10]
    assert allocate_uniform(16, 2, 0.1, min_rank=4) == [4, 4]


def test_allocate_budget_with_costs_spends_the_budget_by_gain_per_cost():
    """Equal costs give the unit-cost allocation; a head whose components cost 1/64 (a sliding-window layer's
    cache at a long serving length) is filled first, and the cost-weighted total stays within the budget."""
    rng = np.random.default_rng(13)
    eig = _spectra(rng, n_heads=6, d=16)
    assert allocate_budget(eig, 0.5, costs=[3.0] * 6) == allocate_budget(eig, 0.5)
    costs = [1.0, 1 / 64, 1.0, 1 / 64, 1.0, 1.0]
    ranks = allocate_budget(eig, 0.5, costs=costs)
    assert ranks[1] == ranks[3] == 16
    total = 0.5 * sum(c * 16 for c in costs)
    assert sum(c * r for c, r in zip(costs, ranks)) <= total + 1e-9
    assert sum(c * r for c, r in zip(costs, ranks)) > total - 1.0  # nothing affordable left unspent


def test_allocate_budget_reaches_the_optimum_on_non_convex_gains():
    """Measured gains can grow with rank (a layer whose error falls most in its last components): the plain
    greedy (the default) stops before the big step, ``majorant=True`` takes it; on eigenvalues nothing changes."""
    import itertools

    from lowrank_attn.fit import concave_majorant
    from lowrank_attn.policies import gains_from_errors

    grid, d = [2, 4, 6, 8], 8
    errs = [[10.0, 9.5, 3.0, 2.5], [6.0, 3.0, 1.8, 1.0]]  # layer 0: its big drop waits behind a small one
    gains = [gains_from_errors(grid, e, d) for e in errs]

    def total(ranks):
        return sum(float(np.interp(r, grid, e)) for e, r in zip(errs, ranks))

    best = min(total(rs) for rs in itertools.product(grid, grid) if sum(rs) <= 12)
    assert total(allocate_budget(gains, 0.75, min_rank=2, granularity=2)) > best  # what the plain greedy misses
    assert total(allocate_budget(gains, 0.75, min_rank=2, granularity=2, majorant=True)) == pytest.approx(best)
    lam = np.sort(np.random.default_rng(0).random(16))[::-1]
    assert np.allclose(concave_majorant(lam, 3), lam)
    eig = [np.sort(np.random.default_rng(s).random(16))[::-1] for s in range(5)]
    for ratio in (0.25, 0.5, 0.75):
        assert allocate_budget(eig, ratio, majorant=True) == allocate_budget(eig, ratio)
