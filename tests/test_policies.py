"""Rank allocation (lowrank_attn.policies): the registries match the recipe's choices, installing plans
for a probe leaves the dense model exactly as it was, the Fisher signal's gradient is the loss gradient
at each layer's attention output, and the fidelity policy meets its KL target with the smallest budget,
monotonically in the target (on a tiny model trained on real text)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lowrank_attn import policies
from lowrank_attn.cli import app
from lowrank_attn.compression import compress, prepare_calibration
from lowrank_attn.checkpoint.card import quality_lines
from lowrank_attn.fits import fit_all
from lowrank_attn.plans import build_plans
from lowrank_attn.probes import installed
from lowrank_attn.errors import RecipeError
from lowrank_attn.heldout import heldout_fidelity, output_gradients, sample_rows, window_logprobs
from lowrank_attn.models import LoadedModel, load_model
from lowrank_attn.recipe import Recipe, choices
from lowrank_attn.runtime import adapters
from lowrank_attn.runtime.surgery import prefill_as

pytestmark = pytest.mark.usefixtures("single_thread")
D = 16  # head_dim of every tiny model


@pytest.fixture(scope="module")
def texts(alice_text, tmp_path_factory):
    text = open(alice_text, encoding="utf-8").read()
    root = tmp_path_factory.mktemp("policies")
    (root / "cal.txt").write_text(text[:20000])
    return text, str(root / "cal.txt")


@pytest.fixture(scope="module")
def trained(texts):
    """tiny-llama trained briefly on the Alice excerpt (learned attention, so KL and budget are related)."""
    from lowrank_attn.tiny import build_tiny, train_tiny

    model, tok = build_tiny("tiny-llama")
    train_tiny(model, tok, texts[0], steps=120, seq_len=96, batch=8)
    return model.state_dict(), tok


def _lm(trained):
    from lowrank_attn.tiny import build_tiny

    model, tok = build_tiny("tiny-llama")
    model.load_state_dict(trained[0])
    return LoadedModel(model=model, tokenizer=tok, name="tiny-llama-trained", source="trained in the test")


def _recipe(cal_text, **kw):
    base = dict(model="tiny-llama", text=[cal_text], seq_len=128, max_tokens=2048, heldout_tokens=256, exact_window=8,
                weighting="none", k_bits=None, v_bits=None)
    return Recipe(**{**base, **kw})


def test_registries_are_the_recipe_choices():
    assert set(policies.POLICIES) == set(choices("policy"))
    assert set(policies.SIGNALS) == set(choices("signal"))


@pytest.mark.parametrize("kind,mode", [("tiny-llama", "post-rope"), ("tiny-llama", "rope-pairs"), ("tiny-gpt2", "bilinear")])
def test_installed_plans_are_undone_exactly(kind, mode, texts):
    """Inside ``installed`` the model is compressed (logits change at rank 2); after it, class, submodules,
    buffers, attributes and logits are the dense model's again, in folded modes too."""
    lm = load_model(kind)
    recipe = _recipe(texts[1], model=kind, mode=mode, max_tokens=512)
    layout = adapters.head_layout(lm.model)
    cal = prepare_calibration(lm, recipe, progress=False)
    fits = fit_all(cal.stats(lm.model, "none", 8 if mode == "post-rope" else 0, False), layout, mode, recipe, lm.model)
    ids = cal.held_windows[0].input_ids[None]
    mods = adapters.attention_modules(lm.model)
    before = [(type(m), dict(m._modules), set(m._buffers), set(m.__dict__)) for m in mods]
    model_cls = type(lm.model)
    with torch.no_grad():
        dense = lm.model(input_ids=ids).logits
        with installed(lm.model, build_plans(fits, [[2] * layout.num_kv_heads] * layout.num_layers, recipe,
                                                      mode, layout)), prefill_as(lm.model, "compressed"):
            low = lm.model(input_ids=ids).logits
        after = lm.model(input_ids=ids).logits
    assert not torch.allclose(low, dense, atol=1e-3)
    assert torch.equal(after, dense)
    assert type(lm.model) is model_cls  # not left as the compressed class
    assert [(type(m), dict(m._modules), set(m._buffers), set(m.__dict__)) for m in mods] == before
    assert all(getattr(m, "lowrank_plan", None) is None for m in mods)


