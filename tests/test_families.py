"""Every architecture family in ``adapters.SUPPORTED``: a tiny random model built from the family's stock
transformers config, compressed at full rank with the default recipe (mode auto, exact window 64, budget
policy), reproduces the dense logits uncached and cached (prefill + decode steps); the calibration hook sees
the q/k the adapter computes; per-layer facts (RoPE/NoPE, sliding window, soft cap) match the model; other
architectures are refused by name."""

from __future__ import annotations

import pytest
import torch

from lowrank_attn.calibrate import attention_hook
from lowrank_attn.compression import compress
from lowrank_attn.errors import RecipeError, UnsupportedModelError
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime import adapters
from lowrank_attn.runtime.kernels import apply_rope
from lowrank_attn.runtime.kcache import LowRankKeyLayer
from lowrank_attn.runtime.surgery import prefill_as
from lowrank_attn.texts import load_texts, token_windows
from lowrank_attn.tiny import TINY_KINDS, TINY_MODEL_TYPES

pytestmark = pytest.mark.usefixtures("single_thread")

N = 160  # > the tiny sliding windows (32) and the default exact window (64): every kind of pair is exercised
PREFILL = 140

# per-layer facts of the tiny models that differ from "RoPE on every layer, no window, no cap"
FACTS = {
    "tiny-mistral": dict(sliding=[32, 32]),
    "tiny-gemma2": dict(sliding=[32, None, 32], softcap=5.0),
    "tiny-gemma3": dict(sliding=[32, 32, None]),
    "tiny-smollm3": dict(rope=[True, False]),
    "tiny-gpt2": dict(rope=[False, False]),
}


def _recipe(kind, text, **kw):
    return Recipe(**{**dict(model=kind, text=[text], rank_ratio=1.0, k_bits=None, v_bits=None, seq_len=128, max_tokens=1024,
                            heldout_tokens=256), **kw})


def _ids(kind, text, n=N, index=3):
    return token_windows(load_model(kind).tokenizer, load_texts([text]), seq_len=n)[index].input_ids[None]


def _logits(model, ids, pos=None):
    """A compressed model's logits with prompts attending over what the cache stores (``prefill: compressed``):
    what these tests check; a default (exact) prefill would give the dense logits."""
    with torch.no_grad(), prefill_as(model, "compressed"):
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits


