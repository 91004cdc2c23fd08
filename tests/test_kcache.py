"""The low-rank K cache: KIVI-style group quantiser and the cache layer's measured bytes."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from lowrank_attn.runtime.coded import GroupQuantizer
from lowrank_attn.runtime.kcache import LowRankKeyLayer, key_cache_bytes, prefill_keys


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [8, 32])
def test_quantizer_round_trip_and_packing(bits, group):
    torch.manual_seed(bits * 100 + group)
    b, h, t, r = 2, 3, 4 * group, 5
    x = torch.randn(b, h, t, r) * torch.linspace(0.1, 10, r)  # channels of very different ranges
    x[0, 0, :group, 0] = 1.5  # a constant group/channel (step 0 branch)
    q = GroupQuantizer(bits, group)
    packed, lo, step = q.quantize(x)
    assert packed.dtype == torch.uint8
    assert packed.nbytes * 8 == x.numel() * bits  # bits/8 bytes per value, measured
    assert lo.shape == step.shape == (b, h, t // group, 1, r)
    back = q.dequantize(packed, lo, step)
    assert back.shape == x.shape
    err = (back - x).abs().reshape(b, h, t // group, group, r)
    assert torch.all(err <= step / 2 + 1e-5 * step.abs() + 1e-6)
    assert back[0, 0, :group, 0].eq(1.5).all()
    # codes span the range: min and max of each group are reproduced (nearly) exactly
    g = x.reshape(b, h, t // group, group, r)
    gb = back.reshape(b, h, t // group, group, r)
    torch.testing.assert_close(gb.amin(3), g.amin(3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb.amax(3), g.amax(3), atol=1e-4, rtol=1e-5)
    if bits == 8:
        assert float(err.max()) < float((g.amax(3) - g.amin(3)).max()) / 255


def test_quantizer_rejects_unpackable_group():
    with pytest.raises(ValueError, match="multiple of 8"):
        GroupQuantizer(4, 12)
    with pytest.raises(ValueError, match="unknown clip 'p99'"):
        GroupQuantizer(4, 8, clip="p99")
    from lowrank_attn.runtime.values import TokenQuantizer

    with pytest.raises(ValueError, match="unknown clip 'p99'"):
        TokenQuantizer(4, 8, clip="p99")  # at construction, not at its first quantisation


def _group_sq_err(q, x):
    """Per quantisation group, the squared error of ``q`` on ``x``."""
    return (q.dequantize(*q.quantize(x)) - x).square().unflatten(q.axis, (-1, q.group)).sum(q.axis)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", [-2, -1])
def test_mse_clip_never_worse_per_group_and_same_bytes(bits, axis):
    """clip="mse" picks, per group, the range of least squared error among shrunk ranges that include the full one:
    no group is worse than min/max, the codes and scales take the same bytes, and on heavy-tailed data the total error
    drops by much more than rounding could explain (Student-t, 3 degrees of freedom)."""
    torch.manual_seed(bits)
    x = torch.distributions.StudentT(3.0).sample((2, 3, 128, 64))
    x[0, 0, :32, :] = 0.25  # constant groups (step 0 branch) stay exact
    plain, clipped = GroupQuantizer(bits, 32, axis=axis), GroupQuantizer(bits, 32, axis=axis, clip="mse")
    a, b = clipped.quantize(x), plain.quantize(x)
    assert [t.shape for t in a] == [t.shape for t in b] and a[0].dtype == b[0].dtype == torch.uint8
    e_plain, e_mse = _group_sq_err(plain, x), _group_sq_err(clipped, x)
    assert torch.all(e_mse <= e_plain * (1 + 1e-5) + 1e-9)
    assert float(e_mse.sum()) < {2: 0.7, 3: 0.85, 4: 0.95}[bits] * float(e_plain.sum())  # measured 0.92 at 4 bits
    assert clipped.dequantize(*a)[0, 0, :32].eq(0.25).all()


def _append_all(layer, full, proj, vals, chunks):
    out = None
    start = 0
    for n in chunks:
        out = layer.append(full[..., start : start + n, :], proj[..., start : start + n, :], vals[..., start : start + n, :])
        start += n
    assert start == full.shape[-2]
    return out


@pytest.mark.parametrize("r", [2, 4, 8])
@pytest.mark.parametrize("window", [0, 8])
def test_lowrank_layer_stores_r_dim_keys(r, window):
    torch.manual_seed(r)
    b, hkv, d, t = 1, 2, 16, 100
    full = torch.randn(b, hkv, t, d)
    proj = torch.randn(b, hkv, t, r)
    vals = torch.randn(b, hkv, t, d)
    layer = LowRankKeyLayer(window=window)
    k_all, k_recent, v_all = _append_all(layer, full if window else full[..., :0], proj, vals, [60, 1, 1, 30, 8])
    torch.testing.assert_close(k_all, proj, rtol=0, atol=0)
    torch.testing.assert_close(v_all, vals, rtol=0, atol=0)
    assert layer.get_seq_length() == t
    expected = b * hkv * (t * r * 4 + window * d * 4)  # fp32 projected keys + the exact window
    assert layer.key_bytes() == expected
    if window:
        torch.testing.assert_close(layer.recent, full[..., -window:, :], rtol=0, atol=0)
    cache = DynamicCache()
    cache.layers.append(layer)
    cache.layers.append(LowRankKeyLayer(window=window))
    _append_all(cache.layers[1], full if window else full[..., :0], proj, vals, [t])
    assert key_cache_bytes(cache) == 2 * expected
    dense = b * hkv * t * d * 4
    assert layer.key_bytes() < dense  # r < d and a small window


def test_key_bytes_shrink_with_rank():
    b, hkv, d, t, w = 1, 2, 16, 200, 8
    sizes = []
    for r in (2, 4, 8, 16):
        layer = LowRankKeyLayer(window=w)
        layer.append(torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, r), torch.randn(b, hkv, t, d))
        sizes.append(layer.key_bytes())
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert sizes[1] - sizes[0] == b * hkv * t * 2 * 4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_layer_bytes_and_values(bits):
    torch.manual_seed(bits)
    b, hkv, d, r, t, w, group = 1, 2, 16, 8, 150, 8, 32
    full = torch.randn(b, hkv, t, d)
    proj = torch.randn(b, hkv, t, r)
    vals = torch.randn(b, hkv, t, d)
    q = GroupQuantizer(bits, group)
    layer = LowRankKeyLayer(window=w, quantizer=q)
    k_all, _, _ = _append_all(layer, full, proj, vals, [40] + [1] * 60 + [50])
    n_q = ((t - w) // group) * group  # whole groups older than the window
    assert layer.n_quantized == n_q
    expected = b * hkv * (n_q * r * bits // 8 + 2 * (n_q // group) * r * 4 + (t - n_q) * r * 4 + w * d * 4)
    assert layer.key_bytes() == expected
    fp = LowRankKeyLayer(window=w)
    fp.append(full, proj, vals)
    assert layer.key_bytes() < fp.key_bytes()
    # the unquantised tail is exact; the quantised part is within half a step
    torch.testing.assert_close(k_all[..., n_q:, :], proj[..., n_q:, :], rtol=0, atol=0)
    span = proj[..., :n_q, :].reshape(b, hkv, -1, group, r)
    half_step = ((span.amax(3) - span.amin(3)) / (2**bits - 1) / 2).unsqueeze(3)
    err = (k_all[..., :n_q, :] - proj[..., :n_q, :]).abs().reshape(b, hkv, -1, group, r)
    assert torch.all(err <= half_step * (1 + 1e-5) + 1e-6)
    # a prefill of the same tokens sees the same keys as the cache built incrementally
    torch.testing.assert_close(prefill_keys(proj, w, q), k_all, rtol=0, atol=1e-6)


def test_key_cache_bytes_counts_dense_layers():
    cache = DynamicCache()
    k = torch.randn(1, 2, 10, 16)
    cache.update(k, k.clone(), 0)
    cache.update(k, k.clone(), 1)
    assert key_cache_bytes(cache) == 2 * k.nbytes


def test_batch_reorder_keeps_lowrank_state():
    layer = LowRankKeyLayer(window=4, quantizer=GroupQuantizer(4, 8))
    layer.append(torch.randn(2, 1, 30, 8), torch.randn(2, 1, 30, 3), torch.randn(2, 1, 30, 8))
    before = layer.key_bytes()
    layer.batch_repeat_interleave(2)
    assert layer.key_bytes() == 2 * before
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert layer.key_bytes() == before
    assert layer.recent.shape[0] == layer.qcodes.shape[0] == layer.keys.shape[0] == 2


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [-1, -2, 2])
def test_pack_codes_round_trip_along_any_dim(bits, dim):
    """bits/8 bytes per code along ``dim``, and back exactly (8/bits codes to a byte, other widths split)."""
    from lowrank_attn.runtime.coded import pack_codes, unpack_codes

    codes = torch.randint(0, 2**bits, (2, 3, 16, 24), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits, dim)
    assert packed.dtype == torch.uint8 and packed.numel() * 8 == codes.numel() * bits
    assert torch.equal(unpack_codes(packed, bits, dim), codes)


def test_quantizer_along_the_last_axis():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 32)
    q = GroupQuantizer(4, 16, axis=-1)  # per row over channel groups
    packed, lo, step = q.quantize(x)
    assert lo.shape == (2, 3, 5, 2, 1)
    back = q.dequantize(packed, lo, step)
    assert back.shape == x.shape
    assert float((back - x).abs().max()) <= float(step.max()) / 2 + 1e-6


@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (2, 3), (8, 2)])
def test_decode_attends_on_the_codes_as_on_the_dequantised_rows(k_bits, v_bits):
    """A decode step reads quantised keys and values on their codes (scales folded into the query and into the
    probabilities): the same output as attending over the dequantised rows, window and sinks exact."""
    from lowrank_attn.runtime.attention import attend
    from lowrank_attn.runtime.coded import QuantizedKeys, QuantizedValues
    from lowrank_attn.runtime.values import TokenQuantizer

    torch.manual_seed(k_bits * 10 + v_bits)
    b, hkv, groups, d, r, t = 2, 2, 3, 16, 8, 150
    layer = LowRankKeyLayer(window=8, quantizer=GroupQuantizer(k_bits, 32), sink=1,
                            v_quantizer=TokenQuantizer(v_bits, 8), v_window=8)
    full, vals = torch.randn(b, hkv, t + 1, d), torch.randn(b, hkv, t + 1, d) + 2
    proj = full[..., :r] * 3 + 1  # offsets, so the folded min terms matter
    layer.append(full[..., :t, :], proj[..., :t, :], vals[..., :t, :])
    keys, recent, values = layer.append(full[..., t:, :], proj[..., t:, :], vals[..., t:, :], coded=True)
    assert isinstance(keys, QuantizedKeys) and isinstance(values, QuantizedValues)
    assert keys.shape == (b, hkv, t + 1, r) and values.shape == (b, hkv, t + 1, d)
    q_low, q_full = torch.randn(b, hkv * groups, 1, r), torch.randn(b, hkv * groups, 1, d)
    kw = dict(q_full=q_full, k_recent=recent, window=8, groups=groups, k_sink=layer.sink_keys)
    got = attend(q_low, keys, values, 0.25, **kw)
    want = attend(q_low, keys.dense(), values.dense(), 0.25, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,sink,sliding", [(8, 1, None), (0, 1, None), (8, 0, 64)])
def test_a_prompt_leaves_no_prompt_sized_buffer_behind(window, sink, sliding):
    """After a prefill the layer occupies what it reports (``held_bytes`` = key_bytes + value_bytes): the exact
    window, the unquantised tail and the values are not views pinning the prompt's whole key and value buffers
    (which made a compressed cache as big as a dense one until the first decode step). Decode steps keep it
    within half as much again (a step's slices of the rows it appended)."""
    from lowrank_attn.runtime.kcache import held_bytes
    from lowrank_attn.runtime.values import TokenQuantizer

    torch.manual_seed(0)
    b, hkv, d, r, t = 1, 2, 16, 8, 512
    layer = LowRankKeyLayer(window=window, quantizer=GroupQuantizer(4, 16), sink=sink, sliding=sliding,
                            v_quantizer=TokenQuantizer(4, 8), v_window=8)
    full, vals = torch.randn(b, hkv, t + 20, d), torch.randn(b, hkv, t + 20, d)
    layer.append(full[..., :t, :].clone(), full[..., :t, :r].clone(), vals[..., :t, :].clone())
    stored = layer.key_bytes() + layer.value_bytes()
    assert held_bytes(layer) == stored
    assert stored < 0.5 * (full[..., :t, :].nbytes + vals[..., :t, :].nbytes)  # the point of the cache
    for i in range(t, t + 20):
        layer.append(full[..., i : i + 1, :], full[..., i : i + 1, :r], vals[..., i : i + 1, :], coded=True)
        assert held_bytes(layer) <= 1.5 * (layer.key_bytes() + layer.value_bytes())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_half_precision_codes_are_the_nearest_to_the_stored_scales(bits, clip):
    """A bf16 cache stores lo and step in bf16; each code is the nearest to its value under those stored scales
    (within half a step wherever the value lies in the group's range), as float32 arithmetic gives it — bf16
    arithmetic put 8-bit codes up to 1.4 steps off."""
    from lowrank_attn.runtime.coded import unpack_codes

    torch.manual_seed(bits)
    x = (torch.randn(1, 2, 256, 64) * 3 + 1).bfloat16()
    packed, lo, step = GroupQuantizer(bits, 32, clip=clip).quantize(x)
    assert lo.dtype == step.dtype == torch.bfloat16
    lo, step = lo.float(), step.float()
    g = x.float().unflatten(-2, (-1, 32))
    off = (unpack_codes(packed, bits, -2, torch.float32) * step + lo - g).abs() / step
    inside = (g >= lo) & (g <= lo + step * (2**bits - 1))
    assert float(off[inside].max()) <= 0.5 + 1e-3