def test_output_gradients_are_the_loss_gradient(trained, texts):
    """g_l on the sampled rows equals the gradient of an explicitly computed next-token loss with respect to
    a perturbation of layer l's attention output (taken here by a separate hook), and predicts the loss change
    of a small push of one row: (L(o + εu) − L(o − εu)) / 2ε ≈ g·u (later rows feel it through attention)."""
    lm = _lm(trained)
    cal = prepare_calibration(lm, _recipe(texts[1]), progress=False)
    w = cal.held_windows[0]
    grads = output_gradients(lm.model, [w])
    rows = sample_rows(len(w.input_ids))
    assert sorted(grads) == [0, 1] and grads[0][0].shape == (len(rows), 64)
    assert all(p.requires_grad for p in lm.model.parameters())  # restored
    mods = adapters.attention_modules(lm.model)
    ids = w.input_ids[None]
    gen = torch.Generator().manual_seed(0)

    def loss_with(layer, push):
        def hook(mod, args, out):
            return (out[0] + push, *out[1:])
        h = mods[layer].register_forward_hook(hook)
        try:
            logits = lm.model(input_ids=ids).logits[0, :-1]
            return torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:])
        finally:
            h.remove()

    for layer in (0, 1):
        zero = torch.zeros(1, ids.shape[1], 64, requires_grad=True)
        (direct,) = torch.autograd.grad(loss_with(layer, zero), [zero])
        torch.testing.assert_close(grads[layer][0], direct[0, rows].float(), rtol=1e-4, atol=1e-7)
        i = 7
        push = torch.zeros(1, ids.shape[1], 64)
        push[0, rows[i]] = torch.randn(64, generator=gen) * 1e-2 / 8
        with torch.no_grad():
            fd = float(loss_with(layer, push) - loss_with(layer, -push)) / 2
        g_u = float(grads[layer][0][i] @ push[0, rows[i]])
        assert fd == pytest.approx(g_u, rel=0.05), (layer, fd, g_u)


@pytest.mark.parametrize("signal", ["fisher", "fisher-diag"])
def test_fisher_signal_allocates_the_budget(signal, trained, texts):
    lm = _lm(trained)
    ids = torch.tensor(lm.tokenizer(texts[0][25000:25300])["input_ids"])[None]
    with torch.no_grad():
        dense = lm.model(input_ids=ids).logits
    lm2, report = compress(_lm(trained), _recipe(texts[1], policy="budget", rank_ratio=0.5, signal=signal), progress=False)
    ranks = [layer["r_max"] for layer in report["layers"]]
    assert sum(ranks) == D  # one rank per layer, mean 0.5·d
    assert all(1 <= r <= D for r in ranks)
    with torch.no_grad(), prefill_as(lm2.model, "compressed"):
        assert not torch.allclose(lm2.model(input_ids=ids).logits, dense, atol=1e-4)


