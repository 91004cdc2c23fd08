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
from lowrank_attn.tiny import TINY_KINDS
from lowrank_attn.runtime.surgery import prefill_as

CASES = {  # mode -> (tiny model, recipe overrides)
    "post-rope": ("tiny-llama", dict(exact_window=8)),
    "rope-pairs": ("tiny-qwen2", dict(exact_window=0, exact_sink=0)),
    "bilinear": ("tiny-gpt2", dict(exact_window=0, exact_sink=0)),
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text(alice_text):
    return alice_text


def _compress(mode, text):
    kind, kw = CASES[mode]
    recipe = Recipe(model=kind, mode=mode, policy="uniform", rank_ratio=0.5, seq_len=64, max_tokens=512,
                    heldout_tokens=64, weighting="none", text=[text], **{"k_bits": None, "v_bits": None, **kw})
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
    """Prompts over what the cache stores (``prefill: compressed``), so a model that lost its compression shows."""
    with torch.no_grad(), prefill_as(model, "compressed"):
        return model(input_ids=ids).logits


def _cache_bytes(model) -> dict[str, int]:
    from transformers import DynamicCache

    from lowrank_attn.runtime.kcache import kv_cache_bytes

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS, past_key_values=cache, use_cache=True)
    return kv_cache_bytes(cache)


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
    # read once into the parameters (no second copy), the tied LM head still the embedding
    assert ours.model.get_output_embeddings().weight.data_ptr() == ours.model.get_input_embeddings().weight.data_ptr()
    assert not any(p.is_meta for p in ours.model.parameters())
    stock = AutoModelForCausalLM.from_pretrained(saved[mode], trust_remote_code=True).eval()
    assert type(stock).__name__ == type(lm.model).__name__ and type(stock).__name__.startswith("LowRank")
    assert stock.config.model_type == lm.model.config.model_type and stock.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(stock), ref, rtol=0, atol=0)
    gen = _generate(lm.model)
    assert torch.equal(_generate(ours.model), gen)
    assert torch.equal(_generate(stock), gen)
    assert gen.shape[1] == IDS.shape[1] + 8
    # the cache of the bundled runtime (its own layer class) is counted like ours: window, sinks and codes included
    assert _cache_bytes(stock) == _cache_bytes(ours.model)
    # the tokenizer travels with the checkpoint
    assert ours.tokenizer("Hello").input_ids == lm.tokenizer("Hello").input_ids


def test_sidecar_contents(saved, compressed):
    side = json.loads((saved["post-rope"] / SIDECAR).read_text())
    _, rep = compressed["post-rope"]
    assert side["format_version"] == 2 and side["lowrank"]["mode"] == "post-rope"
    assert side["dtype"] == "float32" and side["delta"] is False and side["base"] is None
    assert side["lowrank"]["ranks"] == [[h["rank"] for h in layer["kv_heads"]] for layer in rep["layers"]]
    assert side["lowrank"]["window"] == 8
    assert side["source"]["qk_fingerprint"] == rep["qk_fingerprint"]
    assert side["layers"][0]["kv_heads"][0]["certificate"]["violations"] == 0
    assert set(side["weights_sha256"]) == {p.name for p in saved["post-rope"].glob("*.safetensors")}
    cfg = json.loads((saved["post-rope"] / "config.json").read_text())
    assert cfg["lowrank_attn"] == side["lowrank"]
    assert cfg["model_type"] == "lowrank_attn" and cfg["base_config"]["model_type"] == "llama"
    assert cfg["auto_map"] == {"AutoConfig": "modeling_lowrank.LowRankAttnConfig",
                               "AutoModelForCausalLM": "modeling_lowrank.LowRankAttnForCausalLM"}


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


