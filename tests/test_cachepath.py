"""Perplexity through the cache (cachepath) and the peers run as their users run them (peers)."""

from __future__ import annotations


import pytest
import torch

from lowrank_attn.cachepath import cache_bytes, chunked_nll, copy_logprobs
from lowrank_attn.compression import compress
from lowrank_attn.lm_eval_model import check_kv_cache
from lowrank_attn.models import load_model
from lowrank_attn.peers import PEERS, PeerUnavailableError, installed, make_cache
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime import adapters
from lowrank_attn.texts import load_texts, token_windows

pytestmark = pytest.mark.usefixtures("single_thread")


def _ids(lm, text, n=300):
    return token_windows(lm.tokenizer, load_texts([text]), seq_len=n)[1].input_ids


def _single_nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
    return -float(torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum())


def test_chunked_dense_equals_one_forward_and_bytes_are_the_tensors(public_text):
    lm = load_model("tiny-llama")
    ids = _ids(lm, public_text)
    nll, n, cache = chunked_nll(lm.model, ids, chunk=64)
    assert n == ids.numel() - 1
    assert abs(nll - _single_nll(lm.model, ids)) < 1e-3 * n
    lay = adapters.head_layout(lm.model)
    dense = lay.num_layers * lay.num_kv_heads * lay.head_dim * 2 * ids.numel()  # bf16, one of K or V
    assert cache_bytes(cache) == {"k": dense, "v": dense, "total": 2 * dense}


def test_chunked_compressed_sees_what_the_cache_stored(public_text):
    """With quantised keys and values, a chunked pass (later chunks attend to stored codes) differs from one forward
    over the window, and the bytes it measures are the compressed cache's."""
    lm = load_model("tiny-llama")
    rec = Recipe(model="tiny-llama", text=[public_text], seq_len=128, max_tokens=1024, heldout_tokens=256,
                 rank_ratio=0.5, k_bits=2, v_bits=2, v_group=8, exact_window=8, v_window=8)
    lm2, report = compress(lm, rec, progress=False)
    ids = _ids(lm2, public_text)
    nll, n, cache = chunked_nll(lm2.model, ids, chunk=64)
    b = cache_bytes(cache)
    dense_one = 2 * ids.numel() * adapters.head_layout(lm2.model).num_layers * 2 * 16  # (kv heads 2, d 16)
    assert b["total"] == b["k"] + b["v"] and b["v"] < 0.5 * dense_one
    assert nll / n != pytest.approx(_single_nll(lm2.model, ids) / n, rel=1e-6)


def test_copy_probe_reads_the_first_copy_through_the_cache(public_text):
    """copy_logprobs: dense, the second copy's log-probs are one forward's over BOS + A + A (the dense cache loses
    nothing); a 2-bit cache changes them (the second chunk reads the first as stored)."""
    lm = load_model("tiny-llama")
    a = _ids(lm, public_text, 80)[1:].tolist()
    prefix = [lm.tokenizer.bos_token_id]
    got = copy_logprobs(lm.model, prefix, a)
    with torch.no_grad():
        whole = lm.model(input_ids=torch.tensor(prefix + a + a)[None], use_cache=False).logits[0].float()
    want = torch.log_softmax(whole, -1)[len(prefix) + len(a): -1]  # rows predicting the repeat's a[1:]
    assert got.shape == (len(a) - 1, whole.shape[-1]) and torch.allclose(got, want, atol=1e-4)
    rec = Recipe(model="tiny-llama", text=[public_text], seq_len=128, max_tokens=1024, heldout_tokens=256,
                 rank_ratio=0.5, k_bits=2, v_bits=2, v_group=8, exact_window=8, v_window=8)
    small, report = compress(lm, rec, progress=False)
    assert not torch.allclose(copy_logprobs(small.model, prefix, a), want, atol=1e-3)
    copy = report["summary"]["long_range_copy"]  # compress runs the probe on its first held-out window
    assert set(copy) == {"tokens", "kl", "accuracy", "dense_accuracy"} and copy["kl"] >= 0 and copy["tokens"] > 50
    assert 0 <= copy["accuracy"] <= 1 and 0 <= copy["dense_accuracy"] <= 1


