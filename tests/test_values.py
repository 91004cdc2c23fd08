"""The value side: the closed-form value map (vfit), quantised values in the cache, low-rank values installed by
compress, their checkpoint round trip, and K and V bytes measured from the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_attn.checkpoint import load_compressed, save_compressed
from lowrank_attn.compression import compress
from lowrank_attn.errors import RecipeError
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime import adapters
from lowrank_attn.runtime.kcache import LowRankKeyLayer, kv_cache_bytes
from lowrank_attn.runtime.surgery import set_prefill
from lowrank_attn.runtime.values import TokenQuantizer, prefill_values
from lowrank_attn.texts import load_texts, token_windows
from lowrank_attn.vfit import allocate_value_ranks, fit_value_head

pytestmark = pytest.mark.usefixtures("single_thread", "compressed_prefill")


def _spd(rng, d, decay=0.7):
    a = rng.standard_normal((d, d)) * decay ** np.arange(d)
    return a @ a.T


def test_value_fit_error_is_the_tail_and_full_rank_is_exact():
    rng = np.random.default_rng(0)
    d, n_heads, big_d = 16, 3, 40
    ws = [rng.standard_normal((big_d, d)) for _ in range(n_heads)]
    o = rng.standard_normal((500, d)) * 0.8 ** np.arange(d)  # the group's outputs share one distribution
    go = o.T @ o
    m = sum(w.T @ w for w in ws)
    fit = fit_value_head(go, m, ridge=0.0)
    assert np.allclose(fit.dec @ fit.enc, np.eye(d), atol=1e-8)
    for r in (2, 5, 11):
        proj = fit.dec[:, :r] @ fit.enc[:r]  # (d, d): o ↦ ô
        lost = sum(np.sum((w @ (o.T - proj @ o.T)) ** 2) for w in ws)
        assert np.isclose(lost, fit.eigvals[r:].sum(), rtol=1e-8)
        # optimal among rank-r maps: plain PCA of the outputs (ignoring o_proj) loses at least as much
        u = np.linalg.eigh(go)[1][:, ::-1][:, :r]
        pca = sum(np.sum((w @ (o.T - u @ u.T @ o.T)) ** 2) for w in ws)
        assert lost <= pca * (1 + 1e-9)


def test_value_fit_is_canonical_under_sign_and_scale():
    rng = np.random.default_rng(1)
    go, m = _spd(rng, 12), _spd(rng, 12, 0.9)
    a, b = fit_value_head(go, m), fit_value_head(4.0 * go, m)
    assert np.array_equal(np.sign(a.enc), np.sign(b.enc))
    assert np.allclose(a.enc, b.enc) and np.allclose(a.dec, b.dec)


def test_value_ranks_are_per_layer_multiples_within_budget():
    rng = np.random.default_rng(2)
    eig = [np.sort(rng.exponential(s, (2, 32)))[:, ::-1] for s in (1.0, 5.0, 0.1)]
    ranks = allocate_value_ranks(eig, 0.5, granularity=8)
    assert all(r % 8 == 0 and 8 <= r <= 32 for r in ranks)
    assert sum(ranks) <= 0.5 * 32 * 3
    assert ranks[1] >= ranks[0] >= ranks[2]  # more energy, more rank


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_token_quantizer_round_trip_and_error(bits):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, 32)
    q = TokenQuantizer(bits, 16)
    codes, lo, step = q.quantize(x)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() * bits // 8
    back = q.dequantize(codes, lo, step)
    assert back.shape == x.shape
    assert float((back - x).abs().max()) <= float(step.max()) / 2 + 1e-6  # half a step per value, per token group
    kept = prefill_values(x, 5, q)
    assert torch.equal(kept[..., -5:, :], x[..., -5:, :])


def _recipe(kind, text, **kw):
    return Recipe(**{**dict(model=kind, text=[text], rank_ratio=1.0, k_bits=None, v_bits=None, seq_len=128, max_tokens=1024,
                            heldout_tokens=256), **kw})


def _ids(kind, text, n=160):
    return token_windows(load_model(kind).tokenizer, load_texts([text]), seq_len=n)[3].input_ids[None]


def _cached_logits(model, ids, prefill):
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), cache


def _decode_vs_prefix_forward(model, ids, prefill):
    """Worst |Δlogit| between each decode step through the cache and an uncached forward over the same prefix."""
    steps, cache = _cached_logits(model, ids, prefill)
    worst = 0.0
    for i, t in enumerate(range(prefill - 1, ids.shape[1])):
        with torch.no_grad():
            ref = model(input_ids=ids[:, : t + 1], use_cache=False).logits[:, -1]
        worst = max(worst, float((steps[:, i] - ref).abs().max()))
    return worst, cache


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gemma2"])
def test_low_rank_values_through_the_cache(kind, public_text):
    """Half-rank values (sliding-window layers included): every decode step through the cache gives the logits of
    an uncached forward over the same prefix, and the cache holds r_v values per token."""
    lm, report = compress(load_model(kind), _recipe(kind, public_text, v_rank_ratio=0.5), progress=False)
    assert all(layer["v_rank"] % 8 == 0 for layer in report["layers"])
    assert report["summary"]["mean_value_rank_ratio"] <= 0.5
    worst, cache = _decode_vs_prefix_forward(lm.model, _ids(kind, public_text), 140)
    assert worst < 1e-4
    layers = [lay for lay in cache.layers if isinstance(lay, LowRankKeyLayer)]
    assert [lay.values.shape[-1] for lay in layers] == [lay["v_rank"] for lay in report["layers"]]


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma3"])
def test_quantised_values_in_the_cache(kind, public_text):
    """4-bit values, the last 8 exact: a prefill through the cache equals the uncached forward (both quantise the
    same values); while decoding, the cache keeps exactly the last v_window values unquantised and the rest as
    packed codes. (Decode steps differ from an uncached forward over the same prefix beyond round-off: there,
    earlier tokens' hidden states see more quantised values than they did when they were decoded.)"""
    lm, report = compress(load_model(kind), _recipe(kind, public_text, v_rank_ratio=0.5, v_bits=4, v_group=8,
                                                    v_window=8), progress=False)
    ids = _ids(kind, public_text)
    with torch.no_grad():
        full = lm.model(input_ids=ids, use_cache=False).logits
        out = lm.model(input_ids=ids, use_cache=True)
    assert float((full - out.logits).abs().max()) < 1e-4
    _, cache = _cached_logits(lm.model, ids, 140)
    windows = [lay["v_window"] for lay in report["layers"]]
    layers = [lay for lay in cache.layers if isinstance(lay, LowRankKeyLayer)]
    assert [lay.values.shape[-2] for lay in layers] == windows
    assert all(lay.vcodes is not None and lay.vcodes.dtype == torch.uint8 for lay in layers)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma3"])
def test_a_compressed_forward_reads_values_as_decoding_does(kind, public_text):
    """2-bit values, the last 8 exact: a single forward with prefill ``compressed`` (what perplexity and the
    fidelity policy measure) gives at every position the logits of decoding the text token by token through the
    cache, where each step reads its own 8 most recent values unquantised (keys full rank, unquantised, so the
    values are all that differs), as does the text fed in two chunks through the cache. It read every value older
    than the last 8 *of the text* (or of the chunk) quantised."""
    lm, _ = compress(load_model(kind), _recipe(kind, public_text, v_bits=2, v_group=8, v_window=8), progress=False)
    set_prefill(lm.model, "compressed")
    ids = _ids(kind, public_text, n=96)
    steps, _ = _cached_logits(lm.model, ids, 1)  # (1, 96, V): position 0 from the prompt, then one step each
    with torch.no_grad():
        full = lm.model(input_ids=ids, use_cache=False).logits
        prompt = lm.model(input_ids=ids, use_cache=True).logits  # a compressed prompt through the cache
        first = lm.model(input_ids=ids[:, :40], use_cache=True)  # and in two chunks: the second's first rows read
        second = lm.model(input_ids=ids[:, 40:], past_key_values=first.past_key_values, use_cache=True)  # the first's
    assert float((steps - full).abs().max()) < 1e-4
    assert float((prompt - full).abs().max()) < 1e-4
    assert float((torch.cat([first.logits, second.logits], 1) - full).abs().max()) < 1e-4


def test_value_side_off_is_exact_and_full_rank_values_are_exact(public_text):
    kind = "tiny-llama"
    dense = load_model(kind).model
    ids = _ids(kind, public_text)
    with torch.no_grad():
        ref = dense(input_ids=ids, use_cache=False).logits
    lm, report = compress(load_model(kind), _recipe(kind, public_text, v_rank_ratio=1.0), progress=False)
    assert "v_retained_energy" not in report["layers"][0]
    with torch.no_grad():
        assert float((lm.model(input_ids=ids, use_cache=False).logits - ref).abs().max()) < 1e-4


def test_kv_bytes_measured_shrink_with_values(public_text):
    kind = "tiny-llama"
    ids = _ids(kind, public_text)
    dense = load_model(kind).model
    with torch.no_grad():
        dense_bytes = kv_cache_bytes(dense(input_ids=ids, use_cache=True).past_key_values, 2)
    assert dense_bytes["k"] == dense_bytes["v"] > 0
    lm, _ = compress(load_model(kind), _recipe(kind, public_text, rank_ratio=0.5, v_rank_ratio=0.5, v_bits=4,
                                                v_group=8, exact_window=8, v_window=8), progress=False)
    with torch.no_grad():
        got = kv_cache_bytes(lm.model(input_ids=ids, use_cache=True).past_key_values, 2)
    assert got["v"] < 0.5 * dense_bytes["v"]
    assert got["total"] == got["k"] + got["v"] < dense_bytes["total"]


def test_values_survive_a_checkpoint(tmp_path, public_text):
    kind = "tiny-qwen2"
    lm, report = compress(load_model(kind), _recipe(kind, public_text, v_rank_ratio=0.5, v_bits=4, v_group=8),
                          progress=False)
    ids = _ids(kind, public_text)
    with torch.no_grad():
        before = lm.model(input_ids=ids, use_cache=False).logits
    save_compressed(lm, report, tmp_path / "ckpt")
    back = load_compressed(tmp_path / "ckpt")
    with torch.no_grad():
        after = back.model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(before, after, atol=1e-5)
    plan = adapters.attention_modules(back.model)[0].lowrank_plan
    assert plan.v_bits == 4 and plan.v_rank == report["layers"][0]["v_rank"]


def test_bad_value_settings_are_refused():
    with pytest.raises(RecipeError, match="v_bits"):
        Recipe(v_bits=5)
    with pytest.raises(RecipeError, match="v_rank_ratio"):
        Recipe(v_rank_ratio=0.0)
    with pytest.raises(RecipeError, match="v_group"):
        Recipe(v_group=12)


def test_analyze_value_spectrum_is_what_o_proj_sees(public_text):
    """On a multi-head model (one query head per KV head) the value-output spectrum analyze reports sums to
    Σ_tokens ‖W_h o_h‖², measured at the output projection's input."""
    from lowrank_attn.analysis import collect_grams, head_spectra, pooled
    from lowrank_attn.vfit import fit_value_head

    lm = load_model("tiny-gpt2")
    layout = adapters.head_layout(lm.model)
    assert layout.group_size == 1
    windows = token_windows(lm.tokenizer, load_texts([public_text]), seq_len=64)[:3]
    stats = pooled(collect_grams(lm.model, windows, progress=False))
    layer = 1
    out_proj = adapters.attention_modules(lm.model)[layer].c_proj
    seen = []
    handle = out_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().double()))
    try:
        with torch.no_grad():
            for w in windows:
                lm.model(input_ids=w.input_ids[None], use_cache=False)
    finally:
        handle.remove()
    d = layout.head_dim
    wo = adapters.o_weight(lm.model, layer).double()  # (D, H·d)
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])  # (tokens, H·d)
    for h in range(layout.num_heads):
        w_h = wo[:, h * d : (h + 1) * d]
        direct = float(((x[:, h * d : (h + 1) * d] @ w_h.T) ** 2).sum())
        fit = fit_value_head(stats.go[layer, h], (w_h.T @ w_h).numpy(), ridge=0.0)
        assert np.isclose(fit.eigvals.sum(), direct, rtol=1e-6)
    layers = head_spectra(lm.model, stats)
    assert all(1 <= h["value_output"]["r90"] <= d for lay in layers for h in lay["kv_heads"])


