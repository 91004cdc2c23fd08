"""Compressed checkpoints: save → load (ours and stock trust_remote_code) give identical logits,
folded modes really shrink q/k tensors on disk, and every way a checkpoint can be broken is
refused with a CheckpointError naming the problem; a failed save leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from lowrank_attn.checkpoint import SIDECAR, load_compressed, save_compressed
from lowrank_attn.compression import compress
from lowrank_attn.errors import CheckpointError, LowrankAttnError
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe

CASES = {  # mode -> (tiny model, recipe overrides)
    "post-rope": ("tiny-llama", dict(exact_window=8)),
    "rope-pairs": ("tiny-qwen2", dict(exact_window=0)),
    "bilinear": ("tiny-gpt2", dict(exact_window=0)),
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text(alice_text):
    return alice_text


def _compress(mode, text):
    kind, kw = CASES[mode]
    recipe = Recipe(model=kind, mode=mode, policy="uniform", rank_ratio=0.5, seq_len=64, max_tokens=512,
                    heldout_tokens=64, weighting="none", text=[text], **kw)
    return compress(load_model(kind), recipe, progress=False)


@pytest.fixture(scope="module")
def compressed(text):
    """mode -> (LoadedModel, report), compressed once per module."""
    return {mode: _compress(mode, text) for mode in CASES}


@pytest.fixture(scope="module")
def saved(compressed, tmp_path_factory):
    """mode -> a checkpoint directory written once per module (tests copy it before breaking it)."""
    root = tmp_path_factory.mktemp("ckpts")
    return {mode: save_compressed(lm, rep, root / mode) for mode, (lm, rep) in compressed.items()}


@pytest.fixture
def post_rope_copy(saved, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(saved["post-rope"], dst)
    return dst


IDS = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101, 32, 113, 117,
                     105, 99, 107, 32, 98, 114, 111, 119, 110, 32, 102, 111, 120]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _generate(model, n=8):
    with torch.no_grad():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=257)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", list(CASES))
def test_round_trip_identical_logits(mode, compressed, saved):
    from transformers import AutoModelForCausalLM

    lm, _ = compressed[mode]
    ref = _logits(lm.model)
    ours = load_compressed(saved[mode])
    torch.testing.assert_close(_logits(ours.model), ref, rtol=0, atol=0)
    stock = AutoModelForCausalLM.from_pretrained(saved[mode], trust_remote_code=True).eval()
    assert type(stock).__name__ == "LowRankCausalLM"
    torch.testing.assert_close(_logits(stock), ref, rtol=0, atol=0)
    gen = _generate(lm.model)
    assert torch.equal(_generate(ours.model), gen)
    assert torch.equal(_generate(stock), gen)
    assert gen.shape[1] == IDS.shape[1] + 8
    # the tokenizer travels with the checkpoint
    assert ours.tokenizer("Hello").input_ids == lm.tokenizer("Hello").input_ids


def test_sidecar_contents(saved, compressed):
    side = json.loads((saved["post-rope"] / SIDECAR).read_text())
    _, rep = compressed["post-rope"]
    assert side["format_version"] == 1 and side["lowrank"]["mode"] == "post-rope"
    assert side["lowrank"]["ranks"] == [[h["rank"] for h in layer["kv_heads"]] for layer in rep["layers"]]
    assert side["lowrank"]["window"] == 8
    assert side["source"]["qk_fingerprint"] == rep["qk_fingerprint"]
    assert side["layers"][0]["kv_heads"][0]["certificate"]["violations"] == 0
    assert set(side["weights_sha256"]) == {p.name for p in saved["post-rope"].glob("*.safetensors")}
    cfg = json.loads((saved["post-rope"] / "config.json").read_text())
    assert cfg["lowrank_attn"] == side["lowrank"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_lowrank.LowRankCausalLM"


def _shapes(ckpt: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


def test_folded_modes_shrink_qk_on_disk(saved, compressed):
    # rope-pairs on tiny-qwen2: 4 query heads, 2 KV heads, d 16 → r 8; biases too
    s = _shapes(saved["rope-pairs"])
    dense = {k: tuple(v.shape) for k, v in load_model("tiny-qwen2").model.state_dict().items()}
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        assert dense[p + "q_proj.weight"] == (64, 64) and dense[p + "k_proj.weight"] == (32, 64)
        assert s[p + "q_proj.weight"] == (4 * 8, 64) and s[p + "k_proj.weight"] == (2 * 8, 64)
        assert s[p + "q_proj.bias"] == (32,) and s[p + "k_proj.bias"] == (16,)
        assert s[p + "v_proj.weight"] == dense[p + "v_proj.weight"]
    # bilinear on tiny-gpt2: fused c_attn (D, 3D) → (D, H·r + H·r + D)
    s = _shapes(saved["bilinear"])
    for layer in range(2):
        p = f"transformer.h.{layer}.attn.c_attn."
        assert s[p + "weight"] == (64, 4 * 8 * 2 + 64) and s[p + "bias"] == (4 * 8 * 2 + 64,)
    total = lambda sh: sum(int(torch.tensor(v).prod()) for v in sh.values())  # noqa: E731
    dense_gpt2 = {k: tuple(v.shape) for k, v in load_model("tiny-gpt2").model.state_dict().items()
                  if ".attn.c_attn." in k}
    assert total({k: v for k, v in s.items() if ".attn.c_attn." in k}) < total(dense_gpt2)
    # post-rope keeps the projections and adds (Hkv, r, d) maps
    s = _shapes(saved["post-rope"])
    assert s["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert s["model.layers.0.self_attn.lowrank_q_map"] == s["model.layers.0.self_attn.lowrank_k_map"] == (2, 8, 16)


# ---------------------------------------------------------------- refusals


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_sidecar(post_rope_copy):
    (post_rope_copy / SIDECAR).unlink()
    with pytest.raises(CheckpointError, match=f"not a lowrank-attn checkpoint.*{SIDECAR}"):
        load_compressed(post_rope_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_compressed(tmp_path / "nope")


@pytest.mark.parametrize("body", ["{not json", "", "\x00\x01"])
def test_corrupt_sidecar(post_rope_copy, body):
    (post_rope_copy / SIDECAR).write_text(body)
    with pytest.raises(CheckpointError, match="not JSON"):
        load_compressed(post_rope_copy)


def test_foreign_sidecar(post_rope_copy):
    _edit_json(post_rope_copy / SIDECAR, lambda d: d.update(format="something-else"))
    with pytest.raises(CheckpointError, match="not a lowrank-attn checkpoint sidecar"):
        load_compressed(post_rope_copy)


def test_future_format_version(post_rope_copy):
    _edit_json(post_rope_copy / SIDECAR, lambda d: d.update(format_version=2))
    with pytest.raises(CheckpointError, match="format version 2.*upgrade"):
        load_compressed(post_rope_copy)


def test_missing_weights_file(post_rope_copy):
    (post_rope_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing its weights file model.safetensors"):
        load_compressed(post_rope_copy)


def test_truncated_weights(post_rope_copy):
    f = post_rope_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_compressed(post_rope_copy)
    with pytest.raises(CheckpointError, match="cannot read"):  # without the hash check, the reader fails cleanly
        load_compressed(post_rope_copy, verify=False)


def test_nan_tensor_with_matching_hash(post_rope_copy):
    from safetensors.torch import load_file, save_file

    f = post_rope_copy / "model.safetensors"
    state = load_file(str(f))
    name = "model.layers.1.self_attn.lowrank_k_map"
    state[name][0, 0, 0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    _edit_json(post_rope_copy / SIDECAR, lambda d: d["weights_sha256"].update({"model.safetensors": _sha(f)}))
    with pytest.raises(CheckpointError, match=f"{name}.*NaN"):
        load_compressed(post_rope_copy)


def test_ranks_disagree_with_tensor_shapes(post_rope_copy):
    def shrink(lowrank):
        lowrank["ranks"][0] = [r - 2 for r in lowrank["ranks"][0]]

    _edit_json(post_rope_copy / "config.json", lambda d: shrink(d["lowrank_attn"]))
    _edit_json(post_rope_copy / SIDECAR, lambda d: shrink(d["lowrank"]))
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.lowrank_[qk]_map has shape \(2, 8, 16\).*need \(2, 6, 16\)"):
        load_compressed(post_rope_copy)


def test_ranks_beyond_head_dim(post_rope_copy):
    def grow(lowrank):
        lowrank["ranks"][0] = [99, 99]

    _edit_json(post_rope_copy / "config.json", lambda d: grow(d["lowrank_attn"]))
    _edit_json(post_rope_copy / SIDECAR, lambda d: grow(d["lowrank"]))
    with pytest.raises(CheckpointError, match="ranks do not fit"):
        load_compressed(post_rope_copy)


def test_config_and_sidecar_disagree(post_rope_copy):
    _edit_json(post_rope_copy / SIDECAR, lambda d: d["lowrank"].update(window=0))
    with pytest.raises(CheckpointError, match="disagree"):
        load_compressed(post_rope_copy)


def test_save_refuses_uncompressed_model(tmp_path):
    lm = load_model("tiny-llama")
    with pytest.raises(CheckpointError, match="not compressed"):
        save_compressed(lm, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_exists_without_overwrite(compressed, tmp_path):
    lm, rep = compressed["post-rope"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(LowrankAttnError, match="already exists.*overwrite"):
        save_compressed(lm, rep, out)
    assert (out / "keep.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    save_compressed(lm, rep, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / SIDECAR).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old dirs left beside it
    torch.testing.assert_close(_logits(load_compressed(out).model), _logits(lm.model), rtol=0, atol=0)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), OSError(28, "No space left on device")])
def test_failed_save_leaves_nothing(compressed, tmp_path, monkeypatch, exc):
    lm, rep = compressed["post-rope"]
    parent = tmp_path / "parent"
    out = parent / "ckpt"

    def broken(save_directory, *args, **kwargs):
        Path(save_directory, "model.safetensors").write_bytes(b"partial")  # something written, then failure
        raise exc

    monkeypatch.setattr(lm.model, "save_pretrained", broken)
    with pytest.raises((RuntimeError, LowrankAttnError)) as e:
        save_compressed(lm, rep, out)
    if isinstance(exc, OSError):
        assert isinstance(e.value, LowrankAttnError) and "cannot write" in str(e.value)
    assert not out.exists()
    assert list(parent.iterdir()) == []
    assert not hasattr(lm.model.config, "auto_map")  # the in-memory config is not left pointing at remote code


def test_load_never_executes_modeling_file(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "ckpt_marker"
    shutil.copytree(saved["post-rope"], ckpt)
    marker = tmp_path / "EXECUTED"
    modeling = ckpt / "modeling_lowrank.py"
    src = modeling.read_text()
    head, sep, rest = src.partition("from __future__ import annotations\n")
    modeling.write_text(head + sep + f"import pathlib as _pl\n_pl.Path({str(marker)!r}).write_text('ran')\n" + rest)
    lm = load_compressed(ckpt)
    assert not marker.exists(), "load_compressed executed modeling_lowrank.py"
    ref = _logits(lm.model)
    # positive control: the file does run when the user opts into remote code
    stock = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    assert marker.exists()
    torch.testing.assert_close(_logits(stock), ref, rtol=0, atol=0)
