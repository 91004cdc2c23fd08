"""The fast paths equal their plain definitions: blocked grouped attention (``attention.attend``),
blocked causal attention weights (``FitStats._attention_weights``), device-side statistics sums;
and the Gram accumulation dtype the spectra rely on (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_attn import spectra
from lowrank_attn.runtime.attention import attend
from lowrank_attn.calibrate import FitStats, GramStats

pytestmark = pytest.mark.usefixtures("single_thread")


def _reference_attend(q_low, k_low, values, scaling, *, q_full=None, k_recent=None, window=0, mask=None,
                      sliding=None, groups=1, k_sink=None, v_exact=None, v_window=0):
    """The definition: every query head against its KV head's keys (repeated), full (S,T) masks; each pair's
    value exact (``v_exact``, the last N positions) where i − j < v_window."""
    s, t = q_low.shape[-2], k_low.shape[-2]
    rep = lambda x: x.repeat_interleave(groups, dim=1)  # noqa: E731
    logits = q_low.double() @ rep(k_low).double().transpose(-1, -2) * scaling
    q_pos = torch.arange(t - s, t)[:, None]
    k_pos = torch.arange(t)[None, :]
    if window and k_recent is not None and k_recent.shape[-2]:
        w = k_recent.shape[-2]
        exact = q_full.double() @ rep(k_recent).double().transpose(-1, -2) * scaling
        band = (q_pos - k_pos[:, t - w :]) < window
        logits[..., t - w :] = torch.where(band, exact, logits[..., t - w :])
    if k_sink is not None:
        n = k_sink.shape[-2]
        logits[..., :n] = q_full.double() @ rep(k_sink).double().transpose(-1, -2) * scaling
    if mask is None:
        allowed = k_pos <= q_pos
        if sliding:
            allowed = allowed & (q_pos - k_pos < sliding)
        logits = logits.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask[..., -t:], float("-inf"))
    else:
        logits = logits + mask[..., -t:].double()
    p = torch.softmax(logits, -1)
    out = p @ rep(values).double()
    if v_exact is not None and v_window:
        n = v_exact.shape[-2]
        band = ((q_pos - k_pos) < v_window) & (k_pos >= t - n)  # (S,T)
        diff = torch.zeros_like(values, dtype=torch.float64)
        diff[..., t - n :, :] = v_exact.double() - values[..., t - n :, :].double()
        out = out + (p * band) @ rep(diff)
    return out


CASES = [  # (groups, window, S, T, sliding, mask kind, block, sink); S = T without a mask: the fused prefill
    (1, 0, 40, 40, None, None, 16, 0),
    (3, 0, 40, 40, None, None, 16, 0),
    (3, 8, 40, 40, None, None, 16, 0),
    (3, 8, 40, 40, None, None, 512, 0),
    (3, 8, 40, 40, None, None, 16, 4),
    (3, 8, 40, 40, None, None, 512, 45),  # more sink keys than positions
    (3, 0, 40, 40, None, None, 16, 3),  # sinks without a window: the blocked path
    (3, 8, 1, 57, None, None, 16, 0),  # a decode step
    (3, 8, 1, 57, None, None, 16, 4),
    (3, 8, 5, 57, None, None, 2, 0),  # a chunk appended to a cache, blocked
    (3, 8, 5, 57, None, None, 2, 3),
    (3, 8, 40, 40, 12, None, 16, 0),  # sliding window layer
    (3, 8, 40, 40, None, "bool", 16, 0),
    (3, 8, 40, 40, None, "float", 7, 2),
    (2, 5, 33, 45, None, "bool", 8, 0),
    (2, 20, 50, 50, None, None, 16, 1),  # a window wider than a band block
    (1, 1, 30, 30, None, None, 16, 2),  # a window of one: the band is the diagonal
]


@pytest.mark.parametrize("v_window", [0, 6], ids=["", "value-band"])  # 6: inside most key windows, wider than some
@pytest.mark.parametrize("dv", [8, 3], ids=["values-d", "values-low-rank"])  # value width above / below r = 5
@pytest.mark.parametrize("fused_min_len,band_rows,band_chunk", [(0, 64, 4096), (0, 7, 15), (10**9, 64, 4096)],
                         ids=["fused", "fused-small-blocks", "blocked"])
@pytest.mark.parametrize("groups,window,s,t,sliding,mask_kind,block,sink", CASES)
def test_attend_equals_definition(groups, window, s, t, sliding, mask_kind, block, sink, fused_min_len, band_rows,
                                  band_chunk, dv, v_window, monkeypatch):
    import lowrank_attn.runtime.attention as attention

    monkeypatch.setattr(attention, "FUSED_WINDOW_MIN_LEN", fused_min_len)
    monkeypatch.setattr(attention, "BAND_ROWS", band_rows)  # several band blocks and passes, a ragged last one
    monkeypatch.setattr(attention, "BAND_CHUNK", band_chunk)
    torch.manual_seed(groups * 100 + window + s + t)
    b, hkv, r, d = 2, 2, 5, 8
    h = hkv * groups
    q_low, k_low = torch.randn(b, h, s, r), torch.randn(b, hkv, t, r)
    q_full, values = torch.randn(b, h, s, d), torch.randn(b, hkv, t, dv)
    k_full = torch.randn(b, hkv, t, d)  # exact keys: the window holds the last ones, the sinks the first
    w_len = min(t, window + s - 1) if window else 0
    k_recent = k_full[..., t - w_len :, :] if window else None
    mask = None
    if mask_kind:
        q_pos, k_pos = torch.arange(t - s, t)[:, None], torch.arange(t)[None, :]
        allowed = (k_pos <= q_pos) & (torch.rand(s, t) > 0.2)
        allowed |= k_pos == q_pos  # every row keeps at least its own key
        allowed = allowed[None, None].expand(b, 1, s, t)
        mask = allowed if mask_kind == "bool" else torch.zeros(b, 1, s, t).masked_fill(~allowed, float("-inf"))
    k_sink = k_full[..., : min(sink, t), :] if sink else None
    kw = dict(q_full=q_full, k_recent=k_recent, window=window, mask=mask, sliding=sliding, groups=groups, k_sink=k_sink)
    if v_window:  # values as stored differ from the exact ones; a prompt has all of them exact, a chunk its own
        n = min(t, s + 3)  # and a chunk the last few cached ones
        kw.update(v_exact=values[..., t - n :, :] + torch.randn(b, hkv, n, dv), v_window=v_window)
    got = attend(q_low, k_low, values, 0.3, block=block, **kw)
    ref = _reference_attend(q_low, k_low, values, 0.3, **kw)
    assert got.shape == (b, h, s, dv)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def _reference_weights(q, k, mask, scaling, window, group):
    """Attention each query gives to / each key receives from pairs at distance ≥ window, from the full matrix."""
    s = q.shape[2]
    p = torch.softmax(q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * scaling
                      + torch.zeros(s, s, dtype=torch.float64).masked_fill(~_allowed(s, mask), float("-inf")), -1)
    dist = torch.arange(s)[:, None] - torch.arange(s)[None, :]
    p = p * (dist >= window)
    b_w = p.sum(-1)
    a_w = p.sum(-2).view(q.shape[0], -1, group, s).sum(2)
    return b_w, a_w


def _allowed(s, mask):
    causal = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    return causal if mask is None else causal & mask[0, 0]


@pytest.mark.parametrize("window", [0, 1, 6, 50])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("block", [7, 256])
def test_attention_weights_equal_definition(window, use_mask, block):
    torch.manual_seed(window + 10 * use_mask + block)
    b, hkv, g, s, d = 2, 2, 3, 45, 8
    q, k = torch.randn(b, hkv * g, s, d), torch.randn(b, hkv, s, d)
    mask = None
    if use_mask:
        keep = (torch.rand(s, s) > 0.3) | torch.eye(s, dtype=torch.bool)
        mask = (keep & _allowed(s, None))[None, None].expand(b, 1, s, s)
    v = torch.randn(b, hkv, s, 5)
    st = FitStats(1, hkv * g, hkv, d, weighting="attention", window=window)
    b_w, a_w, out = st._attention_weights(q, k, mask, 0.4, window, block=block, value=v)
    rb, ra = _reference_weights(q, k, mask, 0.4, window, g)
    torch.testing.assert_close(b_w.double(), rb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_w.double(), ra, rtol=1e-5, atol=1e-5)
    # the output from the same weights is the model's attention (every pair, not only the far ones)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), scale=0.4,
        attn_mask=_allowed(s, None if mask is None else mask[:1]))
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert st._attention_weights(q, k, mask, 0.4, window, block=block)[2] is None  # no values, no output


@pytest.mark.parametrize("cls", [GramStats, FitStats])
def test_statistics_sums_read_after_every_add(cls):
    """Sums accumulate on the tensors' device and are moved to the host when read: reading between adds,
    adding after a read, and ``+=`` of two objects all give the plain float64 sums."""
    torch.manual_seed(0)
    qs = [torch.randn(1, 4, 30, 8) for _ in range(3)]
    ks = [torch.randn(1, 2, 30, 8) for _ in range(3)]
    a = cls(2, 4, 2, 8)
    for i, (q, k) in enumerate(zip(qs, ks)):
        if cls is GramStats:
            a.add(1, q, k, 0.5)
        else:
            a.add(1, q, k, None, 0.5)
        if i == 0:
            _ = a.gq  # a read in between moves the partial sums to the host
    q64 = torch.cat(qs, 2).double()[0]
    k64 = torch.cat(ks, 2).double()[0]
    np.testing.assert_allclose(a.gq[1], torch.einsum("hsd,hse->hde", q64, q64).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.skk[1], torch.einsum("hsd,hse->hde", k64, k64).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.sk[1], k64.sum(1).numpy(), rtol=1e-12, atol=1e-12)
    assert not a.gq[0].any()
    if cls is GramStats:
        b = cls(2, 4, 2, 8)
        b.add(1, qs[0], ks[0], 0.5)
        b += a
        np.testing.assert_allclose(b.gq[1], a.gq[1] + torch.einsum("hsd,hse->hde", q64[:, :30], q64[:, :30]).numpy(),
                                   rtol=1e-12)


# ---------------------------------------------------------------- Gram accumulation dtype


def _activations(n_tokens: int, d: int = 64, seed: int = 0):
    """Query/key-like activations with the statistics of real post-RoPE heads: keys with a large
    shared offset, decaying spectra, and a few massive-activation tokens (attention sinks). Their E~
    spectrum spans ~3e6 (SmolLM2-135M's 90 KV heads on 4096 Gutenberg tokens: median 3e3, max 7.5e8)."""
    g = torch.Generator().manual_seed(seed)
    mix_q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    mix_k = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    q = (torch.randn(n_tokens, d, generator=g, dtype=torch.float64) * torch.logspace(1, -0.5, d, dtype=torch.float64)) @ mix_q.T
    k = (torch.randn(n_tokens, d, generator=g, dtype=torch.float64) * torch.logspace(1, -1, d, dtype=torch.float64)) @ mix_k.T
    k += 20.0 * mix_k[:, 0]
    k[:: n_tokens // 4] *= 30.0
    return q.float(), k.float()  # what the model hands the statistics: float32


def _spectrum_from_grams(q, k, acc_dtype, chunk=None):
    """E~ spectrum from Grams accumulated in ``acc_dtype``; with ``chunk``, float32 products per chunk
    of tokens summed in float64 (the usual mixed-precision trick)."""
    n = k.shape[0]
    if chunk is None:
        qa, ka = q.to(acc_dtype), k.to(acc_dtype)
        gq, skk, sk = qa.T @ qa, ka.T @ ka, ka.sum(0)
    else:
        gq = sum((q[i : i + chunk].T @ q[i : i + chunk]).double() for i in range(0, n, chunk))
        skk = sum((k[i : i + chunk].T @ k[i : i + chunk]).double() for i in range(0, n, chunk))
        sk = k.double().sum(0)
    gq, skk, sk = gq.double().numpy(), skk.double().numpy(), sk.double().numpy()
    return spectra.logit_field_sv2(gq, skk - np.outer(sk, sk) / n, 0.125)


def _spectrum_reference(q, k):
    """The same spectrum without forming any Gram: QR of Q and of the centred K in float64."""
    q, k = q.double().numpy(), k.double().numpy()
    rq, rk = np.linalg.qr(q, mode="r"), np.linalg.qr(k - k.mean(0), mode="r")
    return np.linalg.svd(rq @ rk.T, compute_uv=False) ** 2 * 0.125**2


def test_gram_accumulation_needs_float64():
    """Why the statistics accumulate in float64: every eigenvalue of the E~ spectrum (the tail too —
    the fit's error is the sum of dropped eigenvalues, and its key map inverts Σ_k) is within 1e-6
    relative of the Gram-free reference with float64 Grams, and not with float32 Grams, nor with
    float32 products summed in float64 per 512-token chunk.

    Measured on SmolLM2-135M (90 KV heads, 4096 tokens): float64 3.7e-9 max; float32 3.7e-4 (top-99%-energy
    components alone: 1.1e-5); chunked 3.2e-4 (2.4e-6). This synthetic case: ~7e-11 / ~3e-4 / ~2e-4."""
    q, k = _activations(4096)
    ref = _spectrum_reference(q, k)

    def rel_err(sv2):
        return float(np.max(np.abs(sv2 - ref) / ref))

    assert rel_err(_spectrum_from_grams(q, k, torch.float64)) < 1e-6  # what the shipped code relies on
    assert rel_err(_spectrum_from_grams(q, k, torch.float32)) > 1e-6
    assert rel_err(_spectrum_from_grams(q, k, None, chunk=512)) > 1e-6


def test_gramstats_accumulate_in_float64():
    s = GramStats(1, 2, 1, 4)
    s.add(0, torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), 0.5)
    assert s.gq.dtype == s.skk.dtype == s.sk.dtype == np.float64
    f = FitStats(1, 2, 1, 4)
    f.add(0, torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), None, 0.5)
    assert f.gq.dtype == f.skk.dtype == f.sk.dtype == f.sa.dtype == np.float64


