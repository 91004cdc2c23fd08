"""compress() on tiny random models: exactness at full rank in every mode and position offset,
cached generation, measured K-cache bytes, the certificate, allocation policies, refusals, and
the closed form against the baselines on the calibration statistics."""

from __future__ import annotations

import pytest
import torch

from lowrank_attn.runtime import adapters
from lowrank_attn.calibrate import FitStats, run_hooked
from lowrank_attn.compression import compress, fit_all
from lowrank_attn.errors import RecipeError, TextError
from lowrank_attn.fit import logit_error
from lowrank_attn.runtime.kcache import LowRankKeyLayer, key_cache_bytes
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime.surgery import prefill_as, prefill_of, set_prefill
from lowrank_attn.texts import load_texts, token_windows

D = 16  # head_dim of every tiny model


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text(public_text):
    return public_text


@pytest.fixture(scope="module")
def ids_of(text):
    """ids_of(kind, n, index) -> (1, n) token ids from the text, away from its calibration windows' start."""
    cache = {}

    def get(kind, n, index=5):
        key = (kind, n, index)
        if key not in cache:
            tok = load_model(kind).tokenizer
            cache[key] = token_windows(tok, load_texts([text]), seq_len=n)[index].input_ids[None]
        return cache[key]

    return get


def _recipe(kind, text, **kw):
    base = dict(model=kind, policy="uniform", rank_ratio=0.5, seq_len=64, max_tokens=512, heldout_tokens=128,
                weighting="none", exact_window=0, text=[text], k_bits=None, v_bits=None)  # unquantised unless asked
    base.update(kw)
    return Recipe(**base)


def _compress(kind, text, **kw):
    """Compressed, prompts attending over what the cache stores (``prefill: compressed``): this file checks the
    compressed attention itself; the default exact prefill has its own tests (test_generate.py)."""
    lm, report = compress(load_model(kind), _recipe(kind, text, **kw), progress=False)
    if prefill_of(lm.model) is not None:  # None: nothing was compressed
        set_prefill(lm.model, "compressed")
    return lm, report


def _heads(report):
    return [h for layer in report["layers"] for h in layer["kv_heads"]]


def _logits(model, ids, pos=None, **kw):
    with torch.no_grad(), prefill_as(model, "compressed"):  # a compressed model: its compressed attention
        return model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits


# ---------------------------------------------------------------- (a) exact at full rank


FULL_RANK_CASES = [
    ("tiny-llama", "post-rope", 0),
    ("tiny-llama", "post-rope", 8),
    ("tiny-qwen2", "post-rope", 0),
    ("tiny-gemma3", "post-rope", 0),
    ("tiny-gemma3", "post-rope", 8),
    ("tiny-llama", "rope-pairs", 0),
    ("tiny-qwen2", "rope-pairs", 0),
    ("tiny-gpt2", "bilinear", 0),
    ("tiny-gpt2", "post-rope", 0),
]