def _rehash(ckpt: Path) -> None:
    """The sidecar's hashes of the other files made to match them again: a checkpoint consistent with itself, so
    that the checks after the hashes are what a test meets."""
    from lowrank_attn.checkpoint.format import file_sha256

    _edit_json(ckpt / SIDECAR, lambda d: d["files_sha256"].update({n: file_sha256(ckpt / n) for n in d["files_sha256"]}))


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
    _edit_json(post_rope_copy / SIDECAR, lambda d: d.update(format_version=3))
    with pytest.raises(CheckpointError, match="format version 3.*upgrade"):
        load_compressed(post_rope_copy)


def test_old_format_version(post_rope_copy):
    _edit_json(post_rope_copy / SIDECAR, lambda d: d.update(format_version=1))
    with pytest.raises(CheckpointError, match="format version 1.*re-run compress"):
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


def test_edited_config_or_tokenizer_is_refused(post_rope_copy):
    """config.json (the base config: an edited rms_norm_eps changed the logits by 1.3 and loaded) and the tokenizer
    files are hashed in the sidecar like the weights; verify=False loads them anyway."""
    side = json.loads((post_rope_copy / SIDECAR).read_text())
    assert {"config.json", "tokenizer.json"} <= set(side["files_sha256"])
    cfg_file = post_rope_copy / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_config"]["rms_norm_eps"] = 0.5
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    with pytest.raises(CheckpointError, match="config.json does not match the hash"):
        load_compressed(post_rope_copy)
    load_compressed(post_rope_copy, verify=False)
    _rehash(post_rope_copy)
    (post_rope_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        load_compressed(post_rope_copy)


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
    _rehash(post_rope_copy)
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.lowrank_[qk]_map has shape \(2, 8, 16\).*need \(2, 6, 16\)"):
        load_compressed(post_rope_copy)


def test_ranks_beyond_head_dim(post_rope_copy):
    def grow(lowrank):
        lowrank["ranks"][0] = [99, 99]

    _edit_json(post_rope_copy / "config.json", lambda d: grow(d["lowrank_attn"]))
    _edit_json(post_rope_copy / SIDECAR, lambda d: grow(d["lowrank"]))
    _rehash(post_rope_copy)
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
    assert not hasattr(lm.model.config, "lowrank_attn")


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


# ---------------------------------------------------------------- a type of its own; the remote-code route


def test_stock_transformers_refuses_without_remote_code(saved):
    from transformers import AutoModelForCausalLM

    for trust in (False, None):
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForCausalLM.from_pretrained(saved["post-rope"], trust_remote_code=trust)


ISOLATED = r'''
import sys
sys.path.append(sys.argv[3])  # the venv's packages, without their .pth files (the editable install of lowrank_attn)
try:
    import lowrank_attn
except ImportError:
    pass
else:
    sys.exit("lowrank_attn is importable: " + str(lowrank_attn.__file__))
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
out, ids, results = sys.argv[1], torch.tensor([[int(x) for x in sys.argv[2].split(",")]]), {}
for ckpt in sys.argv[4:]:
    try:
        AutoModelForCausalLM.from_pretrained(ckpt)
    except Exception as e:
        print("refused:", type(e).__name__, str(e).splitlines()[0])
    else:
        sys.exit("loaded without trust_remote_code")
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    for m in model.modules():  # the model card's route to compressed prompts without lowrank_attn
        if getattr(m, "lowrank_plan", None) is not None:
            m.lowrank_prefill = "compressed"
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=257)
    results[ckpt] = {"logits": logits, "gen": gen, "cls": type(model).__name__}
torch.save(results, out)
'''


def test_remote_code_route_without_lowrank_attn_installed(saved, compressed, tmp_path):
    """In a process where lowrank_attn cannot be imported, stock transformers refuses the checkpoint without
    trust_remote_code, and with it runs the bundled runtime: the logits of load_compressed."""
    import os
    import subprocess
    import sys
    import sysconfig

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    out = tmp_path / "out.pt"
    ids = ",".join(str(i) for i in IDS[0].tolist())
    modes = ["post-rope", "rope-pairs"]
    argv = [str(out), ids, sysconfig.get_paths()["purelib"], *(str(saved[m]) for m in modes)]
    res = subprocess.run([sys.executable, "-I", "-S", "-c", ISOLATED, *argv],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("refused: ValueError") == 2 and "trust_remote_code" in res.stdout
    results = torch.load(out)
    for mode in modes:
        got, ours = results[str(saved[mode])], load_compressed(saved[mode])
        assert got["cls"] == type(ours.model).__name__ == type(compressed[mode][0].model).__name__
        torch.testing.assert_close(got["logits"], _logits(ours.model), rtol=0, atol=0)
        assert torch.equal(got["gen"], _generate(ours.model, 6))


def test_runtime_files_travel_verbatim_and_the_loader_follows_them(saved):
    from transformers.dynamic_module_utils import get_relative_import_files

    from lowrank_attn.runtime import modeling_lowrank

    ckpt = saved["post-rope"]
    carried = {f.name for f in modeling_lowrank.runtime_files()}
    assert {"modeling_lowrank.py", "attention.py", "kcache.py", "adapters.py", "errors.py"} <= carried
    for name in carried:
        assert (ckpt / name).read_bytes() == (Path(modeling_lowrank.__file__).parent / name).read_bytes(), name
    # transformers copies a checkpoint's modules by following `from .x import` lines: every carried file
    followed = {Path(f).name for f in get_relative_import_files(str(ckpt / "modeling_lowrank.py"))}
    assert followed | {"modeling_lowrank.py"} == carried


@pytest.mark.parametrize("impl", ["eager", "flash_attention_2"])
def test_remote_route_forces_the_attention_implementation(impl, saved):
    from transformers import AutoModelForCausalLM

    ref = _logits(load_compressed(saved["post-rope"]).model)
    stock = AutoModelForCausalLM.from_pretrained(saved["post-rope"], trust_remote_code=True, attn_implementation=impl)
    assert stock.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(stock.eval()), ref, rtol=0, atol=0)


def test_transformers_version_check():
    from lowrank_attn.runtime.modeling_lowrank import UnsupportedTransformersError, check_transformers_version

    check_transformers_version()
    check_transformers_version("5.23.0")
    for v in ("5.22.1", "4.57.0", "6.0.0", "garbage"):
        with pytest.raises(UnsupportedTransformersError, match=r"transformers >=5\.23,<6\.0"):
            check_transformers_version(v)



def test_the_runtime_refuses_an_unsupported_transformers_at_import(monkeypatch):
    """The check runs before anything an older/newer transformers may lack is imported."""
    import importlib.util

    import transformers

    from lowrank_attn.runtime import modeling_lowrank

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    spec = importlib.util.spec_from_file_location("lowrank_attn.runtime._modeling_check", modeling_lowrank.__file__)
    with pytest.raises(ImportError, match="need transformers >=5.23,<6.0.*this is transformers 4.57.1"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# ---------------------------------------------------------------- dtype, delta, model card


def _dtypes(ckpt: Path, name: str) -> dict:
    from safetensors import safe_open

    with safe_open(str(ckpt / name), "pt") as st:
        return {k: st.get_slice(k).get_dtype() for k in st.keys()}


def test_save_in_bfloat16(compressed, saved, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, rep = compressed["post-rope"]
    out = save_compressed(lm, rep, tmp_path / "bf16", dtype="bfloat16")
    dts = _dtypes(out, "model.safetensors")
    assert {v for k, v in dts.items() if "lowrank_" not in k} == {"BF16"}
    assert {v for k, v in dts.items() if "lowrank_" in k} == {"F32"}  # the maps stay float32
    assert json.loads((out / SIDECAR).read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["base_config"]["dtype"] == "bfloat16"
    full = (saved["post-rope"] / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.6 * full
    # the tied embedding / LM head is written once, as in float32 (not two bf16 copies)
    assert set(dts) == set(_dtypes(saved["post-rope"], "model.safetensors"))
    back = load_compressed(out)
    assert back.model.get_input_embeddings().weight.dtype == torch.bfloat16
    ref = _logits(lm.model)
    torch.testing.assert_close(_logits(load_compressed(out, dtype="float32").model), ref, rtol=0.05, atol=0.05)
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert stock.get_input_embeddings().weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(stock), _logits(back.model), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="dtype"):
        save_compressed(lm, rep, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("mode", ["post-rope", "rope-pairs"])
def test_delta_checkpoint(mode, compressed, saved, tmp_path):
    lm, rep = compressed[mode]
    out = save_compressed(lm, rep, tmp_path / "delta", delta=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "delta.safetensors", SIDECAR]
    keys = set(_dtypes(out, "delta.safetensors"))
    if mode == "post-rope":  # only the maps: the projections are the base's
        assert keys and all(k.rsplit(".", 1)[-1].startswith("lowrank_") for k in keys)
    else:  # the selected q/k rows and plane dims; v, o, MLP, embeddings are the base's
        assert {k.split("self_attn.")[-1] for k in keys} == {"q_proj.weight", "q_proj.bias", "k_proj.weight",
                                                              "k_proj.bias", "lowrank_dims"}
    side = json.loads((out / SIDECAR).read_text())
    assert side["delta"] is True and side["base"]["name"] == CASES[mode][0] and len(side["base"]["weights_sha256"]) == 64
    assert (out / "delta.safetensors").stat().st_size < 0.25 * (saved[mode] / "model.safetensors").stat().st_size
    ref = _logits(lm.model)
    back = load_compressed(out)  # base from the sidecar
    torch.testing.assert_close(_logits(back.model), ref, rtol=0, atol=0)
    assert back.tokenizer("Hello").input_ids == lm.tokenizer("Hello").input_ids
    torch.testing.assert_close(_logits(load_compressed(out, base=CASES[mode][0]).model), ref, rtol=0, atol=0)


def test_delta_refuses_another_base(compressed, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, rep = compressed["post-rope"]
    out = save_compressed(lm, rep, tmp_path / "delta", delta=True)
    other = load_model("tiny-llama")
    with torch.no_grad():
        other.model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3  # same q/k, one MLP weight changed
    with pytest.raises(CheckpointError, match="was made from 'tiny-llama'.*different model") as e:
        load_compressed(out, base=other)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="different model"):
        load_compressed(out, base="tiny-qwen2")
    for trust in (False, True):  # a model type of its own, no remote code: transformers names it and stops
        with pytest.raises(ValueError, match="lowrank_attn_delta"):
            AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust)
    with pytest.raises(CheckpointError, match="only for delta"):
        load_compressed(save_compressed(lm, rep, tmp_path / "full"), base="tiny-llama")


def test_model_card(saved, compressed, tmp_path):
    card = (saved["post-rope"] / "README.md").read_text()
    _, rep = compressed["post-rope"]
    for needle in ("post-rope", "tiny-llama", "trust_remote_code=True", "load_compressed", "bf16 dense cache",
                   f"{rep['summary']['tv_mean']:.4f}", "last 8 (window)"):
        assert needle in card, needle
    # 2 layers × 2 KV heads × r_max 8 × 2 bytes per token vs 2 × 2 × 16 × 2 dense; values not compressed
    assert "keys 64 bytes and values 128 bytes vs 128 bytes each for a bf16 dense cache" in card
    assert "| values | not projected, not quantised |" in card
    lm, rep = compressed["post-rope"]
    delta = (save_compressed(lm, rep, tmp_path / "d", delta=True) / "README.md").read_text()
    assert "delta" in delta and "base='tiny-llama'" in delta and "trust_remote_code" not in delta
    assert "load_compressed('DIR')" in card and "from_pretrained('DIR', trust_remote_code=True)" in card
    assert "A prompt attends its own tokens densely" in card and "attends its own tokens densely" in delta  # post-rope
    assert 'set_prefill(model, "compressed")' in card and 'set_prefill(model, "compressed")' in delta


def test_a_model_loaded_through_remote_code_saves_a_checkpoint_that_is_never_dense(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(saved["post-rope"], trust_remote_code=True).eval()
    stock.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["model_type"] == "lowrank_attn"
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=False)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(again), _logits(stock), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["post-rope", "rope-pairs"])
def test_plain_save_pretrained_of_a_compressed_model_is_never_dense(mode, text, tmp_path):
    """compress() in place, then the user's own model.save_pretrained(DIR): a lowrank_attn checkpoint that
    stock transformers refuses and remote code loads with the same logits (not the dense base class)."""
    from transformers import AutoModelForCausalLM

    lm, _ = _compress(mode, text)
    assert type(lm.model).__name__.startswith("LowRank")
    lm.model.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "lowrank_attn"
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain", trust_remote_code=False)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(again), _logits(lm.model), rtol=0, atol=0)


def test_round_trip_gemma3_sliding_layers(tmp_path):
    """Gemma-3 (q/k norms, sliding-window layers, a config class of its own) through both routes, and a
    left-padded batch generated by the remote-code model equals load_compressed's."""
    from transformers import AutoModelForCausalLM

    from lowrank_attn.models import LoadedModel
    from lowrank_attn.runtime import adapters
    from lowrank_attn.runtime.plan import LayerPlan
    from lowrank_attn.runtime.modeling_lowrank import apply_lowrank
    from lowrank_attn.tiny import build_tiny

    model, tok = build_tiny("tiny-gemma3")
    lay = adapters.head_layout(model)
    g = torch.Generator().manual_seed(0)
    plans = []
    for window in (4, 4, 16):  # sliding, sliding, full: an exact window per layer (plans.exact_windows)
        rows = torch.linalg.qr(torch.randn(lay.num_kv_heads, lay.head_dim, lay.head_dim, generator=g))[0][..., :8]
        rows = rows.transpose(-1, -2).contiguous()  # (Hkv, 8, d)
        plans.append(LayerPlan(mode="post-rope", ranks=[8] * lay.num_kv_heads, q_map=rows, k_map=rows.clone(),
                               window=window, sink=1))
    apply_lowrank(model, plans)
    out = save_compressed(LoadedModel(model, tok, "tiny-gemma3", "random:tiny-gemma3:seed0"), {}, tmp_path / "g3")
    assert json.loads((out / SIDECAR).read_text())["lowrank"]["window"] == [4, 4, 16]
    ours = load_compressed(out).model
    assert [m.lowrank_plan.window for m in adapters.attention_modules(ours)] == [4, 4, 16]
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(stock).__name__ == "LowRankGemma3ForCausalLM"
    ref = _logits(model)
    torch.testing.assert_close(_logits(ours), ref, rtol=0, atol=0)
    torch.testing.assert_close(_logits(stock), ref, rtol=0, atol=0)
    tok.padding_side = "left"
    enc = tok(["Hello", "The quick brown fox jumps over the lazy dog"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, num_beams=2)
    with torch.no_grad():
        assert torch.equal(stock.generate(**enc, **kw), ours.generate(**enc, **kw))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_every_family_save_load_generate(kind, public_text, tmp_path):
    """Every claimed family (a tiny random model each): compressed at full rank, saved, and loaded both ways
    (load_compressed and the remote-code route) gives the dense model's logits and its greedy tokens. Gemma-2
    (soft-capped logits, a class without SDPA) is built with eager attention on both routes."""
    from transformers import AutoModelForCausalLM

    from lowrank_attn.runtime import adapters
    from lowrank_attn.runtime.modeling_lowrank import attention_implementation

    dense = load_model(kind).model
    recipe = Recipe(model=kind, text=[public_text], rank_ratio=1.0, seq_len=64, max_tokens=256, heldout_tokens=0,
                    k_bits=None, v_bits=None)
    lm, rep = compress(load_model(kind), recipe, progress=False)
    d = adapters.head_layout(dense).head_dim
    assert all(h["rank"] == d for lay in rep["layers"] for h in lay["kv_heads"])
    out = save_compressed(lm, rep, tmp_path / "ck")
    ref, ref_gen = _logits(dense), _generate(dense)
    ours = load_compressed(out).model
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    want = "eager" if kind == "tiny-gemma2" else "sdpa"
    assert attention_implementation(type(dense)) == want
    for name, model in (("load_compressed", ours), ("remote code", stock)):
        assert type(model).__name__ == type(lm.model).__name__, name
        assert model.config._attn_implementation == want, name
        got = _logits(model)
        torch.testing.assert_close(got, _logits(lm.model), rtol=0, atol=0, msg=lambda m: f"{kind} {name}: {m}")
        diff = float((got - ref).abs().max())
        assert diff < 1e-4, f"{kind} {name}: max |Δlogit| vs dense = {diff:.3g}"
        assert torch.equal(_generate(model), ref_gen), f"{kind} {name}: greedy tokens differ from dense"


def test_cli_compress_loads_calibrates_and_saves_in_dtype_with_a_device_map(tmp_path):
    """`compress --dtype bfloat16 --device-map cpu`: the model is loaded in bf16 by accelerate (not fp32 then cast),
    calibrated in it, and saved in it."""
    from typer.testing import CliRunner

    from lowrank_attn.cli import app

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama.yaml"
    out = tmp_path / "bf16"
    res = CliRunner().invoke(app, ["compress", "tiny-llama", "--recipe", str(recipe), "--dtype", "bfloat16",
                                   "--device-map", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    side = json.loads((out / SIDECAR).read_text())
    assert side["dtype"] == "bfloat16" and side["recipe"]["dtype"] == "bfloat16"
    assert {v for k, v in _dtypes(out, "model.safetensors").items() if "lowrank_" not in k} == {"BF16"}
    assert load_compressed(out).model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_reloaded_plans_hold_the_saved_maps(compressed, saved, text):
    """After load_compressed each layer's plan holds the maps the model computes with (not the zero maps the
    config gives), so what reads plans — ``eval --dense``'s attention KL — measures the checkpoint."""
    from lowrank_attn.heldout import attention_kl
    from lowrank_attn.runtime import adapters

    lm = compressed["post-rope"][0]
    loaded = load_compressed(saved["post-rope"])
    for a, b in zip(adapters.attention_modules(lm.model), adapters.attention_modules(loaded.model)):
        for field in ("q_map", "k_map"):
            torch.testing.assert_close(getattr(b.lowrank_plan, field), getattr(a.lowrank_plan, field).float())
    dense = load_model("tiny-llama")
    kl = attention_kl(dense, lm, text_file=text, max_length=128)
    assert kl > 0
    assert attention_kl(dense, loaded, text_file=text, max_length=128) == pytest.approx(kl, rel=1e-4)


def test_a_weight_beyond_the_load_dtype_is_refused(compressed, tmp_path):
    """Finiteness is checked in the dtype the weights are loaded in: a float32 weight beyond float16's range is
    refused with one line instead of loading as inf."""
    import copy

    lm = copy.deepcopy(compressed["post-rope"][0])
    with torch.no_grad():
        next(p for n, p in lm.model.named_parameters() if "mlp" in n).view(-1)[0] = 1e6
    out = save_compressed(lm, {}, tmp_path / "big", dtype="float32")
    load_compressed(out)  # fine in float32
    with pytest.raises(CheckpointError, match="not finite in torch.float16"):
        load_compressed(out, dtype="float16")