def test_supported_is_exactly_the_tested_families():
    assert sorted(TINY_MODEL_TYPES) == sorted(TINY_KINDS)
    assert sorted(TINY_MODEL_TYPES.values()) == adapters.SUPPORTED
    for kind, mt in TINY_MODEL_TYPES.items():
        assert adapters.model_type(load_model(kind).model) == mt


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_full_rank_defaults_reproduce_dense_logits(kind, public_text):
    """Defaults at full rank: uncached at two position offsets, then a 140-token prefill and 20 decode
    steps through the low-rank K cache, each step against the dense model's logits."""
    dense = load_model(kind).model
    lm, report = compress(load_model(kind), _recipe(kind, public_text), progress=False)
    assert report["mode"] == "post-rope" and report["recipe"]["exact_window"] == 128 // 8  # default: seq_len/8
    assert all(h["rank"] == adapters.head_layout(dense).head_dim for lay in report["layers"] for h in lay["kv_heads"])
    assert all(type(m).__name__.startswith("LowRank") for m in adapters.attention_modules(lm.model))
    ids = _ids(kind, public_text)
    ref = _logits(dense, ids)
    for offset in (0, 37):
        pos = torch.arange(N)[None] + offset
        diff = float((_logits(dense, ids, pos) - _logits(lm.model, ids, pos)).abs().max())
        assert diff < 1e-4, f"{kind} offset {offset}: max |Δlogit| = {diff:.3g}"
    with torch.no_grad(), prefill_as(lm.model, "compressed"):
        out = lm.model(input_ids=ids[:, :PREFILL], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(PREFILL, N):
            out = lm.model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert all(isinstance(layer, LowRankKeyLayer) for layer in cache.layers)
    diff = float((torch.stack(steps, 1) - ref[:, PREFILL - 1 :]).abs().max())
    assert diff < 1e-4, f"{kind} cached: max |Δlogit| = {diff:.3g}"


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_reduced_rank_is_live(kind, public_text):
    """The full-rank check is not vacuous: at a quarter rank without exact keys the logits move."""
    dense = load_model(kind).model
    lm, _ = compress(load_model(kind), _recipe(kind, public_text, rank_ratio=0.25, exact_window=0, policy="uniform",
                                               heldout_tokens=0), progress=False)
    ids = _ids(kind, public_text, 64)
    assert float((_logits(dense, ids) - _logits(lm.model, ids)).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-mistral", "tiny-gemma2", "tiny-phi3", "tiny-smollm3"])
def test_rope_pairs_full_rank_exact(kind, public_text):
    """rope-pairs row selection through the adapter: fused qkv_proj (phi3), NoPE layers (smollm3), soft cap."""
    dense = load_model(kind).model
    lm, report = compress(load_model(kind), _recipe(kind, public_text, mode="rope-pairs", exact_window=0),
                          progress=False)
    assert report["mode"] == "rope-pairs"
    ids = _ids(kind, public_text, 96)
    assert float((_logits(dense, ids) - _logits(lm.model, ids)).abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["tiny-phi3", "tiny-olmo2"])
def test_weight_svd_fold_full_rank_exact(kind, public_text):
    """The weight-SVD query fold on a fused qkv_proj (phi3) and under a q/k norm over all heads (olmo2: the fold
    acts before the norm, so only full rank is exact there)."""
    dense = load_model(kind).model
    lm, _ = compress(load_model(kind), _recipe(kind, public_text, fit="weight-svd", exact_window=0), progress=False)
    ids = _ids(kind, public_text, 96)
    assert float((_logits(dense, ids) - _logits(lm.model, ids)).abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["tiny-qwen3", "tiny-gemma3", "tiny-olmo2"])
def test_rope_pairs_refused_under_qk_norm(kind, public_text):
    with pytest.raises(RecipeError, match="q/k norm"):
        compress(load_model(kind), _recipe(kind, public_text, mode="rope-pairs", exact_window=0), progress=False)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_layer_facts(kind):
    """RoPE/NoPE, sliding window and soft cap per layer, and RoPE frequencies that reproduce the model's own
    rotary embedding."""
    model = load_model(kind).model
    fam = adapters.adapter(model)
    n = fam.num_layers
    facts = FACTS.get(kind, {})
    assert [fam.uses_rope(i) for i in range(n)] == facts.get("rope", [True] * n)
    assert adapters.sliding_windows(model) == facts.get("sliding", [None] * n)
    assert [fam.softcap(i) for i in range(n)] == [facts.get("softcap")] * n
    for i, attn in enumerate(fam.attention_modules()):  # the stock module agrees where it says
        if hasattr(attn, "sliding_window"):
            assert attn.sliding_window == fam.sliding_window(i)
        if hasattr(attn, "use_rope"):
            assert bool(attn.use_rope) == fam.uses_rope(i)
        if hasattr(attn, "attn_logit_softcapping"):
            assert attn.attn_logit_softcapping == fam.softcap(i)
        inv = fam.rope_inv_freq(i)
        if not fam.uses_rope(i):
            assert inv is None
            continue
        assert inv.shape == (fam.head_dim // 2,)
        base = getattr(model, "model", model)
        rotary = base.rotary_emb
        pos = torch.tensor([[0, 5, 1000]])
        x = torch.zeros(1, 3, 4)
        types = getattr(fam.config, "layer_types", None)
        cos, _ = rotary(x, pos, types[i]) if kind == "tiny-gemma3" else rotary(x, pos)
        torch.testing.assert_close(cos[0, :, : fam.head_dim // 2], torch.cos(pos[0, :, None].float() * inv[None]))


def test_gemma2_soft_cap_matters():
    """The tiny gemma2's logits reach its soft cap: turning the cap off changes the output."""
    model = load_model("tiny-gemma2").model
    ids = torch.arange(64)[None]
    capped = _logits(model, ids)
    for attn in adapters.attention_modules(model):
        attn.attn_logit_softcapping = None
    assert float((capped - _logits(model, ids)).abs().max()) > 1e-2


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_calibration_hook_sees_what_the_adapter_computes(kind):
    """The q/k the calibration hook records are the adapter's q/k after the family's norm placement and RoPE
    (none on NoPE layers): what enters the dot product. The hooked forward keeps the dense logits."""
    model = load_model(kind).model
    fam = adapters.adapter(model)
    ids = torch.arange(40)[None] + 3
    inputs, seen = {}, {}

    def grab(mod, args, kwargs, i):
        inputs[i] = (args[0] if args else kwargs["hidden_states"], kwargs.get("position_embeddings"))

    handles = [m.register_forward_pre_hook(lambda mod, a, kw, i=i: grab(mod, a, kw, i), with_kwargs=True)
               for i, m in enumerate(fam.attention_modules())]
    try:
        ref = _logits(model, ids)
        with attention_hook(model, lambda layer, q, k, mask, s: seen.__setitem__(layer, (q, k, s))):
            hooked = _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(hooked, ref, rtol=0, atol=1e-5)
    assert sorted(seen) == list(range(fam.num_layers))
    for i, attn in enumerate(fam.attention_modules()):
        hidden, rope = inputs[i]
        with torch.no_grad():
            q, k, _ = fam.qkv(attn, hidden)
            if fam.uses_rope(i):
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        torch.testing.assert_close(seen[i][0], q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen[i][1], k, rtol=1e-5, atol=1e-6)
        assert seen[i][2] == pytest.approx(attn.scaling)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_analyze_runs(kind, public_text):
    """analyze (spectra from the calibration hook and from the q/k weights) on every family."""
    from lowrank_attn.analysis import analyze

    rep = analyze(load_model(kind), [public_text], seq_len=64, max_tokens=256, progress=False)
    layout = adapters.head_layout(load_model(kind).model)
    assert len(rep["layers"]) == layout.num_layers
    for layer in rep["layers"]:
        assert len(layer["kv_heads"]) == layout.num_kv_heads
        for h in layer["kv_heads"]:
            for field in ("logit_field", "weights"):
                assert 1 <= h[field]["r90"] <= h[field]["r99"] <= layout.head_dim


def test_unsupported_architecture_refused_by_name(public_text):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="'gpt_neox' is not supported") as e:
        adapters.head_layout(model)
    assert all(mt in str(e.value) for mt in adapters.SUPPORTED)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_attention_output_norm_is_what_the_block_applies_to_the_attention_output(kind):
    """gemma2/gemma3/olmo2 normalise the attention output before the residual add; the adapter's norm must be
    that module (a hook doubling its input doubles what the block adds), and None on pre-norm blocks."""
    lm = load_model(kind)
    norm = adapters.attention_output_norm(lm.model, 0)
    expected = TINY_MODEL_TYPES[kind] in ("gemma2", "gemma3_text", "olmo2")
    assert (norm is not None) == expected
    if norm is None:
        return
    seen = {}
    attn = adapters.attention_modules(lm.model)[0]
    h1 = attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0].detach().clone()))
    h2 = norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm_in", a[0].detach().clone()))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.arange(3, 40)[None])
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(seen["norm_in"], seen["attn"], rtol=0, atol=0)