def test_fidelity_meets_the_target_with_the_smallest_budget(trained, texts):
    """Achieved KL ≤ max_kl (re-measured on the compressed model), every smaller budget probed misses it,
    and a tighter max_kl never gives a smaller budget."""
    lm0 = _lm(trained)
    recipe = _recipe(texts[1], policy="fidelity", max_kl=1.0)
    cal = prepare_calibration(lm0, recipe, progress=False)
    dense_logps = [window_logprobs(lm0.model, w) for w in cal.held_windows]
    budgets, kls = [], []
    for x in (1e-3, 1e-4, 1e-5):
        lm, report = compress(_lm(trained), recipe.replace(max_kl=x), calibration=cal, progress=False)
        a = report["allocation"]
        assert a["policy"] == "fidelity" and a["max_kl"] == x
        assert a["kl"] <= x
        measured = heldout_fidelity(lm.model, cal.held_windows, dense_logps)
        assert measured["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-7)
        assert measured["ppl"] == pytest.approx(a["heldout_ppl"], rel=1e-4)
        assert a["heldout_ppl_change"] == pytest.approx(a["heldout_ppl"] / a["heldout_ppl_dense"] - 1)
        assert report["summary"]["mean_rank_ratio"] == pytest.approx(a["mean_rank_ratio"])
        smaller = [p for p in a["probes"] if p["rank_ratio"] < a["rank_ratio"]]
        assert all(p["kl"] > x for p in smaller)
        budgets.append(a["rank_ratio"])
        kls.append(a["kl"])
    assert budgets == sorted(budgets), budgets
    assert budgets[0] < 1.0 and budgets[-1] > budgets[0], budgets  # the targets are not all trivial


def test_fidelity_takes_the_fewest_kv_bytes_within_max_kl(trained, texts):
    """With two value widths the policy measures both and keeps the passing point with the fewest total K+V
    bytes; compress installs that width (one int in the report's recipe), and the bytes it reports are the
    checkpoint's."""
    lm0 = _lm(trained)
    recipe = _recipe(texts[1], policy="fidelity", k_bits=4, v_bits=[3, 4], max_kl=0.05)
    lm, report = compress(lm0, recipe, progress=False)
    a = report["allocation"]
    assert a["policy"] == "fidelity" and report["recipe"]["policy"] == "fidelity"
    widths = {p["v_bits"] for p in a["probes"]}
    assert widths <= {3, 4} and 3 in widths
    passing = [p for p in a["probes"] if p["kl"] <= 0.05]
    assert passing and a["kv_bytes_fraction"] == min(p["kv_bytes_fraction"] for p in passing)
    assert report["recipe"]["v_bits"] == a["v_bits"] and isinstance(a["v_bits"], int)
    layout = adapters.head_layout(lm.model)
    from lowrank_attn.kvbytes import kv_fraction
    from lowrank_attn.runtime.surgery import plans_config

    plans = [m.lowrank_plan for m in adapters.attention_modules(lm.model)]
    assert {p.v_bits for p in plans} == {a["v_bits"]}
    got = kv_fraction(plans_config(plans), layout.num_kv_heads, layout.head_dim, a["kv_bytes_at"])["total"]
    assert got == pytest.approx(a["kv_bytes_fraction"], abs=1e-4)


def test_fidelity_byte_target_takes_the_lowest_kl_that_fits(trained, texts):
    """max_kv_fraction: per value width the largest key budget whose bytes fit is measured, the lowest KL wins;
    what compress installs fits the bytes (measured from the installed plans), and one budget step more would
    not have."""
    target = 0.33  # tiny-llama: 4-bit values at a 75% key budget (31.3%) beat 3-bit values at full key rank
    lm, report = compress(_lm(trained), _recipe(texts[1], policy="fidelity", k_bits=4, v_bits=[3, 4],
                                                max_kv_fraction=target), progress=False)
    a = report["allocation"]
    assert a["max_kv_fraction"] == target and "max_kl" not in a
    assert {p["v_bits"] for p in a["probes"]} == {3, 4} and len(a["probes"]) == 2  # one point per width
    assert all(p["kv_bytes_fraction"] <= target for p in a["probes"])
    assert a["kl"] == min(p["kl"] for p in a["probes"])
    from lowrank_attn.kvbytes import kv_fraction
    from lowrank_attn.runtime.surgery import plans_config

    layout = adapters.head_layout(lm.model)
    plans = [m.lowrank_plan for m in adapters.attention_modules(lm.model)]
    got = kv_fraction(plans_config(plans), layout.num_kv_heads, layout.head_dim, a["kv_bytes_at"])["total"]
    assert got <= target and got == pytest.approx(a["kv_bytes_fraction"], abs=1e-4)
    if a["rank_ratio"] < 1:  # the next key budget of the same width would not fit
        step = 1 / 8
        _, wider = compress(_lm(trained), _recipe(texts[1], k_bits=4, v_bits=a["v_bits"],
                                                  rank_ratio=a["rank_ratio"] + step), progress=False)
        assert wider["summary"]["kv_bytes_vs_bf16"][str(a["kv_bytes_at"])]["total"] > target


def test_fidelity_skips_points_that_lose_long_range_copying(trained, texts, monkeypatch):
    """Every measured point carries its long-range copy check (the repeat read through the cache it stores). With
    the threshold out of reach (no point can copy 100 points above dense) the byte target takes the point that
    copies best and says so, and a KL target is missed (full key rank, widest values); with no threshold the byte
    target is KL's pick."""
    from lowrank_attn import cachepath

    def byte_target():
        return compress(_lm(trained), _recipe(texts[1], policy="fidelity", k_bits=4, v_bits=[3, 4],
                                              max_kv_fraction=0.33), progress=False)[1]

    monkeypatch.setattr(cachepath, "COPY_WARN_POINTS", float("inf"))
    free = byte_target()["allocation"]
    assert all(0 <= p["copy_accuracy"] <= 1 and p["copy_kl"] >= 0 for p in free["probes"])
    assert free["copy_kept"] is True and free["kl"] == min(p["kl"] for p in free["probes"])
    monkeypatch.setattr(cachepath, "COPY_WARN_POINTS", -100)
    report = byte_target()
    a = report["allocation"]
    assert a["copy_kept"] is False and a["copy_accuracy"] == max(p["copy_accuracy"] for p in a["probes"])
    card = "\n".join(quality_lines(report))
    assert "none that fits keeps long-range copying" in card
    assert f"top-1 {report['summary']['long_range_copy']['accuracy']:.1%} compressed" in card
    _, report = compress(_lm(trained), _recipe(texts[1], policy="fidelity", max_kl=10.0, v_bits=[3, 4]), progress=False)
    a = report["allocation"]
    assert a["max_kl_met"] is False and a["rank_ratio"] == 1.0 and a["v_bits"] == 4 and a["kl"] <= 10.0


def test_fidelity_byte_target_refusals(trained, texts):
    with pytest.raises(RecipeError, match="one target"):
        _recipe(texts[1], policy="fidelity", max_kl=0.1, max_kv_fraction=0.3)
    with pytest.raises(RecipeError, match=r"max_kv_fraction: must be in \(0, 1\]"):
        _recipe(texts[1], policy="fidelity", max_kv_fraction=1.5)
    with pytest.raises(RecipeError, match="no point fits 0.01 .*raise max_kv_fraction"):
        compress(_lm(trained), _recipe(texts[1], policy="fidelity", k_bits=4, v_bits=4, max_kv_fraction=0.01),
                 progress=False)


def test_fidelity_refusals(trained, texts):
    lm = _lm(trained)
    with pytest.raises(RecipeError, match="max_kl"):
        compress(lm, _recipe(texts[1], policy="fidelity"), progress=False)
    with pytest.raises(RecipeError, match="max_kl"):
        _recipe(texts[1], policy="fidelity", max_kl=0.0)
    # 2-bit keys: even full rank is not exact; the widest point is kept and the report says the target is missed
    _, report = compress(_lm(trained), _recipe(texts[1], policy="fidelity", max_kl=1e-9, k_bits=2), progress=False)
    a = report["allocation"]
    assert a["max_kl_met"] is False and a["rank_ratio"] == 1.0 and a["kl"] > 1e-9
    with pytest.raises(RecipeError, match="held-out"):
        compress(_lm(trained), _recipe(texts[1], policy="fidelity", max_kl=0.1, heldout_tokens=0), progress=False)


def test_cli_max_kl_implies_fidelity(tmp_path, texts):
    runner = CliRunner()
    out = tmp_path / "ckpt"
    args = ["compress", "tiny-llama", "--out", str(out), "--text", texts[1], "--seq-len", "128", "--max-tokens", "1024",
            "--heldout-tokens", "128", "--exact-window", "8", "--max-kl", "0.001"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "fidelity: key budget" in res.output and "K+V cache" in res.output
    sidecar = json.loads((out / "lowrank_attn.json").read_text())
    text = json.dumps(sidecar)
    assert '"fidelity"' in text and '"max_kl": 0.001' in text
    bad = runner.invoke(app, args[:3] + [str(tmp_path / "other")] + args[4:] + ["--policy", "budget"])
    assert bad.exit_code != 0 and "max_kl" in bad.output and not (tmp_path / "other").exists()
    by_bytes = args[:3] + [str(tmp_path / "bytes")] + args[4:-2] + ["--max-kv-fraction", "0.5", "--v-bits", "3,4"]
    res = runner.invoke(app, by_bytes)
    assert res.exit_code == 0, res.output
    assert "within 0.5: the lowest KL" in res.output
    card = (tmp_path / "bytes" / "README.md").read_text()
    assert "the lowest measured within 0.5 of the bf16 K+V cache" in card
    bad = runner.invoke(app, by_bytes[:3] + [str(tmp_path / "other")] + by_bytes[4:] + ["--max-kl", "0.1"])
    assert bad.exit_code != 0 and "one target" in bad.output and not (tmp_path / "other").exists()


def test_cli_target_flag_replaces_the_recipes_target(tmp_path, texts):
    """A recipe with a byte target and --max-kl on the command line: the flag is the target (flags override the
    recipe), not a "one target" refusal; a recipe target under another policy is refused before any work."""
    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\npolicy: fidelity\nmax_kv_fraction: 0.5\nseq_len: 128\nmax_tokens: 1024\n"
                      "heldout_tokens: 128\nexact_window: 8\n")
    res = runner.invoke(app, ["compress", "--recipe", str(recipe), "--text", texts[1], "--out", str(tmp_path / "a"),
                              "--max-kl", "0.5"])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "a" / "lowrank_attn.json").read_text())
    assert side["recipe"]["max_kl"] == 0.5 and side["recipe"]["max_kv_fraction"] is None
    recipe.write_text("model: tiny-llama\nmax_kl: 0.05\n")  # policy: budget (the default) would ignore it
    res = runner.invoke(app, ["compress", "--recipe", str(recipe), "--text", texts[1], "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "only the fidelity policy reads a target" in res.output
    assert not (tmp_path / "b").exists()


def test_cli_value_width_lists(tmp_path, texts):
    """--v-bits takes one width or a list: a list under the budget policy installs the widest; a bad list is one
    error line and nothing on disk."""
    runner = CliRunner()
    base = ["compress", "tiny-llama", "--text", texts[1], "--seq-len", "128", "--max-tokens", "1024",
            "--heldout-tokens", "128", "--exact-window", "8"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "ok"), "--v-bits", "3,4"])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "ok" / "lowrank_attn.json").read_text())
    assert side["recipe"]["v_bits"] == 4 and side["recipe"]["policy"] == "budget"
    for bad, msg in (("3,x", "comma-separated list"), ("3,5", "must be one of")):
        res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--v-bits", bad])
        assert res.exit_code == 2 and "v_bits: " in res.output and msg in res.output, res.output
        assert not (tmp_path / "bad").exists()