@pytest.mark.parametrize("kind,overrides", [
    ("tiny-llama", dict(rank_ratio=0.5)),
    ("tiny-llama", dict(rank_ratio=0.5, k_bits=4, v_rank_ratio=0.5, v_bits=4, v_group=8, exact_window=32, v_window=8)),
    ("tiny-llama", dict(rank_ratio=0.75, k_bits=2, v_bits=2, v_group=8, exact_window=16, v_window=24)),
    # sliding-window layers (window 32; the 160-token prompt overflows it): what they keep and what dense keeps
    ("tiny-gemma3", dict(rank_ratio=0.5, k_bits=4, k_group=8, v_bits=4, v_group=8)),
    ("tiny-mistral", dict(rank_ratio=0.75, k_bits=3, k_group=8, v_bits=3, v_group=8)),
    ("tiny-mistral", dict(rank_ratio=0.5, k_bits=16)),
])
def test_card_bytes_equal_the_measured_cache(kind, overrides, public_text):
    """The model card's K/V byte model (kvbytes.kv_bytes) equals the bytes measured from a live cache, the dense
    reference those of the model's own dense cache."""
    from lowrank_attn.kvbytes import kv_bytes
    from lowrank_attn.runtime.surgery import plans_config

    lm, _ = compress(load_model(kind), _recipe(kind, public_text, **overrides), progress=False)
    layout = adapters.head_layout(lm.model)
    low = plans_config([m.lowrank_plan for m in adapters.attention_modules(lm.model)])
    ids = _ids(kind, public_text)
    with torch.no_grad():
        measured = kv_cache_bytes(lm.model(input_ids=ids, use_cache=True).past_key_values, 2)
    predicted = kv_bytes(low, layout.num_kv_heads, layout.head_dim, ids.shape[1], slidings=layout.sliding_windows)
    assert (predicted["k"], predicted["v"]) == (measured["k"], measured["v"])
    with torch.no_grad():
        dense = kv_cache_bytes(load_model(kind).model(input_ids=ids, use_cache=True).past_key_values, 2)
    assert predicted["dense"] == dense["k"] == dense["v"]


