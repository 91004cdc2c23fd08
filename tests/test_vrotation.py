"""The basis quantised values are cached in (``lowrank_attn.vrotation``): orthonormal, invisible without a
quantiser, smaller quantisation error on values with outlier channels, and carried by checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lowrank_attn.checkpoint import load_compressed, save_compressed
from lowrank_attn.cli import app
from lowrank_attn.compression import compress
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime import adapters
from lowrank_attn.runtime.values import TokenQuantizer
from lowrank_attn.texts import load_texts, token_windows
from lowrank_attn.vfit import fit_value_head
from lowrank_attn.vrotation import ROTATIONS, hadamard, spreading, value_maps

pytestmark = pytest.mark.usefixtures("single_thread", "compressed_prefill")


@pytest.mark.parametrize("n", [1, 2, 8, 48, 64, 80, 128])
def test_spreading_is_orthonormal(n):
    r = spreading(n)
    assert np.allclose(r @ r.T, np.eye(n), atol=1e-12)
    if n & (n - 1) == 0:  # a power of two: every entry ±1/√n (each channel spread over all of them)
        assert np.allclose(np.abs(r), 1 / np.sqrt(n))


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def _fit(d, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d)) * 0.8 ** np.arange(d)
    return fit_value_head(b @ b.T, a @ a.T)


@pytest.mark.parametrize("rotation", list(ROTATIONS))
@pytest.mark.parametrize("rank", [32, 16])
def test_rotations_change_nothing_without_a_quantiser(rotation, rank):
    """dec·enc (what attention over the cached values gives o_proj) is the value fit's own projection at that rank
    (the identity at full rank): a rotation moves only where the quantiser's error falls."""
    d, fit = 32, _fit(32)
    maps = value_maps(rotation, fit, rank, d)
    if maps is None:
        assert rotation == "none" and rank == d
        return
    enc, dec = maps
    assert enc.shape == (rank, d) and dec.shape == (d, rank)
    want = np.eye(d) if rank == d else fit.dec[:, :rank] @ fit.enc[:rank]
    assert np.allclose(dec @ enc, want, atol=1e-8)


def test_a_rotation_below_full_rank_needs_the_fit():
    with pytest.raises(ValueError, match="needs the value fit"):
        value_maps("hadamard", None, 16, 32)
    assert value_maps("none", None, 32, 32) is None


def test_hadamard_spreads_an_outlier_channel():
    """Per-token 4-bit groups of 32 on values whose channel 3 is 30× the rest: the step is set by the outlier,
    so the other channels lose almost everything; after a Hadamard every channel carries 1/√d of it and the
    reconstruction error falls several-fold."""
    torch.manual_seed(0)
    v = torch.randn(1, 1, 256, 64)
    v[..., 3] *= 30
    h = torch.from_numpy(hadamard(64)).float()
    q = TokenQuantizer(4, 32)

    def error(x):
        return float((q.dequantize(*q.quantize(x)) - x).pow(2).sum())

    plain = error(v)
    rotated = float((q.dequantize(*q.quantize(v @ h.T)) @ h - v).pow(2).sum())
    assert rotated < plain / 3