def test_output_error_measured_after_the_attention_output_norm(texts):
    """With ``out_norm`` the error is ‖norm(o + Δo) − norm(o)‖²: a linear 'norm' x → 3x gives 9× the raw error,
    the identity the raw error."""
    from lowrank_attn.heldout import layer_output_errors

    lm = load_model("tiny-llama")
    recipe = _recipe(texts[1], model="tiny-llama", max_tokens=512)
    layout = adapters.head_layout(lm.model)
    cal = prepare_calibration(lm, recipe, progress=False)
    fits = fit_all(cal.stats(lm.model, "none", 8, False), layout, "post-rope", recipe, lm.model)
    sample = cal.sample
    cands = [[(torch.as_tensor(f[0][:r]), torch.as_tensor(f[1][:r])) for f in fits[0]] for r in (2, 8)]
    w_o = adapters.o_weight(lm.model, 0).detach().float()
    kw = dict(group=layout.group_size, window=8, quantizer=None)
    raw = layer_output_errors(sample, 0, cands, w_o, **kw)
    assert raw[0] > raw[1] > 0
    ident = layer_output_errors(sample, 0, cands, w_o, out_norm=torch.nn.Identity(), **kw)
    tripled = layer_output_errors(sample, 0, cands, w_o, out_norm=lambda x: 3 * x, **kw)
    for a, b, c in zip(raw, ident, tripled):
        assert b == pytest.approx(a, rel=1e-5) and c == pytest.approx(9 * a, rel=1e-4)