@pytest.mark.parametrize("window,sink,sliding,bits", [(0, 0, None, None), (8, 2, None, None), (8, 0, 20, 4)])
def test_layer_output_errors_share_the_exact_attention(window, sink, sliding, bits):
    """The allocation's grid of ranks, evaluated with the exact attention computed once, gives what
    each rank gives on its own (the per-head loop written out here)."""
    from lowrank_attn.calibrate import QKSample
    from lowrank_attn.heldout import _approx_logits, _valid_mask, layer_output_errors
    from lowrank_attn.runtime.coded import GroupQuantizer

    torch.manual_seed(window + sink)
    hkv, g, s, d, dm = 2, 3, 64, 8, 12
    sample = QKSample()
    for _ in range(2):
        sample.add(0, torch.randn(1, hkv * g, s, d), torch.randn(1, hkv, s, d), None, 0.35, torch.randn(1, hkv, s, d))
    sample.resid_sq[0] = 3.0
    w_o = torch.randn(dm, hkv * g * d)
    quant = GroupQuantizer(bits, 8) if bits else None
    full = [(torch.randn(d, d), torch.randn(d, d)) for _ in range(hkv)]
    grid = [2, 4, 8]
    candidates = [[(qm[:r], km[:r]) for qm, km in full] for r in grid]

    def one(maps):
        err, n_rows = 0.0, 0
        for q, k, v in zip(sample.q[0], sample.k[0], sample.v[0]):
            rows = torch.linspace(0, s - 1, min(256, s)).round().long().unique()
            valid = _valid_mask(rows, s, sliding)
            delta = 0.0
            for j, (qm, km) in enumerate(maps):
                exact, approx = _approx_logits(q[0, j * g : (j + 1) * g], k[0, j], qm, km, 0.35, window, quant, rows,
                                               0 if sliding else sink)
                neg = torch.tensor(float("-inf"))
                dp = torch.softmax(torch.where(valid, approx, neg), -1) - torch.softmax(torch.where(valid, exact, neg), -1)
                delta = delta + (dp @ v[0, j]).transpose(0, 1).reshape(len(rows), -1) @ w_o[:, j * g * d : (j + 1) * g * d].T
            err += float((delta**2).sum())
            n_rows += len(rows)
        return err / n_rows / 3.0

    got = layer_output_errors(sample, 0, candidates, w_o, group=g, window=window, quantizer=quant, sliding=sliding, sink=sink)
    np.testing.assert_allclose(got, [one(m) for m in candidates], rtol=1e-6)
    assert len(set(got)) == len(grid) and min(got) > 0  # the candidates really differ


