"""generate() as users call it, on compressed tiny models: greedy, seeded sampling, beam search,
num_return_sequences and left-padded batches. At full rank the compressed model generates the dense
model's tokens (the maps are orthogonal, so only rounding separates them); at 50% rank a left-padded
batch generates what each prompt generates alone (padding and beam bookkeeping reach every piece of
the low-rank K cache: projected, exact-window, sink and quantised keys). What the cache cannot serve
(static / offloaded / quantised caches, assisted decoding, flex masks) is refused in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lowrank_attn.errors import LowrankAttnError
from lowrank_attn.runtime import adapters
from lowrank_attn.runtime.plan import LayerPlan
from lowrank_attn.runtime.values import TokenQuantizer
from lowrank_attn.runtime.coded import GroupQuantizer
from lowrank_attn.runtime.kcache import LowRankKeyLayer, UnsupportedCacheError
from lowrank_attn.runtime.modeling_lowrank import apply_lowrank
from lowrank_attn.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")
PROMPTS = ["Hello there, my", "The quick brown fox jumps over the lazy"]
NEW = 10


def _model(kind: str, ratio: float | None, *, window: int = 4, sink: int = 1, k_bits: int | None = None,
           v_bits: int | None = None):
    """A tiny model with sharpened attention (q scaled ×3, so logit errors show in the tokens), dense
    (ratio None) or compressed post-rope with random orthogonal maps of rank ratio·d per KV head."""
    model, tok = build_tiny(kind)
    with torch.no_grad():
        for attn in adapters.attention_modules(model):
            attn.q_proj.weight.mul_(3.0)
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.mul_(3.0)
    if ratio is not None:
        lay = adapters.head_layout(model)
        g = torch.Generator().manual_seed(1)
        r = int(round(ratio * lay.head_dim))
        plans = []
        for _ in range(lay.num_layers):
            q = torch.linalg.qr(torch.randn(lay.num_kv_heads, lay.head_dim, lay.head_dim, generator=g))[0]
            rows = q.transpose(-1, -2)[:, :r].contiguous()  # (Hkv, r, d) orthonormal rows
            plans.append(LayerPlan(mode="post-rope", ranks=[r] * lay.num_kv_heads, q_map=rows, k_map=rows.clone(),
                                   window=window, sink=sink, k_bits=k_bits, k_group=8,
                                   v_bits=v_bits, v_group=8))
        apply_lowrank(model, plans)
    tok.padding_side = "left"
    return model.eval(), tok


def _gen(model, tok, prompts, **kw):
    enc = tok(prompts, return_tensors="pt", padding=True)
    args = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=tok.pad_token_id, do_sample=False,
                return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        return model.generate(**enc, **{**args, **kw})


STRATEGIES = {
    "greedy": {},
    "sample": dict(do_sample=True, num_return_sequences=2, top_k=0),
    "beam": dict(num_beams=3),
    "beam-nrs": dict(num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_generates_the_dense_tokens(kind, strategy):
    dense, tok = _model(kind, None)
    comp, _ = _model(kind, 1.0)
    kw = STRATEGIES[strategy]
    torch.manual_seed(0)
    a = _gen(dense, tok, PROMPTS, **kw)
    torch.manual_seed(0)
    b = _gen(comp, tok, PROMPTS, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert a.sequences.shape[0] == 2 * kw.get("num_return_sequences", 1)
    if "num_beams" in kw:  # beam scores see every reorder: a stale row would move them
        torch.testing.assert_close(b.sequences_scores, a.sequences_scores, rtol=0, atol=1e-4)
    else:
        torch.testing.assert_close(torch.stack(b.scores), torch.stack(a.scores), rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_half_rank_left_padded_batch_generates_what_each_prompt_does_alone(kind):
    comp, tok = _model(kind, 0.5)
    batch = _gen(comp, tok, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = _gen(comp, tok, [prompt])
        assert torch.equal(batch.sequences[i, -NEW:], alone.sequences[0, -NEW:]), f"row {i}"
        # logits too: the sink of a padded row is its first real token, not a pad
        torch.testing.assert_close(torch.stack(batch.scores)[:, i], torch.stack(alone.scores)[:, 0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma3"])
def test_half_rank_beam_batch_equals_alone(kind):
    comp, tok = _model(kind, 0.5)
    batch = _gen(comp, tok, PROMPTS, num_beams=3, num_return_sequences=3)
    for i, prompt in enumerate(PROMPTS):
        alone = _gen(comp, tok, [prompt], num_beams=3, num_return_sequences=3)
        assert torch.equal(batch.sequences[3 * i : 3 * i + 3, -NEW:], alone.sequences[:, -NEW:])
        torch.testing.assert_close(batch.sequences_scores[3 * i : 3 * i + 3], alone.sequences_scores, rtol=0, atol=1e-4)


def test_quantised_cache_generates_with_beams_and_padding():
    comp, tok = _model("tiny-llama", 0.5, k_bits=4)
    out = _gen(comp, tok, PROMPTS, num_beams=3, max_new_tokens=24, min_new_tokens=24)  # past several 8-token groups
    assert out.sequences.shape == (2, tok(PROMPTS, padding=True, return_tensors="pt").input_ids.shape[1] + 24)
    assert torch.isfinite(out.sequences_scores).all()


def _fill(layer: LowRankKeyLayer, full: torch.Tensor, proj: torch.Tensor, vals: torch.Tensor, first=None):
    layer.append(full[..., :12, :], proj[..., :12, :], vals[..., :12, :], first_real=first)
    for t in range(12, full.shape[-2]):
        layer.append(full[..., t : t + 1, :], proj[..., t : t + 1, :], vals[..., t : t + 1, :])


def test_reorder_cache_moves_every_per_row_tensor():
    """Beam search's reorder on a cache holding projected, quantised, exact-window and sink keys and quantised
    values equals the cache of the reordered rows."""
    g = torch.Generator().manual_seed(0)
    b, h, t, d, r = 3, 2, 30, 16, 6
    full, vals = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
    proj = torch.randn(b, h, t, r, generator=g)
    first = torch.tensor([0, 2, 5])
    idx = torch.tensor([2, 2, 0])

    def layer():
        return LowRankKeyLayer(window=4, quantizer=GroupQuantizer(4, 8), sink=1, v_quantizer=TokenQuantizer(4, 8),
                               v_window=3)

    a = layer()
    _fill(a, full, proj, vals, first)
    a.reorder_cache(idx)
    ref = layer()
    _fill(ref, full[idx], proj[idx], vals[idx], first[idx])
    assert a.n_quantized == ref.n_quantized > 0
    for name in LowRankKeyLayer._PER_ROW:
        x, y = getattr(a, name), getattr(ref, name)
        assert x is not None and torch.equal(x, y), name
    assert torch.equal(a.sink_keys[:, :, 0], full[idx, :, first[idx]])  # each row's first real key
    a.batch_select_indices(torch.tensor([1]))
    assert a.sink_start.tolist() == [5] and a.qcodes.shape[0] == 1


def test_crop_is_refused_but_crop_zero_is_a_no_op():
    layer = LowRankKeyLayer(window=2)
    x = torch.randn(1, 2, 5, 8)
    layer.append(x, x[..., :4], x)
    layer.crop(0)
    assert layer.get_seq_length() == 5
    with pytest.raises(UnsupportedCacheError, match="assisted"):
        layer.crop(-1)
    assert isinstance(UnsupportedCacheError("x"), LowrankAttnError)


@pytest.mark.parametrize("kw, match", [
    (dict(cache_implementation="static"), "StaticCache"),
    (dict(cache_implementation="offloaded"), "offloaded"),
    (dict(prompt_lookup_num_tokens=3), "assisted"),
])
def test_unsupported_generation_is_refused(kw, match):
    comp, tok = _model("tiny-llama", 0.5)
    with pytest.raises(UnsupportedCacheError, match=match):
        _gen(comp, tok, ["abcabcabcabcabcabc abcabc abc"], max_new_tokens=16, min_new_tokens=16, **kw)


def test_eager_masks_give_the_sdpa_results_and_flex_is_refused():
    comp, tok = _model("tiny-qwen2", 0.5)
    sdpa = _gen(comp, tok, PROMPTS)
    comp.set_attn_implementation("eager")
    eager = _gen(comp, tok, PROMPTS)
    assert torch.equal(eager.sequences, sdpa.sequences)
    torch.testing.assert_close(torch.stack(eager.scores), torch.stack(sdpa.scores), rtol=0, atol=1e-4)
    comp.set_attn_implementation("flex_attention")
    with pytest.raises(UnsupportedCacheError, match="sdpa"):
        _gen(comp, tok, PROMPTS)


def test_a_cache_passed_in_is_used_and_reusable():
    comp, tok = _model("tiny-llama", 0.5)
    cache = DynamicCache(config=comp.config)
    out = _gen(comp, tok, PROMPTS, past_key_values=cache)
    assert all(isinstance(layer, LowRankKeyLayer) for layer in cache.layers)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1


@pytest.mark.parametrize("kind", KINDS)
def test_exact_prefill_attends_the_prompt_densely_and_stores_it_compressed(kind):
    """``prefill: exact``, the default of a post-rope model: a prompt from an empty cache (or without one) gets the
    dense model's logits, left padding included, while the cache stores exactly what a compressed prefill stores;
    ``set_prefill(model, "compressed")`` gives the compressed logits, and back to "exact" the dense ones again;
    ``prefill_as`` sets one within a block and restores each layer's. Bad values and dense models are refused."""
    from lowrank_attn.runtime.kcache import kv_cache_bytes
    from lowrank_attn.runtime.surgery import prefill_as, prefill_of, set_prefill

    dense, tok = _model(kind, None)
    comp, _ = _model(kind, 0.5, k_bits=4)
    assert (prefill_of(comp), prefill_of(dense)) == ("exact", None)  # the default where the mode keeps full keys
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc.attention_mask.bool()

    def prefill(model):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            return model(**enc, past_key_values=cache, use_cache=True).logits[real], kv_cache_bytes(cache)

    want, _ = prefill(dense)
    with prefill_as(comp, "compressed"):
        compressed, stored = prefill(comp)
    assert prefill_of(comp) == "exact"  # restored
    assert not torch.allclose(compressed, want, atol=1e-3)  # the compression shows in a compressed prefill
    got, stored_exact = prefill(comp)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert stored_exact == stored
    with torch.no_grad():
        torch.testing.assert_close(comp(**enc, use_cache=False).logits[real], want, rtol=1e-4, atol=1e-4)
    assert _gen(comp, tok, PROMPTS).sequences.shape[1] == enc.input_ids.shape[1] + NEW
    set_prefill(comp, "compressed")
    torch.testing.assert_close(prefill(comp)[0], compressed, rtol=0, atol=0)
    set_prefill(comp, "exact")
    torch.testing.assert_close(prefill(comp)[0], got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prefill must be one of"):
        set_prefill(comp, "fast")
    with pytest.raises(ValueError, match="no compressed attention"):
        set_prefill(dense, "exact")


def _check_second_chunk(comp, ids, want):
    """After a one-token first chunk, the second chunk's logits are ``want`` with the default exact prefill, and
    not with ``prefill: compressed``."""
    from lowrank_attn.runtime.surgery import set_prefill

    def second_chunk():
        cache = DynamicCache(config=comp.config)
        with torch.no_grad():
            comp(ids[:, :1], past_key_values=cache, use_cache=True)
            return comp(ids[:, 1:], past_key_values=cache, use_cache=True).logits

    torch.testing.assert_close(second_chunk(), want, rtol=1e-4, atol=1e-4)
    set_prefill(comp, "compressed")
    assert not torch.allclose(second_chunk(), want, atol=1e-3)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2"])
def test_exact_prefill_of_a_chunk_attends_its_own_tokens_exactly(kind):
    """A chunk after cached tokens, ``prefill: exact``: its own keys and values exact, the cached ones as stored. After
    a first chunk of one token (an exact sink key, an unquantised value), the second chunk's logits are the dense
    model's (the default); with ``prefill: compressed`` they are not. (Not tiny-gemma3: its sliding layers keep no sink,
    so the first token's key stays compressed there.)"""
    dense, tok = _model(kind, None)
    comp, _ = _model(kind, 0.5, k_bits=4)
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        want = dense(ids).logits[:, 1:]
    _check_second_chunk(comp, ids, want)


def test_exact_prefill_of_a_chunk_attends_its_own_values_unquantised():
    """A chunk after cached tokens with 2-bit values, ``prefill: exact``: its own values attended as computed, the
    cached ones as stored. After a first chunk of one token (its key an exact sink, its value stored quantised), the
    second chunk's logits are those of the dense model in which token 0 shows every layer what the first chunk
    cached: its exact key and its value through the cache's quantiser (``k_proj``/``v_proj`` hooked); with
    ``prefill: compressed`` (every value read back from the 2-bit cache) they are not."""
    dense, tok = _model("tiny-llama", None)
    comp, _ = _model("tiny-llama", 0.5, v_bits=2)
    lay = adapters.head_layout(dense)
    quantizer = TokenQuantizer(2, 8)
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    attns = adapters.attention_modules(dense)

    def forward_hooked(x, hook):  # hook(layer, proj) → a forward hook on that projection of every layer
        hooks = [getattr(a, name).register_forward_hook(hook(i, name)) for i, a in enumerate(attns)
                 for name in ("k_proj", "v_proj")]
        try:
            with torch.no_grad():
                return dense(x).logits
        finally:
            for h in hooks:
                h.remove()

    first = {}  # (layer, proj) → token 0's projection (B, 1, Hkv·d) when it is alone, as the first chunk computed it
    forward_hooked(ids[:, :1], lambda i, name: lambda _m, _a, out: first.__setitem__((i, name), out.clone()))

    def as_cached(i, name):
        def hook(_m, _a, out):
            x0 = first[i, name]
            if name == "v_proj":
                v0 = x0.unflatten(-1, (lay.num_kv_heads, lay.head_dim)).transpose(1, 2)  # (B, Hkv, 1, d)
                x0 = quantizer.dequantize(*quantizer.quantize(v0)).transpose(1, 2).flatten(-2)
            return torch.cat([x0, out[:, 1:]], dim=1)
        return hook

    want = forward_hooked(ids, as_cached)[:, 1:]
    with torch.no_grad():
        assert not torch.allclose(want, dense(ids).logits[:, 1:], atol=1e-3)  # the quantised first value shows
    _check_second_chunk(comp, ids, want)