def test_budget_counts_the_cache_at_the_serving_length():
    """A sliding-window layer holds only its window at serve_len, so its components are cheap: with equal gains it
    is kept at full rank and the other layer pays; the info states the share of the K cache kept at serve_len.
    Without a serve_len (or sliding layers) the budget is the mean rank."""
    import numpy as np

    from lowrank_attn.recipe import Recipe

    lm = load_model("tiny-llama")
    layout = adapters.head_layout(lm.model)  # 2 layers, d 16
    gains = [np.linspace(2.0, 1.0, 16), np.linspace(2.0, 1.0, 16)]
    ctx = policies.AllocationContext(fits=[], recipe=Recipe(model="tiny-llama", rank_ratio=0.5, min_rank=2),
                                     layout=layout, mode="post-rope", model=lm.model, slidings=[4, None], serve_len=256)
    ranks = policies.budget_policy(ctx, gains)
    assert [r[0] for r in ranks] == [16, 7]  # 16·4 + 7·256 <= 0.5·16·(4 + 256) < 16·4 + 8·256
    assert ctx.info["key_fraction_at_serve_len"] == pytest.approx((16 * 4 + 7 * 256) / (16 * 260))
    flat = policies.AllocationContext(fits=[], recipe=ctx.recipe, layout=layout, mode="post-rope", model=lm.model,
                                      slidings=[None, None], serve_len=256)
    assert [r[0] for r in policies.budget_policy(flat, gains)] == [8, 8]


