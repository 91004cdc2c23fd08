"""Half precision and device plumbing: balanced maps (products unchanged, magnitudes independent of
the token count), models loaded straight into bf16/fp16, every tensor of a compressed model on the
model's device (and none on ``meta``), compress → save → load → generate in half precision, full rank
within the half-precision model's own error, and undoing surgery without a copy of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_attn.checkpoint import load_compressed, save_compressed
from lowrank_attn.compression import compress
from lowrank_attn.errors import ModelLoadError
from lowrank_attn.fit import balance_maps, fit_head, logit_error
from lowrank_attn.models import load_model, parse_dtype, restorable
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime import adapters
from lowrank_attn.runtime.surgery import prefill_as

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11, 40, 41, 3, 8]])


def _psd(rng, d, cond=1e6):
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (u * np.geomspace(1, 1 / cond, d)) @ u.T


# ---------------------------------------------------------------- balancing (pure)

def test_balance_keeps_products_and_equalises_row_norms():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 8)) * 1e3, rng.standard_normal((6, 8)) * 1e-3
    a[5] = 0.0  # a padding row stays as it is
    qa, kb = balance_maps(a, b)
    np.testing.assert_allclose(qa.T @ kb, a.T @ b, rtol=1e-12, atol=1e-15)
    live = slice(0, 5)
    np.testing.assert_allclose(np.linalg.norm(qa[live], axis=1), np.linalg.norm(kb[live], axis=1), rtol=1e-12)
    np.testing.assert_array_equal(qa[5], 0.0)
    np.testing.assert_array_equal(kb[5], b[5])


def test_fit_maps_do_not_depend_on_token_count():
    """Gram sums scale with N; the balanced maps must not (unbalanced: A ∝ √N, B ∝ 1/√N)."""
    rng = np.random.default_rng(1)
    d = 16
    gq, gk = _psd(rng, d, 1e3), _psd(rng, d, 1e7)
    small, big = fit_head(gq, gk, ridge=1e-6), fit_head(gq * 1e6, gk * 1e6, ridge=1e-6)
    np.testing.assert_allclose(big.q_map, small.q_map, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(big.k_map, small.k_map, rtol=1e-6, atol=1e-9)
    qn, kn = np.linalg.norm(small.q_map, axis=1), np.linalg.norm(small.k_map, axis=1)
    np.testing.assert_allclose(qn, kn, rtol=1e-10)
    for r in (1, 4, d):  # the error the allocation relies on is still the eigenvalue tail
        assert logit_error(gq, gk, small.q_map[:r], small.k_map[:r]) == pytest.approx(small.error(r), rel=1e-3)  # ridge


def test_balanced_maps_survive_fp16():
    """A badly conditioned key Gram summed over many tokens: unbalanced maps leave fp16's range, balanced
    ones give the full-rank product (the identity) to half-precision accuracy."""
    rng = np.random.default_rng(2)
    d, n = 32, 2.0**20
    gq, gk = _psd(rng, d, 1e4) * n, _psd(rng, d, 1e8) * n
    hf = fit_head(gq, gk, ridge=1e-6)
    prod = torch.tensor(hf.q_map, dtype=torch.float16).double().T @ torch.tensor(hf.k_map, dtype=torch.float16).double()
    assert torch.isfinite(prod).all()
    ref = torch.tensor(hf.q_map.T @ hf.k_map)
    assert (prod - ref).norm() / ref.norm() < 0.05


# ---------------------------------------------------------------- dtype loading

def test_parse_dtype_refuses_unknown():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None) is torch.float32
    with pytest.raises(ModelLoadError, match="dtype"):
        parse_dtype("float8")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny-llama", dtype="half-ish")


@pytest.fixture(scope="module")
def text(alice_text):
    return alice_text


def _recipe(text, **kw):
    base = dict(model="tiny-llama", mode="post-rope", policy="uniform", rank_ratio=0.5, seq_len=64, max_tokens=512,
                heldout_tokens=64, weighting="none", exact_window=8, text=[text], k_bits=None, v_bits=None)
    return Recipe(**{**base, **kw})


def _tensors(model):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _logits(model, ids=IDS):
    with torch.inference_mode(), prefill_as(model, "compressed"):  # a compressed model: its compressed attention
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_compress_save_load_generate(dtype, text, tmp_path):
    lm = load_model("tiny-llama", dtype=dtype)
    assert {p.dtype for p in lm.model.parameters()} == {parse_dtype(dtype)}
    lm, report = compress(lm, _recipe(text), progress=False)
    maps = [b for n, b in lm.model.named_buffers() if "lowrank_" in n]
    assert maps and all(b.dtype == torch.float32 for b in maps)  # the maps stay fp32 in a half model
    save_compressed(lm, report, tmp_path / "ck")
    back = load_compressed(tmp_path / "ck")  # the checkpoint's own dtype by default
    assert back.model.get_input_embeddings().weight.dtype == parse_dtype(dtype)
    assert all(b.dtype == torch.float32 for n, b in back.model.named_buffers() if "lowrank_" in n)
    torch.testing.assert_close(_logits(back.model), _logits(lm.model), rtol=0, atol=0)
    with torch.inference_mode():
        out = back.model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, max_new_tokens=6,
                                  pad_token_id=0)
    assert out.shape[1] == IDS.shape[1] + 6
    f32 = load_compressed(tmp_path / "ck", dtype="float32")
    assert f32.model.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_full_rank_within_the_dense_half_error(dtype, text):
    """Full rank is exact in exact arithmetic; in half precision it may differ from the dense half model
    by no more than the dense half model differs from fp32."""
    ref = _logits(load_model("tiny-llama").model)
    dense = load_model("tiny-llama", dtype=dtype)
    dense_err = (_logits(dense.model) - ref).abs().max().item()
    lm, _ = compress(load_model("tiny-llama", dtype=dtype), _recipe(text, rank_ratio=1.0), progress=False)
    ours_err = (_logits(lm.model) - ref).abs().max().item()
    assert dense_err > 0  # half precision really is in play
    assert ours_err <= 3 * dense_err


# ---------------------------------------------------------------- device plumbing

@pytest.mark.parametrize("kind,mode", [("tiny-llama", "post-rope"), ("tiny-qwen2", "rope-pairs"),
                                       ("tiny-gpt2", "bilinear")])
def test_every_tensor_on_the_model_device(kind, mode, text):
    lm = load_model(kind)
    lm, _ = compress(lm, _recipe(text, model=kind, mode=mode, exact_window=8 if mode == "post-rope" else 0),
                     progress=False)
    dev = lm.model.get_input_embeddings().weight.device
    bad = [n for n, t in _tensors(lm.model) if t.device != dev or t.is_meta]
    assert not bad, bad
    with torch.inference_mode():
        out = lm.model(input_ids=IDS.to(dev), use_cache=True)
    cache = [t for layer in out.past_key_values.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    assert cache and all(t.device == dev and not t.is_meta for t in cache)


def test_restorable_undoes_compression_without_a_copy(text):
    lm = load_model("tiny-qwen2")
    before = _logits(lm.model)
    keys = {n: t.data_ptr() for n, t in lm.model.state_dict().items()}
    cls = [type(m) for m in adapters.attention_modules(lm.model)]
    with restorable(lm.model):
        compress(lm, _recipe(text, model="tiny-qwen2", mode="rope-pairs", exact_window=0), progress=False)
        assert not torch.equal(_logits(lm.model), before)
    assert [type(m) for m in adapters.attention_modules(lm.model)] == cls
    assert {n: t.data_ptr() for n, t in lm.model.state_dict().items()} == keys  # the very same tensors
    torch.testing.assert_close(_logits(lm.model), before, rtol=0, atol=0)
    compress(lm, _recipe(text, model="tiny-qwen2", mode="rope-pairs", exact_window=0), progress=False)  # again


def test_local_dir_loads_in_dtype_through_device_map(tmp_path):
    """A saved HF directory is read straight into the requested dtype, placed by accelerate with device_map."""
    src = load_model("tiny-llama")
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), dtype="bfloat16", device_map="cpu")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in lm.model.parameters())
    inv = [b for n, b in lm.model.named_buffers() if n.endswith("inv_freq")]
    assert inv and all(b.dtype == torch.float32 for b in inv)
    ref = _logits(load_model("tiny-llama", dtype="bfloat16").model)
    torch.testing.assert_close(_logits(lm.model), ref, rtol=0, atol=0)  # the same model as the in-code one