def test_rotated_values_through_a_checkpoint(tmp_path, public_text):
    """The default (output basis) at full value rank: maps of size d per KV head, the config and card name the
    rotation, the loaded checkpoint gives the same logits, and 8-bit rotated values stay near the dense model."""
    kind = "tiny-llama"
    recipe = Recipe(model=kind, text=[public_text], rank_ratio=1.0, k_bits=None, v_bits=8, v_window=8, seq_len=128,
                    max_tokens=1024, heldout_tokens=256)
    assert recipe.v_rotation == "output"
    ids = token_windows(load_model(kind).tokenizer, load_texts([public_text]), seq_len=160)[3].input_ids[None]
    with torch.no_grad():
        dense = load_model(kind).model(input_ids=ids, use_cache=False).logits
    lm, report = compress(load_model(kind), recipe, progress=False)
    d = adapters.head_layout(lm.model).head_dim
    plan = adapters.attention_modules(lm.model)[0].lowrank_plan
    assert plan.v_rank == d and plan.v_rotation == "output"
    with torch.no_grad():
        before = lm.model(input_ids=ids, use_cache=False).logits
    assert float((before - dense).abs().max()) < 0.05 * float(dense.abs().max())
    out = save_compressed(lm, report, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())["lowrank_attn"]
    assert cfg["v_rotation"] == "output" and cfg["v_ranks"] == d
    card = (out / "README.md").read_text()
    assert "not projected" in card and "after a rotation (output" in card
    with torch.no_grad():
        after = load_compressed(out).model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_cli_value_rotation(tmp_path, public_text):
    """--v-rotation picks the basis (the config and the recipe say which), --k-group/--v-group the quantisation
    groups; a bad one is one error line and nothing on disk; --help lists the registered rotations."""
    runner = CliRunner()
    base = ["compress", "tiny-llama", "--text", public_text, "--seq-len", "128", "--max-tokens", "1024",
            "--heldout-tokens", "128", "--exact-window", "8"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "ok"), "--v-rotation", "hadamard", "--k-group", "16",
                                     "--v-group", "16"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["lowrank_attn"]["v_rotation"] == "hadamard"
    recipe = json.loads((tmp_path / "ok" / "lowrank_attn.json").read_text())["recipe"]
    assert (recipe["v_rotation"], recipe["k_group"], recipe["v_group"]) == ("hadamard", 16, 16)
    for flag, value, message in (("--v-rotation", "random", "v_rotation: must be one of none, hadamard, output"),
                                 ("--v-group", "48", "v_group: must be one of 8, 16, 32, 64, 128"),
                                 ("--k-group", "12", "k_group: must be a multiple of 8")):
        res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), flag, value])
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    help_text = " ".join(runner.invoke(app, ["compress", "--help"], terminal_width=200).output.split())
    assert all(name in help_text for name in ROTATIONS)


def test_quantisation_ranges_recorded_and_served(tmp_path, public_text):
    """``k_clip`` / ``v_clip`` reach the live cache's key and value quantisers, the checkpoint config and card record
    them and a loaded checkpoint serves them; a config from before the fields serves KIVI's min/max; ``--v-clip``
    sets one and a bad value is one error line with nothing on disk."""
    from lowrank_attn.runtime.surgery import plans_from_config

    kind = "tiny-llama"
    recipe = Recipe(model=kind, text=[public_text], rank_ratio=0.5, v_bits=4, v_window=8, exact_window=8, seq_len=128,
                    max_tokens=1024, heldout_tokens=256, v_clip="mse")
    assert recipe.k_clip == Recipe().v_clip == "minmax"
    lm, report = compress(load_model(kind), recipe, progress=False)
    ids = token_windows(lm.tokenizer, load_texts([public_text]), seq_len=96)[1].input_ids[None]
    with torch.no_grad():
        layer = lm.model(input_ids=ids, use_cache=True).past_key_values.layers[0]
    assert (layer.quantizer.clip, layer.v_quantizer.clip) == ("minmax", "mse")
    out = save_compressed(lm, report, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())["lowrank_attn"]
    assert (cfg["k_clip"], cfg["v_clip"]) == ("minmax", "mse")
    assert "values: each group's min/max shrunk to the least squared error" in (out / "README.md").read_text()
    loaded = load_compressed(out)
    assert {(m.lowrank_plan.k_clip, m.lowrank_plan.v_clip) for m in adapters.attention_modules(loaded.model)} \
        == {("minmax", "mse")}
    del cfg["k_clip"], cfg["v_clip"]
    assert {(p.k_clip, p.v_clip) for p in plans_from_config(cfg, adapters.head_layout(loaded.model))} \
        == {("minmax", "minmax")}
    runner = CliRunner()
    base = ["compress", kind, "--text", public_text, "--seq-len", "128", "--max-tokens", "1024", "--heldout-tokens",
            "128", "--exact-window", "8"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "kmse"), "--k-clip", "mse"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "kmse" / "config.json").read_text())["lowrank_attn"]
    assert (cfg["k_clip"], cfg["v_clip"]) == ("mse", "minmax")
    res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--v-clip", "p99"])
    assert res.exit_code == 2 and "v_clip: must be one of minmax, mse" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