def test_kl_target_takes_the_fewest_bytes_measured_point_that_meets_it():
    """The max_kl search over (key budget, value width): whatever order the bisections measure in, and where the
    KL does not fall steadily with the budget, the answer is the fewest-bytes measured point within max_kl."""
    from types import SimpleNamespace

    from lowrank_attn.policy_fidelity import _cheapest_within_kl

    kl = {(k, 3): v for k, v in enumerate([0.5, 0.3, 0.09, 0.2, 0.15, 0.08, 0.12, 0.07], 1)}
    kl.update({(k, 4): v for k, v in enumerate([0.4, 0.2, 0.1, 0.095, 0.09, 0.085, 0.08, 0.075], 1)})

    class Search:
        ctx = SimpleNamespace(recipe=SimpleNamespace(value_bit_options=[3, 4]))
        n_budgets = 8

        def __init__(self):
            self.seen = []

        def bytes(self, k, bits):
            return k * 0.05 + bits * 0.03

        def measured(self):
            return list(self.seen)

        def measure(self, k, bits):
            if (k, bits) not in self.seen:
                self.seen.append((k, bits))
            return [[k]], {"kl": kl[k, bits]}

        def meets(self, m, max_kl):  # no copy check in this search
            return m["kl"] <= max_kl

    s = Search()
    fraction, ranks, m = _cheapest_within_kl(s, 0.1)
    met = [(s.bytes(k, b), k, b) for k, b in s.seen if kl[k, b] <= 0.1]
    assert (fraction, ranks) == (min(met)[0], [[min(met)[1]]]) and m["kl"] <= 0.1
    assert _cheapest_within_kl(Search(), 0.01) is None


def test_rank_limits_fall_on_whole_planes_in_rope_pairs(texts):
    """rope-pairs keeps whole RoPE planes (ranks in steps of 2): an odd min_rank is rounded up to a plane, not
    passed on to build a rank-3 head from one plane (the fuzzer's IndexError)."""
    recipe = _recipe(texts[1], mode="rope-pairs", policy="energy", tau=0.125, min_rank=3, exact_window=0,
                     exact_sink=0, k_bits=None)
    _, report = compress(load_model("tiny-llama"), recipe, progress=False)
    ranks = [h["rank"] for lay in report["layers"] for h in lay["kv_heads"]]
    assert all(r % 2 == 0 and r >= 4 for r in ranks), ranks