def test_sinks_are_recorded_per_layer_and_counted_as_stored():
    """A layer at full rank with unquantised keys stores its keys exact and keeps no sink (nor window); the
    checkpoint config records the sink per layer (it once kept layer 0's for every layer: a full-rank layer 0
    took every layer's sink away on reload), reload gives each layer its own, and the byte model counts what the
    live cache holds."""
    from lowrank_attn.kvbytes import kv_bytes
    from lowrank_attn.runtime.modes import mode_of
    from lowrank_attn.runtime.surgery import install_plans, plans_config, plans_from_config

    lm = load_model("tiny-llama")
    layout = adapters.head_layout(lm.model)
    d, n = layout.head_dim, layout.num_layers
    mode = mode_of("post-rope")
    eye = np.eye(d)
    heads = [type("Head", (), {"q_map": eye, "k_map": eye})() for _ in range(layout.num_kv_heads)]
    plans = [mode.new_plan(heads, [d if i == 0 else d // 2] * layout.num_kv_heads, head_dim=d, k_bits=None,
                           k_group=32, window=16, sink=2, k_mean=None) for i in range(n)]
    assert [p.sink for p in plans] == [0] + [2] * (n - 1)
    cfg = plans_config(plans)
    assert cfg["sink"] == [0] + [2] * (n - 1)
    assert [p.sink for p in plans_from_config(cfg, layout)] == [0] + [2] * (n - 1)
    install_plans(lm.model, plans)
    ids = torch.randint(10, 200, (1, 40))
    with torch.no_grad():
        measured = kv_cache_bytes(lm.model(input_ids=ids, use_cache=True).past_key_values, 2)
    predicted = kv_bytes(cfg, layout.num_kv_heads, d, ids.shape[1])
    assert (predicted["k"], predicted["v"]) == (measured["k"], measured["v"])


def test_card_per_token_model_adds_up_to_the_bytes():
    """The card's per-token bytes × the tokens beyond the windows + its fixed bytes = ``kv_bytes`` (up to the
    keys of one partly filled quantisation group), for keys and for values."""
    from lowrank_attn.kvbytes import key_bytes_per_token, kv_bytes, value_bytes_per_token

    low = dict(ranks=[[32, 24], [16, 16]], k_bits=4, k_group=32, window=64, sink=1, v_bits=3, v_group=32, v_window=48)
    hkv, d = 2, 64
    for tokens in (64 + 32 * 10, 64 + 32 * 100):  # whole groups beyond the window
        k_tok, k_fixed = key_bytes_per_token(low, hkv, d)
        v_tok, v_fixed = value_bytes_per_token(low, hkv, d)
        b = kv_bytes(low, hkv, d, tokens)
        assert k_tok * (tokens - 64) + k_fixed == b["k"]
        assert v_tok * (tokens - 48) + v_fixed == b["v"]


def test_plans_differing_in_a_shared_setting_are_refused_not_saved_as_layer_0s():
    """A checkpoint config holds one key/value quantisation setting for every layer: plans that differ (possible
    through ``apply_lowrank``) are refused, where layer 0's setting once silently served every layer on reload."""
    from lowrank_attn.runtime.modes import mode_of
    from lowrank_attn.runtime.surgery import plans_config

    d = 16
    eye = np.eye(d)
    heads = [type("Head", (), {"q_map": eye, "k_map": eye})()]
    mode = mode_of("post-rope")
    plans = [mode.new_plan(heads, [d // 2], head_dim=d, k_bits=bits, k_group=32, window=16, sink=1, k_mean=None)
             for bits in (2, None)]
    with pytest.raises(ValueError, match="layers differ in k_bits"):
        plans_config(plans)