def test_fused_prefill_is_taken_where_it_applies(monkeypatch):
    import lowrank_attn.runtime.attention as attention
    from lowrank_attn.runtime.attention import _prefill_fused

    monkeypatch.setattr(attention, "FUSED_WINDOW_MIN_LEN", 0)

    b, hkv, g, t, r, d = 1, 2, 3, 30, 4, 8
    q_low, k_low, v = torch.randn(b, hkv * g, t, r), torch.randn(b, hkv, t, r), torch.randn(b, hkv, t, d)
    q_full, k_full = torch.randn(b, hkv * g, t, d), torch.randn(b, hkv, t, d)
    args = dict(q_full=q_full, k_recent=k_full, window=5, mask=None, sliding=None, groups=g, k_sink=k_full[..., :2, :])
    call = lambda **kw: _prefill_fused(q_low, k_low, v, 0.3, **{**args, **kw})  # noqa: E731
    assert call() is not None
    assert call(window=0, k_recent=None, k_sink=None) is not None  # rope-pairs: all pairs low-rank
    assert call(mask=torch.ones(1, 1, t, t, dtype=torch.bool)) is None
    assert call(sliding=10) is None
    assert _prefill_fused(q_low[:, :, -3:], k_low, v, 0.3, **{**args, "q_full": q_full[:, :, -3:]}) is None  # a chunk
    monkeypatch.setattr(attention, "FUSED_WINDOW_MIN_LEN", t + 1)
    assert call() is None  # a short prompt with exact keys: the blocked path
    assert call(window=0, k_recent=None, k_sink=None) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_weights_read_an_additive_mask_in_any_dtype(dtype):
    """An additive mask holds its dtype's min where masked (transformers' eager masks: -65504 in float16): the
    weights read it as the boolean mask, whatever the dtype (a fixed -1e30 threshold let every float16 entry pass)."""
    torch.manual_seed(1)
    b, hkv, g, s, d = 1, 2, 2, 30, 8
    q, k = torch.randn(b, hkv * g, s, d), torch.randn(b, hkv, s, d)
    keep = ((torch.rand(s, s) > 0.3) | torch.eye(s, dtype=torch.bool)) & _allowed(s, None)
    additive = torch.zeros(s, s, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[None, None]
    st = FitStats(1, hkv * g, hkv, d, weighting="attention", window=0)
    got = st._attention_weights(q, k, additive, 0.4, 0)
    want = st._attention_weights(q, k, keep[None, None], 0.4, 0)
    for a, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, w)
