"""Models bigger than host RAM: a model loaded with a device_map whose weights are partly offloaded to disk
(accelerate: ``max_memory`` + ``offload_folder``) compresses to exactly what the in-memory model gives, runs the
compressed attention (accelerate's hooks wrap the forward of the class it was loaded with), saves a delta
checkpoint equal to the in-memory one, and a delta loads onto an offloaded base; what cannot work is refused."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_attn.checkpoint import DELTA, SIDECAR, load_compressed, save_compressed
from lowrank_attn.compression import compress
from lowrank_attn.errors import CheckpointError, ModelLoadError, RecipeError
from lowrank_attn.models import load_model, parse_max_memory
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime import adapters, placement
from lowrank_attn.runtime.surgery import prefill_as
from lowrank_attn.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.arange(1, 61)[None] % 250 + 3  # (1, 60) token ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny-llama saved as an HF directory (offloading needs from_pretrained), and half its weight bytes."""
    model, tok = build_tiny("tiny-llama")
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = model.config.num_hidden_layers
    on_disk = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
               **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(n)}}  # layers 1… offloaded
    return str(path), on_disk


def _offloaded(model_dir, tmp_path):
    path, device_map = model_dir
    lm = load_model(path, device_map=device_map, offload_folder=tmp_path / "offload")
    assert placement.is_offloaded(lm.model) and not all(p.is_meta for p in lm.model.parameters())  # some on disk
    return lm


def _recipe(path, text, **kw):
    return Recipe(model=path, rank_ratio=0.25, seq_len=64, max_tokens=512, heldout_tokens=64, text=[text], **kw)


def _logits(model):
    with torch.no_grad(), prefill_as(model, "compressed"):  # a compressed model's prompt over what it stores
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def in_memory(model_dir, public_text):
    path, _ = model_dir
    return compress(load_model(path), _recipe(path, public_text), progress=False)


def test_offloaded_compress_equals_in_memory(model_dir, public_text, in_memory, tmp_path):
    path, _ = model_dir
    ref, ref_report = in_memory
    lm, report = compress(_offloaded(model_dir, tmp_path), _recipe(path, public_text), progress=False)
    ranks = [[h["rank"] for h in layer["kv_heads"]] for layer in report["layers"]]
    assert ranks == [[h["rank"] for h in layer["kv_heads"]] for layer in ref_report["layers"]]
    assert report["qk_fingerprint"] == ref_report["qk_fingerprint"]
    dense = _logits(load_model(path).model)
    out = _logits(lm.model)
    assert not torch.allclose(out, dense, atol=1e-4)  # the compressed forward runs under the hooks
    torch.testing.assert_close(out, _logits(ref.model), rtol=0, atol=0)


def test_delta_from_an_offloaded_model_loads_onto_an_offloaded_base(model_dir, public_text, in_memory, tmp_path):
    path, device_map = model_dir
    ref, ref_report = in_memory
    lm, report = compress(_offloaded(model_dir, tmp_path), _recipe(path, public_text), progress=False)
    with pytest.raises(CheckpointError, match="offloaded.*delta"):
        save_compressed(lm, report, tmp_path / "full")
    assert not (tmp_path / "full").exists()
    delta = save_compressed(lm, report, tmp_path / "delta", delta=True)
    ref_delta = save_compressed(ref, ref_report, tmp_path / "ref-delta", delta=True)
    from safetensors.torch import load_file

    got, want = load_file(str(delta / DELTA)), load_file(str(ref_delta / DELTA))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((delta / SIDECAR).read_text())["base"] == json.loads((ref_delta / SIDECAR).read_text())["base"]
    placed = dict(device_map=device_map, offload_folder=tmp_path / "offload-load")
    loaded = load_compressed(delta, **placed)
    assert placement.is_offloaded(loaded.model)
    assert all(m.lowrank_plan is not None for m in adapters.attention_modules(loaded.model))
    torch.testing.assert_close(_logits(loaded.model), _logits(ref.model), rtol=0, atol=0)
    kw = dict(attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.model.generate(IDS, **kw), ref.model.generate(IDS, **kw))
    with pytest.raises(CheckpointError, match="float32"):
        load_compressed(delta, dtype="bfloat16", **placed)
    full = save_compressed(ref, ref_report, tmp_path / "ref-full")
    with pytest.raises(CheckpointError, match="full checkpoint"):
        load_compressed(full, **placed)


def test_modes_that_change_weights_are_refused_when_offloaded(model_dir, public_text, tmp_path):
    path, _ = model_dir
    with pytest.raises(RecipeError, match="offloaded"):
        compress(_offloaded(model_dir, tmp_path), _recipe(path, public_text, mode="rope-pairs", exact_window=0,
                                                           exact_sink=0), progress=False)


def test_placement_options_are_checked():
    assert parse_max_memory("cpu=4GiB, 0=20GiB") == {"cpu": "4GiB", 0: "20GiB"}
    for bad in ("cpu", "=4GiB", ",", "cpu="):
        with pytest.raises(ModelLoadError, match="max_memory"):
            parse_max_memory(bad)
    with pytest.raises(ModelLoadError, match="device_map"):
        load_model("tiny-llama", max_memory="cpu=1GiB")


def test_cli_compresses_an_offloaded_model_to_a_delta(model_dir, public_text, tmp_path):
    from typer.testing import CliRunner

    from lowrank_attn.cli import app

    path, _ = model_dir
    out = tmp_path / "ckpt"
    args = ["compress", path, "--text", public_text, "--seq-len", "64", "--max-tokens", "512", "--heldout-tokens", "64",
            "--device-map", "auto", "--max-memory", "cpu=20KB", "--offload-folder", str(tmp_path / "off"), "--out"]
    res = CliRunner().invoke(app, args + [str(out), "--delta"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / SIDECAR).read_text())["delta"] is True
    res = CliRunner().invoke(app, args + [str(tmp_path / "full")])
    assert res.exit_code == 2 and "save a delta" in res.output and not (tmp_path / "full").exists()


def test_analyze_an_offloaded_model(model_dir, public_text, tmp_path):
    """The spectra of E~ (a forward) and of W_Q^T W_K (weights read outside a forward) as in memory."""
    from lowrank_attn.analysis import analyze

    path, device_map = model_dir
    kw = dict(seq_len=64, max_tokens=256, progress=False)
    got = analyze(path, [public_text], device_map=device_map, offload_folder=tmp_path / "off", **kw)
    want = analyze(path, [public_text], **kw)
    assert json.dumps(got["layers"], sort_keys=True) == json.dumps(want["layers"], sort_keys=True)
