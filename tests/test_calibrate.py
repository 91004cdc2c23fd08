"""calibrate.py: the attention hook sees the q/k that enter the dot product, keeps every
mask, leaves the model as it found it; GramStats streams in constant memory; analyze()
runs end to end on every tiny architecture."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from lowrank_attn.runtime import adapters
from lowrank_attn.analysis import analyze, collect_grams, pooled
from lowrank_attn.calibrate import GramStats, _configs, attention_hook
from lowrank_attn.texts import Text, Window, token_windows
from lowrank_attn.tiny import TINY_KINDS

SEQ = 80  # longer than tiny-gemma3's sliding window (32)


def random_ids(n: int = SEQ, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def registry_state(model) -> tuple:
    return (sorted(ALL_ATTENTION_FUNCTIONS.keys()), sorted(ALL_MASK_ATTENTION_FUNCTIONS.keys()),
            [c._attn_implementation_internal for c in _configs(model)])


def logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


# --- (a) the hook sees exactly what enters the dot product -----------------------------------

@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gpt2"])
def test_hook_qk_reproduce_eager_attention_probabilities(tiny_factory, kind):
    model, _ = tiny_factory(kind)
    layout = adapters.head_layout(model)
    ids = random_ids()
    caught = {}

    def fn(layer, q, k, mask, scaling):
        caught[layer] = (q.detach().double().clone(), k.detach().double().clone(), scaling)

    with attention_hook(model, fn), torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    assert sorted(caught) == list(range(layout.num_layers))

    model.set_attn_implementation("eager")
    with torch.inference_mode():
        probs = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
    assert len(probs) == layout.num_layers

    cfg = adapters.text_config(model)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * layout.num_layers
    window = getattr(cfg, "sliding_window", None)
    i = torch.arange(SEQ)[:, None]
    j = torch.arange(SEQ)[None, :]
    n_sliding = 0
    for layer, (q, k, scale) in caught.items():
        assert q.shape == (1, layout.num_heads, SEQ, layout.head_dim)
        assert k.shape == (1, layout.num_kv_heads, SEQ, layout.head_dim)
        allowed = j <= i
        if layer_types[layer] == "sliding_attention":
            allowed = allowed & (i - j < window)
            n_sliding += 1
        k_rep = k.repeat_interleave(layout.group_size, dim=1)  # GQA: query head h reads KV head h // g
        scores = scale * q @ k_rep.transpose(-1, -2)
        rebuilt = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        torch.testing.assert_close(rebuilt, probs[layer].double(), atol=1e-5, rtol=0,
                                   msg=lambda m: f"{kind} layer {layer}: {m}")
    if kind == "tiny-gemma3":
        assert n_sliding == 2  # the window really was exercised (SEQ > window)
        assert SEQ > window


def test_hook_sees_normed_rotated_queries_on_gemma3(tiny_gemma3):
    """q/k norm and RoPE sit between the projection and the dot product. RoPE keeps each
    vector's length, the norm does not: the hook's vectors have the lengths of the *normed*
    projections and differ from the normed projections themselves (rotated)."""
    model, _ = tiny_gemma3
    layout = adapters.head_layout(model)
    assert layout.has_qk_norm and layout.has_rope
    attn0 = adapters.attention_modules(model)[0]
    raw, seen = {}, {}
    hooks = [attn0.q_proj.register_forward_hook(lambda m, i, o: raw.setdefault("q", o.detach().clone())),
             attn0.k_proj.register_forward_hook(lambda m, i, o: raw.setdefault("k", o.detach().clone()))]
    try:
        with attention_hook(model, lambda l, q, k, mask, s: seen.setdefault(l, (q.detach().clone(), k.detach().clone()))):
            logits(model, random_ids(16))
    finally:
        for h in hooks:
            h.remove()
    d = layout.head_dim
    q_seen, k_seen = seen[0]
    with torch.no_grad():
        for proj, normer, got in ((raw["q"], attn0.q_norm, q_seen), (raw["k"], attn0.k_norm, k_seen)):
            heads = proj.view(1, 16, -1, d).transpose(1, 2)
            normed = normer(heads)
            torch.testing.assert_close(got.norm(dim=-1), normed.norm(dim=-1), atol=1e-5, rtol=1e-5)
            assert (got.norm(dim=-1) - heads.norm(dim=-1)).abs().max() > 1e-2  # the norm was applied
            assert (got[..., 1:, :] - normed[..., 1:, :]).abs().max() > 1e-3  # and RoPE rotated it


# --- (b) delegation keeps the masks ----------------------------------------------------------

@pytest.mark.parametrize("kind", TINY_KINDS)
def test_hooked_forward_equals_stock_sdpa(tiny_factory, kind):
    model, _ = tiny_factory(kind)
    # gemma2 runs eager (sdpa refuses its logit soft cap): the hook delegates to its modeling file's eager function
    assert model.config._attn_implementation == ("eager" if kind == "tiny-gemma2" else "sdpa")
    ids = random_ids(SEQ, batch=2, seed=3)
    ref = logits(model, ids)
    with attention_hook(model, lambda *a: None):
        hooked = logits(model, ids)
    torch.testing.assert_close(hooked, ref, atol=1e-5, rtol=1e-5)


def test_hooked_forward_from_eager_model_keeps_masks(tiny_gemma3):
    """A model set to eager (not in the registry) is delegated to sdpa with sdpa's masks."""
    model, _ = tiny_gemma3
    ids = random_ids(seed=4)
    ref = logits(model, ids)
    model.set_attn_implementation("eager")
    with attention_hook(model, lambda *a: None):
        hooked = logits(model, ids)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(hooked, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_check_is_not_vacuous(tiny_gemma3):
    """Negative control for the test above: registering the attention function alone (no mask
    function, the DESIGN §7 pitfall) changes Gemma-3's logits beyond its window."""
    model, _ = tiny_gemma3
    ids = random_ids(seed=5)
    ref = logits(model, ids)
    name = "lowrank_test_nomask"
    configs = _configs(model)
    before = [c._attn_implementation_internal for c in configs]
    AttentionInterface.register(name, ALL_ATTENTION_FUNCTIONS["sdpa"])
    try:
        for c in configs:
            c._attn_implementation_internal = name
        broken = logits(model, ids)
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation_internal = b
        AttentionInterface._global_mapping.pop(name, None)
    assert (broken - ref).abs().max() > 1e-3


# --- (c) calibration leaves the model unchanged ----------------------------------------------

def _windows(n: int, seq: int = 48, name: str = "t", seed: int = 0) -> list[Window]:
    ids = random_ids(seq, batch=n, seed=seed)
    return [Window(text_name=name, input_ids=row) for row in ids]


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma3"])
def test_collect_grams_leaves_model_unchanged(tiny_factory, kind):
    model, _ = tiny_factory(kind)
    ids = random_ids(seed=6)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    reg0 = registry_state(model)
    before = logits(model, ids)
    stats = collect_grams(model, _windows(3), progress=False)
    assert set(stats) == {"t"}
    assert registry_state(model) == reg0
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    after = logits(model, ids)
    assert torch.equal(before, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state0[k]), k


def test_callback_exception_propagates_and_restores(tiny_llama):
    model, _ = tiny_llama
    reg0 = registry_state(model)
    ids = random_ids(seed=7)
    before = logits(model, ids)
    calls = []

    class Boom(RuntimeError):
        pass

    def fn(layer, q, k, mask, scaling):
        calls.append(layer)
        if layer == 1:
            raise Boom("mid-pass")

    with pytest.raises(Boom, match="mid-pass"):
        with attention_hook(model, fn):
            logits(model, ids)
    assert calls == [0, 1]
    assert registry_state(model) == reg0
    assert torch.equal(logits(model, ids), before)


def test_collect_grams_exception_mid_pass_restores(tiny_gemma3):
    """An exception inside the forward (here from the second decoder layer) leaves no hook behind."""
    model, _ = tiny_gemma3
    reg0 = registry_state(model)
    ids = random_ids(seed=8)
    before = logits(model, ids)

    def boom(module, args):
        raise KeyboardInterrupt  # the hardest case: not an Exception

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect_grams(model, _windows(2), progress=False)
    finally:
        handle.remove()
    assert registry_state(model) == reg0
    assert torch.equal(logits(model, ids), before)


# --- (d) GramStats: constant memory, per-text sums to pooled ---------------------------------

def _nbytes(s: GramStats) -> int:
    return sum(getattr(s, a).nbytes for a in ("gq", "skk", "sk", "n", "scale"))


def test_gramstats_memory_independent_of_tokens(tiny_llama):
    model, _ = tiny_llama
    one = collect_grams(model, _windows(1), progress=False)["t"]
    ten = collect_grams(model, _windows(10), progress=False)["t"]
    assert _nbytes(one) == _nbytes(ten)
    for a in ("gq", "skk", "sk", "n", "scale"):
        assert getattr(one, a).shape == getattr(ten, a).shape
        assert getattr(one, a).dtype == getattr(ten, a).dtype
    assert ten.gq.dtype == np.float64
    assert int(ten.n[0]) == 10 * 48 and int(one.n[0]) == 48


def test_per_text_stats_sum_to_pooled(tiny_llama):
    model, tok = tiny_llama
    texts = [Text("a", "The quick brown fox jumps over the lazy dog. " * 12),
             Text("b", "Call me Ishmael. Some years ago, never mind how long. " * 10)]
    windows = token_windows(tok, texts, seq_len=64)
    per_text = collect_grams(model, windows, progress=False)
    assert list(per_text) == ["a", "b"]
    total = pooled(per_text)
    # the same windows collected as one text
    single = collect_grams(model, [Window("all", w.input_ids) for w in windows], progress=False)["all"]
    for a in ("gq", "skk", "sk"):
        summed = getattr(per_text["a"], a) + getattr(per_text["b"], a)
        np.testing.assert_allclose(getattr(total, a), summed, rtol=1e-12, atol=0)
        np.testing.assert_allclose(getattr(total, a), getattr(single, a), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(total.n, per_text["a"].n + per_text["b"].n)
    assert int(total.n[0]) == sum(len(w.input_ids) for w in windows)
    # the centred key Gram of the pool is not the sum of per-text centred Grams (different means),
    # but equals the one computed from the summed raw moments
    np.testing.assert_allclose(total.key_gram_centred(0), single.key_gram_centred(0), rtol=1e-9, atol=1e-9)


def test_batch_size_does_not_change_statistics(tiny_llama):
    model, _ = tiny_llama
    w = _windows(5)
    s1 = collect_grams(model, w, batch_size=1, progress=False)["t"]
    s3 = collect_grams(model, w, batch_size=3, progress=False)["t"]
    np.testing.assert_array_equal(s1.n, s3.n)
    for a in ("gq", "skk", "sk"):
        np.testing.assert_allclose(getattr(s1, a), getattr(s3, a), rtol=1e-5, atol=1e-6)


def test_gramstats_add_mismatched_shapes_refused():
    a, b = GramStats(2, 4, 2, 16), GramStats(2, 4, 4, 16)
    with pytest.raises(ValueError):
        a += b


def test_non_finite_statistics_are_reported():
    from lowrank_attn.errors import StatisticsError

    s = GramStats(2, 2, 1, 4)
    q = torch.ones(1, 2, 3, 4)
    q[0, 0, 0, 0] = float("nan")
    s.add(1, q, torch.ones(1, 1, 3, 4), 0.5)
    with pytest.raises(StatisticsError, match="layers \\[1\\]"):
        s.check_finite()


# --- (e) every tiny kind through analyze() ---------------------------------------------------

@pytest.mark.parametrize("kind", TINY_KINDS)
def test_analyze_end_to_end_tiny(tiny_factory, kind, tmp_path):
    from lowrank_attn.models import LoadedModel

    model, tok = tiny_factory(kind)
    f1, f2 = tmp_path / "one.txt", tmp_path / "two.txt"
    f1.write_text("It was the best of times, it was the worst of times. " * 8)
    f2.write_text("In a hole in the ground there lived a hobbit. " * 8)
    lm = LoadedModel(model=model, tokenizer=tok, name=kind, source="test")
    rep = analyze(lm, [str(f1), str(f2)], seq_len=64, progress=False)
    layout = adapters.head_layout(model)
    assert rep["schema"] == "lowrank-attn/spectra" and rep["version"] == 1
    assert rep["model"]["model_type"] == adapters.model_type(model)
    assert len(rep["layers"]) == layout.num_layers
    assert [t["name"] for t in rep["texts"]] == ["one", "two"]
    assert rep["tokens"] == sum(t["tokens"] for t in rep["texts"])
    for layer in rep["layers"]:
        assert layer["scale"] == pytest.approx(layout.head_dim ** -0.5)
        assert len(layer["kv_heads"]) == layout.num_kv_heads
        for h in layer["kv_heads"]:
            for key in ("logit_field", "weights"):
                e = np.array(h[key]["energy"])
                assert abs(e.sum() - 1) < 1e-9
                assert 1 <= h[key]["r90"] <= h[key]["r99"] <= layout.head_dim
            assert set(h["per_text"]) == {"one", "two"}
            assert len(h["query_heads"]) == layout.group_size
    assert [r["text"] for r in rep["summary"]] == ["one", "two", "pooled"]
    if kind == "tiny-gemma3":  # its tokenizer adds BOS: every window starts with it
        windows = token_windows(tok, [Text("one", f1.read_text())], seq_len=64)
        assert all(int(w.input_ids[0]) == tok.bos_token_id for w in windows)


def test_analyze_by_name_with_sampled_text():
    """--text sampled: the model samples its own calibration text (cached), and the report says so."""
    rep = analyze("tiny-llama", ["sampled"], seq_len=64, max_tokens=256, progress=False)
    assert rep["sampled_text"] is True
    assert [t["name"] for t in rep["texts"]] == ["model-sampled"]
    assert rep["tokens"] <= 256


def test_default_text_is_the_builtin_sample():
    """No --text: the public-domain excerpts shipped inside the package (no file outside it is read)."""
    rep = analyze("tiny-llama", None, seq_len=64, max_tokens=512, progress=False)
    assert rep["sampled_text"] is False
    assert {t["name"] for t in rep["texts"]} <= {f"gutenberg/{n}" for n in (
        "alice-in-wonderland", "dracula", "frankenstein", "moby-dick", "pride-and-prejudice", "sherlock-holmes",
        "tale-of-two-cities", "tom-sawyer")}


def test_unknown_builtin_text_is_one_line():
    from lowrank_attn.errors import TextError
    from lowrank_attn.texts import load_texts

    with pytest.raises(TextError, match="no built-in text 'builtin:nope' .available: builtin:gutenberg"):
        load_texts(["builtin:nope"])


def test_non_finite_fit_statistics_of_a_float16_model_name_the_dtype():
    """Gemma-3 in float16 overflows (measured: eval/results/precision); the error says so and what to use."""
    from lowrank_attn.calibrate import FitStats
    from lowrank_attn.errors import StatisticsError

    s = FitStats(1, 2, 1, 4, weighting="none", window=0)
    s.gq[0, 0, 0, 0] = float("inf")
    with pytest.raises(StatisticsError, match="float16.*use bfloat16") as e:
        s.check_finite(torch.float16)
    with pytest.raises(StatisticsError) as e32:
        s.check_finite(torch.float32)
    assert "float16" not in str(e32.value) and "gq" in str(e.value)


# --- (e) the statistics pass attends once: its own attention output stands in for the model's -------------------

@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_statistics_forward_reproduces_the_model(tiny_factory, kind):
    """FitStats computes every attention weight for its moments and hands the hook the attention output from
    them, which replaces the model's own attention (soft-capped layers keep theirs): the logits of the
    statistics forward equal the plain forward's, sliding windows, GQA and every family included."""
    from lowrank_attn.stats import FitStats

    model, _ = tiny_factory(kind)
    ids = random_ids()
    plain = logits(model, ids)
    lay = adapters.head_layout(model)
    st = FitStats(lay.num_layers, lay.num_heads, lay.num_kv_heads, lay.head_dim, weighting="attention", window=4)
    with attention_hook(model, st.add, with_values=True):
        hooked = logits(model, ids)
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-4)
    assert st.tokens == SEQ
