"""The weight-SVD baseline on RoPE models: the rank-r truncation of each query head's W_q^T W_k
folded into W_q before RoPE. Exact at full rank, really rank r below it, and never saved as a checkpoint."""

from __future__ import annotations

import pytest
import torch

from lowrank_attn.runtime import adapters
from lowrank_attn.checkpoint import save_compressed
from lowrank_attn.compression import compress
from lowrank_attn.errors import CheckpointError
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.texts import load_texts, token_windows
from lowrank_attn.runtime.surgery import prefill_as

pytestmark = pytest.mark.usefixtures("single_thread")


def _weight_svd(kind, text, ratio):
    recipe = Recipe(model=kind, fit="weight-svd", policy="uniform", rank_ratio=ratio, seq_len=64, max_tokens=256,
                    heldout_tokens=64, weighting="none", exact_window=0, text=[text])
    return compress(load_model(kind), recipe, progress=False)


def _logits(model, ids, pos=None):
    with torch.no_grad(), prefill_as(model, "compressed"):  # a compressed model: its compressed attention
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_full_rank_is_exact(kind, alice_text):
    dense = load_model(kind)
    ids = token_windows(dense.tokenizer, load_texts([alice_text]), seq_len=96)[3].input_ids[None]
    lm, report = _weight_svd(kind, alice_text, 1.0)
    for offset in (0, 1000):
        pos = torch.arange(ids.shape[1])[None] + offset
        assert torch.allclose(_logits(lm.model, ids, pos), _logits(dense.model, ids, pos), atol=1e-4)
    assert report["summary"]["mean_rank_ratio"] == 1.0


def test_reduced_rank_folds_a_rank_r_map_before_rope(alice_text):
    dense = load_model("tiny-llama")
    lm, report = _weight_svd("tiny-llama", alice_text, 0.25)
    layout = adapters.head_layout(dense.model)
    d = layout.head_dim
    for layer in range(layout.num_layers):
        wq_dense, wk_dense = adapters.qk_weights(dense.model, layer)
        wq, wk = adapters.qk_weights(lm.model, layer)
        assert torch.equal(wk, wk_dense) and wq.shape == wq_dense.shape  # the K cache is not reduced
        for h in range(layout.num_heads):  # each query head's interaction W_q,h^T W_k has rank r
            assert torch.linalg.matrix_rank(wq[h * d : (h + 1) * d].double(), rtol=1e-6) == d // 4
    assert report["summary"]["mean_rank_ratio"] == 0.25
    assert "not reduced" in report["summary"]["keys"]
    ids = token_windows(dense.tokenizer, load_texts([alice_text]), seq_len=96)[3].input_ids[None]
    assert not torch.allclose(_logits(lm.model, ids), _logits(dense.model, ids), atol=1e-3)


def test_not_saved_as_checkpoint(alice_text, tmp_path):
    lm, report = _weight_svd("tiny-llama", alice_text, 0.5)
    with pytest.raises(CheckpointError, match="baseline"):
        save_compressed(lm, report, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