@pytest.mark.parametrize("kind,mode,window", FULL_RANK_CASES)
def test_full_rank_reproduces_dense_logits(kind, mode, window, text, ids_of):
    dense = load_model(kind).model
    lm, report = _compress(kind, text, mode=mode, rank_ratio=1.0, ridge=0.0, exact_window=window, heldout_tokens=0)
    assert report["mode"] == mode
    assert all(h["rank"] == D for h in _heads(report))
    assert all(type(m).__name__.startswith("LowRank") for m in adapters.attention_modules(lm.model))
    n = 80  # longer than tiny-gemma3's sliding window (32)
    ids = ids_of(kind, n)
    ar = torch.arange(n)[None]
    positions = {"offset 0": ar, "offset 37": ar + 37, "offset 1000": ar + 1000,
                 "gapped": (ar * 7 + ar**2 // 9 + 3).clamp(max=2047)}  # non-uniform steps: RoPE must use position_ids
    for name, pos in positions.items():
        a, b = _logits(dense, ids, pos), _logits(lm.model, ids, pos)
        diff = float((a - b).abs().max())
        assert diff < 1e-4, f"{kind} {mode} window={window} {name}: max |Δlogit| = {diff:.3g}"


@pytest.mark.parametrize("kind,mode", [("tiny-llama", "post-rope"), ("tiny-llama", "rope-pairs"),
                                       ("tiny-gpt2", "bilinear")])
def test_reduced_rank_changes_logits(kind, mode, text, ids_of):
    """The full-rank check is not vacuous: at half rank the compressed path is live."""
    dense = load_model(kind).model
    lm, _ = _compress(kind, text, mode=mode, heldout_tokens=0)
    ids = ids_of(kind, 64)
    assert float((_logits(dense, ids) - _logits(lm.model, ids)).abs().max()) > 1e-3


def test_rope_pairs_is_shift_invariant(text, ids_of):
    """Selecting whole RoPE planes commutes with the rotation: logits depend on relative positions only."""
    lm, _ = _compress("tiny-llama", text, mode="rope-pairs", rank_ratio=0.25, heldout_tokens=0)
    ids = ids_of("tiny-llama", 64)
    ar = torch.arange(64)[None]
    base = _logits(lm.model, ids, ar)
    for off in (37, 1000):
        assert float((_logits(lm.model, ids, ar + off) - base).abs().max()) < 1e-4


def test_exact_sink_keys_are_exact(text, ids_of):
    """Keys at positions < exact_sink get exact logits: with a sink covering the whole sequence a rank-4
    model is the dense model; with a short sink, only the first positions' logits are exact."""
    ids = ids_of("tiny-llama", 48)
    dense = load_model("tiny-llama").model
    lm, _ = _compress("tiny-llama", text, rank_ratio=0.25, exact_sink=64)
    assert torch.allclose(_logits(lm.model, ids), _logits(dense, ids), atol=1e-4)
    low, _ = _compress("tiny-llama", text, rank_ratio=0.25, exact_sink=0)
    assert not torch.allclose(_logits(low.model, ids), _logits(dense, ids), atol=1e-3)
    lm, _ = _compress("tiny-llama", text, rank_ratio=0.25, exact_sink=4)
    first = _logits(lm.model, ids[:, :4])  # rows that see only sink keys
    assert torch.allclose(first, _logits(dense, ids[:, :4]), atol=1e-4)


def test_exact_window_per_layer(text):
    """An unset window is 256 at most seq_len/8; a sliding-window layer keeps at most 1/8 of its window exact
    (tiny-gemma3: sliding, sliding, full with a 32-key window), in the plans, the report and the fit statistics."""
    from lowrank_attn.compression import resolve_recipe
    from lowrank_attn.plans import exact_windows

    assert exact_windows(256, [512, None, 4096]) == [64, 256, 256]
    layout = adapters.head_layout(load_model("tiny-llama").model)
    window = lambda seq_len, **kw: resolve_recipe(Recipe(model="tiny-llama", **kw), layout, seq_len)[0].exact_window
    assert (window(2048, k_bits=None), window(2048, k_bits=4), window(2048, k_bits=2), window(64)) == (256, 64, 32, 8)
    assert window(2048) == 64  # the default: 4-bit keys
    assert window(2048, exact_window=100, k_bits=4) == 100  # set: as given
    lm, rep = _compress("tiny-gemma3", text, exact_window=None)  # seq_len 64: the default window is 8
    assert rep["recipe"]["exact_window"] == 8
    assert [layer["exact_window"] for layer in rep["layers"]] == [4, 4, 8]
    lm, rep = _compress("tiny-gemma3", text, exact_window=16, weighting="attention")
    assert [m.lowrank_plan.window for m in adapters.attention_modules(lm.model)] == [4, 4, 16]
    assert [layer["exact_window"] for layer in rep["layers"]] == [4, 4, 16]
    # the budget makes the cheap sliding layers full rank here: their keys are exact as stored, so no exact copies
    lm, rep = _compress("tiny-gemma3", text, exact_window=16, exact_sink=1, weighting="attention", policy="budget")
    plans = [m.lowrank_plan for m in adapters.attention_modules(lm.model)]
    assert any(p.r_max == D for p in plans) and any(p.r_max < D for p in plans)
    assert [(p.window, p.sink) for p in plans] == [(0, 0) if p.r_max == D else (w, 1) for p, w in zip(plans, (4, 4, 16))]
    lm, rep = _compress("tiny-gemma3", text, exact_window=16, exact_sink=1, weighting="attention", policy="budget",
                        k_bits=4)  # quantised keys are not exact at any rank: every layer keeps its exact keys
    assert [(m.lowrank_plan.window, m.lowrank_plan.sink) for m in adapters.attention_modules(lm.model)] == \
        [(4, 1), (4, 1), (16, 1)]


# ---------------------------------------------------------------- (b) generation with the cache


GEN_CASES = [
    ("tiny-llama", dict(mode="post-rope", exact_window=8, k_bits=4), 1e-3),
    ("tiny-llama", dict(mode="post-rope", exact_window=8), 1e-4),
    ("tiny-llama", dict(mode="post-rope", exact_window=8, exact_sink=2), 1e-4),
    ("tiny-qwen2", dict(mode="post-rope", exact_window=0, exact_sink=3, k_bits=4), 1e-3),
    ("tiny-gemma3", dict(mode="post-rope", exact_window=8, exact_sink=2), 1e-4),  # no sink on sliding layers
    ("tiny-llama", dict(mode="rope-pairs"), 1e-4),
    ("tiny-gemma3", dict(mode="post-rope", exact_window=8), 1e-4),  # cache beyond the sliding window
    ("tiny-gpt2", dict(mode="bilinear"), 1e-4),
]


@pytest.mark.parametrize("kind,kw,tol", GEN_CASES)
def test_cached_generation_matches_full_forwards(kind, kw, tol, text, ids_of):
    """Greedy generate (K cache of projected keys) == argmax of repeated full forwards without cache.

    With k_bits the incremental cache quantises a group once it leaves the window, while a full
    forward quantises by the final length, so earlier positions see slightly different keys: the
    tokens must agree, the logits only closely (tol)."""
    lm, _ = _compress(kind, text, heldout_tokens=0, **kw)
    prompt = ids_of(kind, 70)
    eos = lm.tokenizer.eos_token_id
    with torch.no_grad():
        out = lm.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                                min_new_tokens=20, pad_token_id=eos, output_logits=True, return_dict_in_generate=True)
    cache = out.past_key_values
    assert all(isinstance(layer, LowRankKeyLayer) for layer in cache.layers)
    cur = prompt
    for step, step_logits in enumerate(out.logits):
        ref = _logits(lm.model, cur)[0, -1]
        assert float((step_logits[0] - ref).abs().max()) < tol, f"step {step}"
        cur = torch.cat([cur, ref.argmax()[None, None]], dim=1)
    assert torch.equal(out.sequences, cur)


# ---------------------------------------------------------------- (c) the K cache really shrinks


def test_k_cache_bytes_shrink(text, ids_of):
    n, w = 600, 8
    ids = ids_of("tiny-llama", n, 0)
    dense = load_model("tiny-llama").model
    with torch.no_grad():
        dense_bytes = key_cache_bytes(dense(input_ids=ids, use_cache=True).past_key_values)
    lay = adapters.head_layout(dense)
    assert dense_bytes == lay.num_layers * lay.num_kv_heads * n * D * 4

    lm, report = _compress("tiny-llama", text, mode="post-rope", exact_window=w, heldout_tokens=0)
    r = report["layers"][0]["r_max"]
    assert r == 8 and all(layer["r_max"] == r for layer in report["layers"])
    with torch.no_grad():
        out = lm.model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    assert all(isinstance(layer, LowRankKeyLayer) for layer in cache.layers)
    assert all(layer.keys.shape[-1] == r and layer.keys.shape[-2] == n for layer in cache.layers)
    measured = key_cache_bytes(cache)
    sink = 1  # the default exact first key
    expected = lay.num_layers * lay.num_kv_heads * (n * r * 4 + (w + sink) * D * 4)
    assert abs(measured - expected) <= 0.05 * expected
    ratio = measured / dense_bytes
    assert ratio < 0.6, ratio
    assert ratio == pytest.approx(0.5 + w / n, rel=0.01)
    # the same logits with and without the cache
    torch.testing.assert_close(out.logits, _logits(lm.model, ids), rtol=0, atol=1e-4)

    lm4, _ = _compress("tiny-llama", text, mode="post-rope", exact_window=w, k_bits=4, k_group=32, heldout_tokens=0)
    with torch.no_grad():
        measured4 = key_cache_bytes(lm4.model(input_ids=ids, use_cache=True).past_key_values)
    n_q = (n - w) // 32 * 32
    expected4 = lay.num_layers * lay.num_kv_heads * (n_q * r // 2 + 2 * (n_q // 32) * r * 4 + (n - n_q) * r * 4 + (w + sink) * D * 4)
    assert measured4 == expected4
    assert measured4 < 0.75 * measured


# ---------------------------------------------------------------- (d) the certificate


CERT_CASES = [
    ("tiny-llama", dict(mode="post-rope")),
    ("tiny-llama", dict(mode="post-rope", exact_window=8, k_bits=4)),
    ("tiny-llama", dict(mode="post-rope", exact_window=8, exact_sink=2, weighting="attention")),
    ("tiny-qwen2", dict(mode="rope-pairs")),
    ("tiny-gemma3", dict(mode="post-rope")),
    ("tiny-gpt2", dict(mode="bilinear")),
]
CERT_KEYS = {"rows", "tv_mean", "tv_max", "kl_mean", "kl_max", "tv_bound_mean", "tv_bound_max", "kl_bound_mean",
             "kl_bound_max", "pmax_mean", "sink_fraction", "violations"}


@pytest.mark.parametrize("kind,kw", CERT_CASES)
def test_certificate_never_violated(kind, kw, text):
    lay = adapters.head_layout(load_model(kind).model)
    retained = {}
    for ratio in (0.25, 0.5, 0.75):
        _, report = _compress(kind, text, rank_ratio=ratio, **kw)
        assert len(report["layers"]) == lay.num_layers
        expect_r = int(round(ratio * D))
        expect_r += expect_r % 2 if kw["mode"] == "rope-pairs" else 0
        for li, layer in enumerate(report["layers"]):
            assert layer["layer"] == li and len(layer["kv_heads"]) == lay.num_kv_heads
            for j, h in enumerate(layer["kv_heads"]):
                assert h["kv_head"] == j and h["rank"] == expect_r
                assert 0.0 <= h["retained_energy"] <= 1.0
                c = h["certificate"]
                assert CERT_KEYS <= set(c)
                assert c["rows"] > 0
                assert c["violations"] == 0, (kind, ratio, li, j, c)
                assert c["tv_max"] <= c["tv_bound_max"] + 1e-6 and c["tv_mean"] <= c["tv_bound_mean"] + 1e-6
                assert c["kl_max"] <= c["kl_bound_max"] + 1e-6 and c["kl_mean"] <= c["kl_bound_mean"] + 1e-6
                assert c["tv_max"] > 0  # something was measured: reduced rank changes attention
                retained.setdefault((li, j), []).append(h["retained_energy"])
        assert report["summary"]["violations"] == 0
    for (li, j), vals in retained.items():  # more rank keeps more logit energy
        assert vals == sorted(vals), (li, j, vals)


# ---------------------------------------------------------------- (e) allocation policies


@pytest.mark.parametrize("mode", ["post-rope", "rope-pairs"])
def test_policies_produce_valid_ranks(mode, text):
    kind = "tiny-llama"
    lay = adapters.head_layout(load_model(kind).model)
    even = mode == "rope-pairs"

    def check(report):
        ranks = [h["rank"] for h in _heads(report)]
        assert len(ranks) == lay.num_layers * lay.num_kv_heads
        assert all(1 <= r <= D for r in ranks)
        if even:
            assert all(r % 2 == 0 for r in ranks), ranks
        for layer in report["layers"]:
            assert layer["r_max"] == max(h["rank"] for h in layer["kv_heads"])
        return ranks

    # uniform (0.3·16 = 4.8 → 5, and 6 when whole planes are kept)
    ranks = check(_compress(kind, text, mode=mode, rank_ratio=0.3)[1])
    assert set(ranks) == {6 if even else 5}

    # energy: every head keeps ≥ tau of its logit energy
    for tau in (0.5, 0.9):
        _, report = _compress(kind, text, mode=mode, policy="energy", tau=tau)
        check(report)
        assert all(h["retained_energy"] >= tau - 1e-6 for h in _heads(report))

    # budget: one rank per layer; the sum stays within the global budget
    for signal in ("energy", "output", "e2e"):  # e2e falls back to output for rope-pairs
        _, report = _compress(kind, text, mode=mode, policy="budget", rank_ratio=0.5, signal=signal)
        check(report)
        layer_ranks = [layer["r_max"] for layer in report["layers"]]
        for layer in report["layers"]:
            assert {h["rank"] for h in layer["kv_heads"]} == {layer["r_max"]}
        assert sum(layer_ranks) <= round(0.5 * D * lay.num_layers)
        assert sum(layer_ranks) >= round(0.5 * D * lay.num_layers) - (2 if even else 1)

    # bound: every head's certificate under epsilon, unless it is at full rank
    for eps in (0.02, 0.1):
        _, report = _compress(kind, text, mode=mode, policy="bound", epsilon=eps)
        check(report)
        for h in _heads(report):
            assert h["rank"] == D or h["certificate"]["tv_bound_mean"] <= eps + 1e-6, (eps, h)
    # with max_rank the cap wins
    _, report = _compress(kind, text, mode=mode, policy="bound", epsilon=1e-4, max_rank=8)
    assert max(check(report)) <= 8


def test_bound_policy_needs_heldout(text):
    with pytest.raises(RecipeError, match="held-out"):
        _compress("tiny-llama", text, policy="bound", heldout_tokens=0)


# ---------------------------------------------------------------- (f) mode refusals


@pytest.mark.parametrize("kind,kw,words", [
    ("tiny-llama", dict(mode="bilinear"), ["bilinear", "RoPE"]),
    ("tiny-qwen2", dict(mode="bilinear"), ["bilinear", "RoPE"]),
    ("tiny-gpt2", dict(mode="rope-pairs"), ["rope-pairs", "no RoPE"]),
    ("tiny-gemma3", dict(mode="rope-pairs"), ["rope-pairs", "q/k norm"]),
    ("tiny-gpt2", dict(mode="bilinear", exact_window=8), ["exact_window", "bilinear"]),
    ("tiny-llama", dict(mode="rope-pairs", exact_window=8), ["exact_window", "rope-pairs"]),
])
def test_mode_refusals(kind, kw, words, text):
    with pytest.raises(RecipeError) as e:
        _compress(kind, text, **kw)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_auto_mode(text):
    assert _compress("tiny-llama", text, mode="auto", heldout_tokens=0)[1]["mode"] == "post-rope"
    # post-rope for models without RoPE too: the only mode that keeps the default exact window and sinks
    assert _compress("tiny-gpt2", text, mode="auto", heldout_tokens=0)[1]["mode"] == "post-rope"
    assert _compress("tiny-gpt2", text, mode="auto", exact_window=64, seq_len=128, heldout_tokens=0)[1]["mode"] == "post-rope"


# ---------------------------------------------------------------- (g) bad input


@pytest.mark.parametrize("kw,field", [
    (dict(rank_ratio=0.0), "rank_ratio"), (dict(rank_ratio=1.5), "rank_ratio"), (dict(rank_ratio=-0.5), "rank_ratio"),
    (dict(tau=0.0), "tau"), (dict(tau=1.01), "tau"), (dict(epsilon=0.0), "epsilon"),
    (dict(mode="pre-rope"), "mode"), (dict(policy="greedy"), "policy"), (dict(fit="svd"), "fit"),
    (dict(min_rank=0), "min_rank"), (dict(k_bits=5), "k_bits"), (dict(min_rank=4, max_rank=2), "max_rank"),
])
def test_recipe_rejects(kw, field):
    with pytest.raises(RecipeError, match=f"^{field}:"):
        Recipe(**kw)


@pytest.mark.parametrize("kw,field", [(dict(min_rank=17), "min_rank"), (dict(max_rank=17), "max_rank"),
                                      (dict(seq_len=4096), "seq_len"),
                                      # a target under another policy was ignored; the policy without one
                                      (dict(max_kl=0.05), "max_kl"), (dict(max_kv_fraction=0.3), "max_kv_fraction"),
                                      (dict(policy="fidelity"), "max_kl")])
def test_compress_rejects_for_this_model(kw, field, text):
    with pytest.raises(RecipeError, match=f"^{field}:"):
        _compress("tiny-llama", text, **kw)


@pytest.mark.parametrize("body", ["", "   \n\n\t "])
def test_empty_text_is_refused(body, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text(body)
    with pytest.raises(TextError, match="empty"):
        _compress("tiny-llama", str(f))


def test_too_short_text_is_refused(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Just a few words.")
    with pytest.raises(TextError, match="too short|long enough"):
        _compress("tiny-llama", str(f), heldout_tokens=0)


def test_missing_text_is_refused(tmp_path):
    with pytest.raises(TextError):
        _compress("tiny-llama", str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------- (h) closed form vs baselines


def test_closed_form_beats_baselines_on_calibration(text):
    lm = load_model("tiny-llama")
    lay = adapters.head_layout(lm.model)
    windows = token_windows(lm.tokenizer, load_texts([text]), seq_len=64, max_tokens=1024)
    stats = FitStats(lay.num_layers, lay.num_heads, lay.num_kv_heads, lay.head_dim, weighting="none", window=0)
    run_hooked(lm.model, windows, stats, "calibration", False)
    fits = {f: fit_all(stats, lay, "post-rope", _recipe("tiny-llama", text, fit=f, ridge=1e-6), lm.model)
            for f in ("closed-form", "key-pca", "weight-svd", "think")}
    for r in (2, 4, 8, 12):
        totals = dict.fromkeys(fits, 0.0)
        for layer in range(lay.num_layers):
            gk = stats.key_gram_centred(layer)
            scale = float(stats.scale[layer])
            for j in range(lay.num_kv_heads):
                gq = stats.query_gram_group(layer, j)
                errs = {f: logit_error(gq, gk[j], fits[f][layer][j][0][:r], fits[f][layer][j][1][:r], scale)
                        for f in fits}
                # the tail eigenvalues predict our error
                tail = float(fits["closed-form"][layer][j][2][r:].sum())
                assert errs["closed-form"] == pytest.approx(tail, rel=1e-4)
                for f in ("key-pca", "weight-svd", "think"):
                    assert errs["closed-form"] <= errs[f] * (1 + 1e-6), (r, layer, j, f, errs)
                for f in fits:
                    totals[f] += errs[f]
        for f in ("key-pca", "weight-svd", "think"):
            assert totals["closed-form"] < totals[f], (r, totals)


def test_end_to_end_probe_measures_one_layer_at_a_time(text, ids_of):
    """The e2e signal's probe: full rank everywhere is exact (KL 0 up to float noise); compressing one
    layer to a low rank costs a positive KL, larger at rank 2 than at rank 8; the model is not changed."""
    from lowrank_attn.compression import prepare_calibration
    from lowrank_attn.policies import end_to_end_kl as _end_to_end_kl

    lm = load_model("tiny-llama")
    recipe = _recipe("tiny-llama", text, exact_window=8)
    layout = adapters.head_layout(lm.model)
    stats = prepare_calibration(lm, recipe, progress=False).stats(lm.model, "none", 8, False)
    fits = fit_all(stats, layout, "post-rope", recipe, lm.model)
    ids = ids_of("tiny-llama", 96)[0]
    before = _logits(lm.model, ids[None])
    full = _end_to_end_kl(fits, recipe, layout, lm.model, ids, D)
    kl8 = _end_to_end_kl(fits, recipe, layout, lm.model, ids, 8)
    kl2 = _end_to_end_kl(fits, recipe, layout, lm.model, ids, 2)
    assert (abs(full) < 1e-6).all() and (kl2 > kl8).all() and (kl8 > 0).all()
    assert torch.equal(_logits(lm.model, ids[None]), before)



def test_end_to_end_probe_keeps_the_other_layers_exact_with_quantised_keys(text, ids_of):
    """With quantised keys the probe's other layers stay exact (full rank, keys unquantised): each layer's KL at
    full rank is what quantising that layer alone costs, so the per-layer KLs add up to about the KL of quantising
    every layer — not each to that whole (the other layers quantised too, as the probe once had them)."""
    from lowrank_attn.compression import prepare_calibration
    from lowrank_attn.heldout import next_token_logprobs, output_kl
    from lowrank_attn.plans import build_plans
    from lowrank_attn.policies import end_to_end_kl as _end_to_end_kl
    from lowrank_attn.probes import installed

    lm = load_model("tiny-llama")
    with torch.no_grad():  # sharper attention than random weights give, so 2-bit keys cost a measurable KL
        for m in adapters.attention_modules(lm.model):
            m.q_proj.weight.mul_(30)
    recipe = _recipe("tiny-llama", text, exact_window=8, k_bits=2, k_group=8)
    layout = adapters.head_layout(lm.model)
    stats = prepare_calibration(lm, recipe, progress=False).stats(lm.model, "none", 8, False)
    fits = fit_all(stats, layout, "post-rope", recipe, lm.model)
    ids = ids_of("tiny-llama", 96)[0]
    per_layer = _end_to_end_kl(fits, recipe, layout, lm.model, ids, D)
    every = build_plans(fits, [[D] * layout.num_kv_heads] * layout.num_layers, recipe, "post-rope", layout,
                        windows=[8] * layout.num_layers)
    dense = next_token_logprobs(lm.model, ids)
    with installed(lm.model, every):
        total = output_kl(dense, lm.model, ids)
    assert (per_layer > 0).all() and total > 0
    assert per_layer.sum() < 1.5 * total  # each alone was about the whole: the sum n times it


# ---------------------------------------------------------------- sliding-window layers


@pytest.mark.parametrize("kw", [dict(), dict(k_bits=4)])
def test_sliding_window_cache_not_larger_than_dense(kw, text, ids_of, monkeypatch):
    """Sliding layers keep only their window, like the dense DynamicSlidingWindowLayer; decoding past the
    window matches full forwards (k_bits: matches the same decode with nothing dropped)."""
    ids = ids_of("tiny-gemma3", 600, 0)
    dense = load_model("tiny-gemma3").model
    with torch.no_grad():
        dense_bytes = key_cache_bytes(dense(input_ids=ids, use_cache=True).past_key_values)
    lm, _ = _compress("tiny-gemma3", text, mode="post-rope", exact_window=8, heldout_tokens=0, k_group=8, **kw)
    steps = ids_of("tiny-gemma3", 600, 1)[:, :40]

    def decode():  # prefill, then 40 tokens one at a time beyond the 32-token window
        with torch.no_grad():
            out = lm.model(input_ids=ids, use_cache=True)
            cache, prefill_bytes, logits = out.past_key_values, key_cache_bytes(out.past_key_values), []
            for t in range(steps.shape[1]):
                o = lm.model(input_ids=steps[:, t : t + 1], past_key_values=cache, use_cache=True)
                logits.append(o.logits[:, -1])
                cache = o.past_key_values
        return torch.stack(logits, 1), cache, prefill_bytes

    stepped, cache, prefill_bytes = decode()
    assert prefill_bytes < dense_bytes
    sliding = [layer for layer in cache.layers if isinstance(layer, LowRankKeyLayer) and layer.sliding]
    assert sliding and all(layer.values.shape[-2] <= 31 + 8 for layer in sliding)
    if kw:  # a full forward quantises by the final length (see the generation test): compare storage only
        monkeypatch.setattr(LowRankKeyLayer, "_drop_out_of_window", lambda self: None)
        ref, kept, _ = decode()
        assert any(layer.values.shape[-2] > 600 for layer in kept.layers)
    else:
        with torch.no_grad():
            ref = lm.model(input_ids=torch.cat([ids, steps], 1), use_cache=False).logits[:, -steps.shape[1] :]
    assert torch.allclose(stepped, ref, atol=1e-4)


# ---------------------------------------------------------------- the Palu-style baseline


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2"])
def test_palu_key_latent_is_the_pre_rope_pca_folded_into_w_k(kind, text, ids_of):
    """fit palu: full rank is the dense model; at rank r each key (before RoPE) is its projection on the top-r
    principal directions of the calibration keys before RoPE (bias included), queries untouched; the model's
    cache keeps full keys and the summary states the latent bytes."""
    from lowrank_attn.calibrate import pre_rope_key_moments
    from lowrank_attn.compression import prepare_calibration

    ids = ids_of(kind, 48)
    dense = load_model(kind)
    ref = _logits(dense.model, ids)
    full, _ = _compress(kind, text, fit="palu", rank_ratio=1.0)
    torch.testing.assert_close(_logits(full.model, ids), ref, rtol=1e-4, atol=1e-4)

    cal = prepare_calibration(dense, _recipe(kind, text), progress=False)
    moments = pre_rope_key_moments(dense.model, cal.fit_windows, progress=False)  # (L, Hkv, d, d)
    fam = adapters.adapter(dense.model)
    attn0 = fam.attention_modules()[0]
    hidden = torch.randn(1, 5, adapters.head_layout(dense.model).hidden_size)
    with torch.no_grad():
        q_dense, k_dense, _ = fam.qkv(attn0, hidden)  # (1, Hkv, 5, d) before RoPE
    lm, report = _compress(kind, text, fit="palu", rank_ratio=0.5)
    fam_c = adapters.adapter(lm.model)
    with torch.no_grad():
        q_low, k_low, _ = fam_c.qkv(fam_c.attention_modules()[0], hidden)
    torch.testing.assert_close(q_low, q_dense)
    for j in range(k_dense.shape[1]):
        lam, u = torch.linalg.eigh(torch.as_tensor(moments[0, j]))
        top = u[:, lam.argsort(descending=True)[: D // 2]]  # (d, r)
        expect = k_dense[0, j].double() @ top @ top.T
        torch.testing.assert_close(k_low[0, j].double(), expect, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(lm.model, ids), ref, atol=1e-3)
    lay = adapters.head_layout(lm.model)
    assert report["summary"]["latent_key_bytes_per_token_bf16"] == 2 * lay.num_layers * lay.num_kv_heads * D // 2
    assert "not reduced" in report["summary"]["keys"]


@pytest.mark.parametrize("kind", ["tiny-qwen3", "tiny-gemma3"])
def test_palu_refused_under_a_key_norm(kind, text):
    with pytest.raises(RecipeError, match="palu"):
        _compress(kind, text, fit="palu")


def test_palu_refused_without_rope(text):
    with pytest.raises(RecipeError, match="no RoPE"):
        _compress("tiny-gpt2", text, fit="palu")