def test_copy_line_warns_when_copying_is_lost():
    """The compress summary's copy line warns at COPY_WARN_POINTS under dense (Gemma-3's byte target: 63% vs
    98%), not at a small loss (SmolLM2's: 92% vs 95%)."""
    from lowrank_attn.cli.compress import copy_line

    lost = copy_line({"tokens": 1023, "kl": 1.47, "accuracy": 0.632, "dense_accuracy": 0.975})
    kept = copy_line({"tokens": 1023, "kl": 0.07, "accuracy": 0.924, "dense_accuracy": 0.947})
    assert "top-1 63.2% (dense 97.5%)" in lost and "warning: the compressed cache loses long-range copying" in lost
    assert "top-1 92.4% (dense 94.7%)" in kept and "warning" not in kept


def test_unknown_or_missing_peer_is_one_clear_line():
    with pytest.raises(PeerUnavailableError, match="unknown peer 'kivi-9bit'; known: quanto-4bit"):
        make_cache("kivi-9bit", None)
    assert set(PEERS) >= {"quanto-4bit", "quanto-2bit", "hqq-4bit", "hqq-2bit", "quanto-4bit-kivi"}
    # a peer that needs whole groups of tokens is refused where prompts have any length (RULER, lm-eval)
    assert [n for n, p in PEERS.items() if not p.any_length] == ["quanto-4bit-kivi", "quanto-2bit-kivi"]
    with pytest.raises(PeerUnavailableError, match="cannot generate from prompts of any length") as e:
        check_kv_cache("quanto-2bit-kivi")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not installed("optimum.quanto"), reason="optimum-quanto not installed (the dev extra installs it)")
@pytest.mark.parametrize("family, refused", [("tiny-gemma3", True), ("tiny-mistral", True), ("tiny-llama", False)])
def test_peer_refuses_sliding_window_models_in_one_line(family, refused):
    """QuantizedCache takes only models whose every layer attends fully; a model with sliding layers is one line."""
    lm = load_model(family)
    if not refused:
        assert make_cache("quanto-4bit", lm.model) is not None
        return
    with pytest.raises(PeerUnavailableError, match="runs only on models whose every layer attends fully") as e:
        make_cache("quanto-4bit", lm.model)
    assert "sliding_attention" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not installed("optimum.quanto"), reason="optimum-quanto not installed (the dev extra installs it)")
def test_kivi_peer_quantises_keys_per_channel(public_text):
    """``quanto-4bit-kivi`` is transformers' QuantizedCache with one setting changed, axis_key=-1 (keys per channel,
    KIVI's layout); the plain peer keeps transformers' default axis 0. Both are working caches of the same bytes, but
    quanto's groups then run over batch × KV heads × tokens, so the kivi peer refuses a sequence whose count is not a
    multiple of 64 (a prompt of any length: why it is measured through the cache in 512-token chunks, not on RULER)."""
    lm = load_model("tiny-llama")
    ids = _ids(lm, public_text, n=512)  # tiny-llama: 2 KV heads, so two chunks of 256 make whole groups of 64
    results = {}
    for name in ("quanto-4bit", "quanto-4bit-kivi"):
        nll, n, cache = chunked_nll(lm.model, ids, chunk=256, cache_factory=lambda m, p=name: make_cache(p, m))
        results[name] = (nll / n, cache_bytes(cache)["total"], {layer.axis_key for layer in cache.layers})
    assert results["quanto-4bit"][2] == {0} and results["quanto-4bit-kivi"][2] == {-1}
    assert results["quanto-4bit"][1] == results["quanto-4bit-kivi"][1]  # groups of 64 either way: same bytes
    assert results["quanto-4bit"][0] != results["quanto-4bit-kivi"][0]  # a different quantisation was read
    with pytest.raises(ValueError, match="must be a divisor"):
        chunked_nll(lm.model, ids[..., :200], chunk=200, cache_factory=lambda m: make_cache("quanto-4bit-kivi", m))


@pytest.mark.skipif(not installed("optimum.quanto"), reason="optimum-quanto not installed (the dev extra installs it)")
def test_quanto_peer_through_the_cache(public_text):
    lm = load_model("tiny-llama")
    ids = _ids(lm, public_text)
    nll, n, cache = chunked_nll(lm.model, ids, chunk=200, cache_factory=lambda m: make_cache("quanto-4bit", m))
    dense_nll, _, dense_cache = chunked_nll(lm.model, ids, chunk=200)
    b, d = cache_bytes(cache), cache_bytes(dense_cache)
    # 200 tokens as 4-bit codes + scales (the first update quantises all it sees), the last 100 in the residual window
    assert b["total"] < 0.6 * d["total"]
    assert abs(nll - dense_nll) / n < 0.5  # a working cache: close to dense, not equal
