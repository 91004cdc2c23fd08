"""spectra.py: the Gram route to the E~ spectrum, the QR route to the W_Q^T W_K spectrum,
and the rank measures, each against an explicit reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_attn import spectra
from lowrank_attn.runtime import adapters
from lowrank_attn.calibrate import GramStats, attention_hook


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference relative to the largest reference value; the explicit spectrum has
    n >= d values of which only the first d can be non-zero, so the tail must vanish too."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    n = max(len(got), len(ref))
    got = np.pad(got, (0, n - len(got)))
    ref = np.pad(ref, (0, n - len(ref)))
    return float(np.abs(got - ref).max() / ref.max())


def capture_qk(model, n_tokens: int, seed: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray, float]]:
    """Post-RoPE q (H, n, d) and k (Hkv, n, d) of one window, per layer, via the real hook."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, n_tokens), generator=gen)
    caught: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    def fn(layer, q, k, mask, scaling):
        caught[layer] = (q[0].double().numpy().copy(), k[0].double().numpy().copy(), scaling)

    with attention_hook(model, fn), torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return caught


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])  # RoPE + GQA, and no RoPE (MHA)
def test_gram_spectrum_equals_explicit_svd(tiny_factory, kind):
    model, _ = tiny_factory(kind)
    layout = adapters.head_layout(model)
    caught = capture_qk(model, n_tokens=96)
    assert sorted(caught) == list(range(layout.num_layers))
    g = layout.group_size
    for layer, (q, k, scale) in caught.items():
        assert scale == pytest.approx(layout.head_dim ** -0.5)
        for h in range(layout.num_heads):
            qh, kh = q[h], k[h // g]
            kc = kh - kh.mean(0)
            got = spectra.logit_field_sv2(qh.T @ qh, kc.T @ kc, scale)
            ref = spectra.explicit_logit_field_sv2(qh, kh, scale)  # unmasked: row-centring == key-centring
            assert len(got) == layout.head_dim
            assert rel_err(got, ref) < 1e-6, (kind, layer, h)
            assert np.all(np.diff(got) <= 1e-12 * got[0]), "descending"


def test_gram_spectrum_gqa_group_equals_stacked_rows(tiny_llama):
    """A GQA group's pooled spectrum (sum of the group's query Grams) is the spectrum of the
    logit field whose rows are the queries of every head in the group."""
    model, _ = tiny_llama
    layout = adapters.head_layout(model)
    g = layout.group_size
    assert g > 1
    for layer, (q, k, scale) in capture_qk(model, n_tokens=80, seed=1).items():
        for j in range(layout.num_kv_heads):
            qs = q[j * g : (j + 1) * g]  # (g, n, d)
            kc = k[j] - k[j].mean(0)
            got = spectra.logit_field_sv2(np.einsum("hnd,hne->de", qs, qs), kc.T @ kc, scale)
            ref = spectra.explicit_logit_field_sv2(qs.reshape(-1, qs.shape[-1]), k[j], scale)
            assert rel_err(got, ref) < 1e-6, (layer, j)


def test_gramstats_path_equals_explicit(tiny_llama):
    """The statistics analyze uses (GramStats.add + key_gram_centred) give the same spectrum."""
    model, _ = tiny_llama
    layout = adapters.head_layout(model)
    stats = GramStats(layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim)
    ids = torch.randint(0, 256, (1, 72), generator=torch.Generator().manual_seed(2))
    raw = {}

    def fn(layer, q, k, mask, scaling):
        stats.add(layer, q, k, scaling)
        raw[layer] = (q[0].double().numpy().copy(), k[0].double().numpy().copy())

    with attention_hook(model, fn), torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    g = layout.group_size
    for layer, (q, k) in raw.items():
        gk = stats.key_gram_centred(layer)
        for h in range(layout.num_heads):
            got = spectra.logit_field_sv2(stats.gq[layer, h], gk[h // g], stats.scale[layer])
            ref = spectra.explicit_logit_field_sv2(q[h], k[h // g], stats.scale[layer])
            assert rel_err(got, ref) < 1e-6


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 12), extra=st.integers(0, 20), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(0.05, 4.0))
def test_gram_spectrum_random(d, extra, seed, scale):
    rng = np.random.default_rng(seed)
    n = d + extra
    q = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
    k = rng.normal(size=(n, d)) + rng.normal(size=d)  # a non-zero key mean, which centring removes
    kc = k - k.mean(0)
    got = spectra.logit_field_sv2(q.T @ q, kc.T @ kc, scale)
    assert rel_err(got, spectra.explicit_logit_field_sv2(q, k, scale)) < 1e-6


def test_explicit_causal_field_rows_are_centred():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    sv2 = spectra.explicit_logit_field_sv2(q, k, 0.5, causal=True)
    assert len(sv2) == 10 and np.all(sv2 >= 0)
    # the first row has one valid entry, so centring makes it zero: rank <= n - 1
    assert sv2[-1] < 1e-20 * sv2[0]


# --- W_Q^T W_K via QR ------------------------------------------------------------------------

def explicit_weight_sv2(wq: np.ndarray, wk: np.ndarray, scale: float) -> np.ndarray:
    d = wk.shape[0]
    blocks = [wq[h * d : (h + 1) * d].T @ wk for h in range(wq.shape[0] // d)]  # each D×D
    return np.linalg.svd(scale * np.concatenate(blocks, axis=0), compute_uv=False) ** 2


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_weight_spectrum_single_head_and_group(tiny_factory, kind):
    model, _ = tiny_factory(kind)
    layout = adapters.head_layout(model)
    d, g = layout.head_dim, layout.group_size
    scale = d ** -0.5
    for layer in range(layout.num_layers):
        wq, wk = (w.detach().double().numpy() for w in adapters.qk_weights(model, layer))
        assert wq.shape == (layout.num_heads * d, layout.hidden_size)
        assert wk.shape == (layout.num_kv_heads * d, layout.hidden_size)
        for h in range(layout.num_heads):
            wqh, wkh = wq[h * d : (h + 1) * d], wk[(h // g) * d : (h // g + 1) * d]
            got = spectra.weight_sv2(wqh, wkh, scale)
            assert len(got) == d  # rank <= d, never a D×D decomposition
            assert rel_err(got, explicit_weight_sv2(wqh, wkh, scale)) < 1e-6
        for j in range(layout.num_kv_heads):
            wqg, wkj = wq[j * g * d : (j + 1) * g * d], wk[j * d : (j + 1) * d]
            got = spectra.weight_sv2(wqg, wkj, scale)
            assert rel_err(got, explicit_weight_sv2(wqg, wkj, scale)) < 1e-6


def test_weight_spectrum_random_stacked_group():
    rng = np.random.default_rng(3)
    d, D, g = 8, 40, 3
    wq, wk = rng.normal(size=(g * d, D)), rng.normal(size=(d, D))
    got = spectra.weight_sv2(wq, wk, 0.3)
    assert rel_err(got, explicit_weight_sv2(wq, wk, 0.3)) < 1e-6


# --- rank measures -----------------------------------------------------------------------------

def test_r90_r99_hand_made():
    sv2 = np.array([0.5, 0.3, 0.15, 0.05])  # cumulative energy 0.5, 0.8, 0.95, 1.0
    m = spectra.rank_measures(sv2)
    assert (m.r90, m.r99) == (3, 4)
    assert spectra.rank_for_energy(np.array([9.0, 1.0]), 0.90) == 1  # exactly 90% counts
    assert spectra.rank_for_energy(np.array([1.0, 0.0, 0.0]), 0.99) == 1
    # unnormalised input: only the shape of the spectrum matters
    scaled = spectra.rank_measures(sv2 * 1234.5)
    assert (scaled.r90, scaled.r99) == (m.r90, m.r99)
    assert scaled.entropy_rank == pytest.approx(m.entropy_rank, rel=1e-12)
    assert scaled.stable_rank == pytest.approx(m.stable_rank, rel=1e-12)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_flat_spectrum(n):
    m = spectra.rank_measures(np.ones(n))
    assert m.entropy_rank == pytest.approx(n, rel=1e-12)
    assert m.stable_rank == pytest.approx(n, rel=1e-12)
    assert m.r90 == int(np.ceil(0.9 * n - 1e-9))
    assert m.r99 == int(np.ceil(0.99 * n - 1e-9))


def test_entropy_and_stable_rank_values():
    m = spectra.rank_measures(np.array([4.0, 1.0, 1.0]))
    assert m.stable_rank == pytest.approx(6.0 / 4.0)
    p = np.array([2.0, 1.0, 1.0]) / 4.0  # singular values, not their squares
    assert m.entropy_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    spike = spectra.rank_measures(np.array([5.0, 0.0, 0.0, 0.0]))
    assert (spike.r90, spike.r99, spike.entropy_rank, spike.stable_rank) == (1, 1, 1.0, 1.0)


def test_zero_spectrum():
    assert spectra.rank_measures(np.zeros(5)) == spectra.RankMeasures(0, 0, 0.0, 0.0)
    assert np.all(spectra.energy(np.zeros(5)) == 0)


def test_energy_sums_to_one():
    rng = np.random.default_rng(4)
    for _ in range(20):
        sv2 = rng.exponential(size=rng.integers(1, 100)) * 10.0 ** rng.integers(-8, 8)
        e = spectra.energy(sv2)
        assert abs(e.sum() - 1.0) < 1e-12 and np.all(e >= 0)
    e = spectra.energy(np.array([1.0, -1e-18, 3.0]))  # round-off negatives are clipped
    assert e.min() >= 0 and abs(e.sum() - 1) < 1e-12


def test_psd_sqrt():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 3))
    g = a @ a.T  # rank-deficient PSD
    r = spectra.psd_sqrt(g)
    np.testing.assert_allclose(r, r.T, atol=1e-12)
    np.testing.assert_allclose(r @ r, g, atol=1e-10)
