"""CLI `compress` and `eval` on tiny models: a clear one-line error for bad input, results otherwise."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lowrank_attn.cli import app
from lowrank_attn.peers import installed

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, alice_text):
    out = tmp_path_factory.mktemp("ck") / "tiny"
    res = runner.invoke(app, ["compress", "tiny-llama", "--recipe", "recipes/tiny-llama.yaml", "--text", alice_text,
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, alice_text):
    p = tmp_path_factory.mktemp("txt") / "eval.txt"
    p.write_text(open(alice_text).read()[30000:34000])
    return p


def _fails(args, *needles):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, res.output
    for n in needles:
        assert n in line[0], line[0]


def test_eval_checkpoint_with_dense(ckpt, small_text, tmp_path):
    out = tmp_path / "res.json"
    res = runner.invoke(app, ["eval", str(ckpt), "--task", str(small_text), "--max-length", "128",
                              "--dense", "tiny-llama", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())["summary"]
    assert s["word_perplexity"] > 1 and s["dense_word_perplexity"] > 1
    assert s["attention_kl_per_row"] > 0 and s["next_token_kl"] > 0  # a 50% checkpoint does change attention
    # one forward per window: scored with compressed prompts (the default here), so it measures the compression
    assert s["prefill"] == "compressed" and s["word_perplexity"] != s["dense_word_perplexity"]


def test_eval_half_precision_checkpoint_beside_its_dense_model(alice_text, small_text, tmp_path):
    """A checkpoint compressed in float32 and saved in bfloat16 is compared with the dense model it was made from (the
    dense reference is fingerprinted in the dtype compress ran in, then evaluated in the checkpoint's), and another
    dense model is still refused."""
    ck = tmp_path / "bf16"
    res = runner.invoke(app, ["compress", "tiny-llama", "--recipe", "recipes/tiny-llama.yaml", "--text", alice_text,
                              "--save-dtype", "bfloat16", "--out", str(ck)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "res.json"
    res = runner.invoke(app, ["eval", str(ck), "--task", str(small_text), "--max-length", "128", "--dense",
                              "tiny-llama", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())["summary"]
    assert s["dense_word_perplexity"] > 1 and s["next_token_kl"] > 0
    _fails(["eval", str(ck), "--task", str(small_text), "--max-length", "128", "--dense", "tiny-qwen2"],
           "was not made from")


def test_eval_refuses_another_dense_model(ckpt, small_text):
    _fails(["eval", str(ckpt), "--task", str(small_text), "--max-length", "128", "--dense", "tiny-qwen2"],
           "was not made from")


def test_eval_bad_task_and_missing_file(ckpt, tmp_path):
    _fails(["eval", str(ckpt), "--task", "no-such-task"])
    _fails(["eval", str(ckpt), "--task", str(tmp_path / "missing.txt")])


def test_compress_refuses_existing_out_and_bad_values(ckpt, tmp_path):
    _fails(["compress", "tiny-llama", "--out", str(ckpt)], "already exists")
    _fails(["compress", "tiny-llama", "--rank-ratio", "0", "--out", str(tmp_path / "x")], "rank_ratio")
    _fails(["compress", "tiny-llama", "--mode", "sideways", "--out", str(tmp_path / "x")], "mode")
    _fails(["compress", "tiny-gpt2", "--mode", "rope-pairs", "--out", str(tmp_path / "x")], "RoPE")
    assert not (tmp_path / "x").exists()


def test_sweep_cli_bad_ratios(tmp_path):
    _fails(["sweep", "tiny-llama", "--ratios", "a,b", "--out", str(tmp_path / "s")], "--ratios")
    _fails(["sweep", "tiny-llama", "--ratios", "", "--out", str(tmp_path / "s")], "ratios")
    _fails(["sweep", "tiny-llama", "--methods", ",", "--out", str(tmp_path / "s")], "--methods")


def test_eval_cache_ppl_with_dense_and_a_peer(ckpt, small_text, tmp_path):
    """--task cache-ppl: perplexity through the cache in chunks and the K/V bytes it held, beside the dense cache."""
    out = tmp_path / "cache.json"
    res = runner.invoke(app, ["eval", str(ckpt), "--task", "cache-ppl", "--text", str(small_text), "--max-length",
                              "128", "--chunk", "32", "--dense", "tiny-llama", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())["summary"]
    assert s["token_perplexity"] > 1 and s["dense"]["token_perplexity"] > 1 and s["windows"] >= 1
    b, d = s["bytes_per_token"], s["dense"]["bytes_per_token"]
    assert b["k"] < d["k"] and b["v"] < d["v"]  # the defaults: low-rank 4-bit keys, 4-bit values
    assert "KV bytes vs the dense bf16 cache" in res.output
    _fails(["eval", "tiny-llama", "--task", "cache-ppl", "--text", str(small_text), "--kv-cache", "kivi-9bit"],
           "unknown peer")
    # a window beyond the model's positions, and no windows at all, as the other tasks refuse them
    _fails(["eval", "tiny-llama", "--task", "cache-ppl", "--text", str(small_text), "--max-length", "4096"],
           "exceeds the model's maximum")
    _fails(["eval", "tiny-llama", "--task", "cache-ppl", "--text", str(small_text), "--limit", "0"],
           "--limit must be a positive")


@pytest.mark.parametrize("args, words", [
    (["tiny-llama", "--task", "cache-ppl", "--dense", "tiny-llama", "--peers", "quanto-4bit"], ["give a checkpoint"]),
    (["CKPT", "--task", "cache-ppl", "--peers", "quanto-4bit"], ["give a checkpoint and --dense"]),
    (["CKPT", "--task", "passkey", "--dense", "tiny-llama", "--peers", "quanto-4bit"], ["cache-ppl or ruler"]),
    (["CKPT", "--task", "cache-ppl", "--dense", "tiny-llama", "--peers", "kivi-9bit"], ["unknown peer 'kivi-9bit'"]),
    (["CKPT", "--task", "ruler", "--dense", "tiny-llama", "--peers", " , "], ["name at least one peer"]),
    (["CKPT", "--task", "ruler", "--dense", "tiny-llama", "--peers", "quanto-4bit-kivi"], ["prompts of any length"]),
    (["tiny-llama", "--task", "ruler", "--kv-cache", "quanto-2bit-kivi"], ["prompts of any length"]),
])
def test_eval_peers_bad_input_is_one_line(ckpt, args, words):
    _fails(["eval", *[str(ckpt) if a == "CKPT" else a for a in args]], *words)


@pytest.mark.skipif(not installed("hqq"), reason="hqq not installed (the dev extra installs it)")
def test_eval_peer_on_a_model_with_sliding_layers_is_one_line(small_text, tmp_path):
    """transformers' QuantizedCache refuses models with sliding-window layers (Gemma-2/3, Mistral): one line, after
    loading and before any evaluation, nothing written."""
    out = tmp_path / "res.json"
    _fails(["eval", "tiny-gemma3", "--task", "cache-ppl", "--text", str(small_text), "--max-length", "64",
            "--kv-cache", "hqq-4bit", "--out", str(out)], "hqq-4bit: transformers' QuantizedCache runs only on models",
           "sliding_attention")
    assert not out.exists()


@pytest.mark.skipif(not installed("optimum.quanto"), reason="optimum-quanto not installed (the dev extra installs it)")
def test_eval_cache_ppl_beside_a_peer(ckpt, small_text, tmp_path):
    """--peers: transformers' QuantizedCache runs on the dense model over the same windows as the checkpoint and
    dense, each with its own perplexity and K+V bytes measured from its cache."""
    out = tmp_path / "peers.json"
    res = runner.invoke(app, ["eval", str(ckpt), "--task", "cache-ppl", "--text", str(small_text), "--max-length",
                              "128", "--chunk", "32", "--dense", "tiny-llama", "--peers", "quanto-4bit", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())["summary"]
    peer, dense = s["peers"]["quanto-4bit"], s["dense"]
    assert peer["windows"] == dense["windows"] == s["windows"] and peer["tokens"] == dense["tokens"]
    assert peer["bytes_per_token"]["total"] < dense["bytes_per_token"]["total"]
    assert peer["token_perplexity"] != dense["token_perplexity"]  # the quantised cache is read, not dense's
    assert "quanto-4bit (QuantizedCache on the dense model): token perplexity through the cache" in res.output


def test_eval_cache_ppl_exact_prefill(ckpt, small_text, tmp_path):
    """--prefill exact (cache-ppl's default: the checkpoint as served): each chunk attends its own tokens densely, the
    cache the same bytes; bad values refused in one line."""
    runs = {}
    for prefill in ("compressed", "exact", None):
        out = tmp_path / f"{prefill}.json"
        res = runner.invoke(app, ["eval", str(ckpt), "--task", "cache-ppl", "--text", str(small_text), "--max-length",
                                  "128", "--chunk", "64", "--out", str(out)] + (["--prefill", prefill] if prefill else []))
        assert res.exit_code == 0, res.output
        runs[prefill] = json.loads(out.read_text())["summary"]
    assert runs["exact"]["prefill"] == "exact" and runs["compressed"]["prefill"] == "compressed"
    assert runs[None]["prefill"] == "exact" and runs[None]["token_perplexity"] == runs["exact"]["token_perplexity"]
    assert runs["exact"]["bytes_per_token"] == runs["compressed"]["bytes_per_token"]
    assert runs["exact"]["token_perplexity"] != runs["compressed"]["token_perplexity"]
    _fails(["eval", str(ckpt), "--task", "cache-ppl", "--prefill", "fast"], "--prefill must be one of")
    _fails(["eval", "tiny-llama", "--task", "cache-ppl", "--text", str(small_text), "--prefill", "exact"],
           "no compressed attention")


def test_eval_ruler_checkpoint_beside_dense(ckpt, tmp_path):
    """``eval --task ruler``: lm-eval's own niah_single_1, data built offline from the checkpoint's tokenizer, run
    for the checkpoint (as served: prompts exact) and the dense model on the same seeded prompt; each method's
    score and K+V bytes measured after a prefill (the checkpoint's below dense, dense's the bf16 reference)."""
    out = tmp_path / "ruler.json"
    res = runner.invoke(app, ["eval", str(ckpt), "--task", "ruler", "--ruler-tasks", "niah_single_1",
                              "--max-length", "1024", "--limit", "1", "--dense", "tiny-llama", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "RULER at 1024 tokens, 1 samples per task" in res.output and "| niah_single_1 | mean |" in res.output
    doc = json.loads(out.read_text())
    methods = doc["summary"]["methods"]
    assert list(methods) == ["dense", ckpt.name] and doc["summary"]["prefill"] == "exact"
    assert methods["dense"]["kv_fraction"] == 1.0 and 0 < methods[ckpt.name]["kv_fraction"] < 0.6
    assert all(0 <= m["scores"]["niah_single_1"] <= 100 for m in methods.values())
    rows = doc["rows"]
    assert [(r["method"], r["task"], r["length"], r["n"]) for r in rows] == [
        ("dense", "niah_single_1", 1024, 1), (ckpt.name, "niah_single_1", 1024, 1)]
    assert rows[0]["prompts_sha"] == rows[1]["prompts_sha"]  # the same prompt for both


@pytest.mark.skipif(not installed("optimum.quanto"), reason="optimum-quanto not installed (the dev extra installs it)")
def test_eval_ruler_beside_a_peer(ckpt, tmp_path):
    """--peers with --task ruler: the peer's row on the dense model, the same prompt, its own K+V bytes."""
    out = tmp_path / "ruler-peer.json"
    res = runner.invoke(app, ["eval", str(ckpt), "--task", "ruler", "--ruler-tasks", "niah_single_1", "--max-length",
                              "1024", "--limit", "1", "--dense", "tiny-llama", "--peers", "quanto-4bit", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    methods = doc["summary"]["methods"]
    assert list(methods) == ["dense", ckpt.name, "quanto-4bit"] and "| quanto-4bit |" in res.output
    assert 0 < methods["quanto-4bit"]["kv_fraction"] < 0.6
    assert len({r["prompts_sha"] for r in doc["rows"]}) == 1  # one prompt for all three


@pytest.mark.parametrize("args, words", [
    (["--max-length", "512"], ["RULER length 512 is too short"]),
    (["--ruler-tasks", "niah_single_2"], ["needs a download"]),
    (["--ruler-tasks", "niah_single_1", "--limit", "0"], ["at least 1 sample"]),
    (["--kv-cache", "quanto-4bit"], ["not on a compressed checkpoint"]),
])
def test_eval_ruler_bad_input_is_one_line(ckpt, args, words):
    _fails(["eval", str(ckpt), "--task", "ruler", *args], *words)


def test_eval_ruler_dense_beside_itself_refused():
    _fails(["eval", "tiny-llama", "--task", "ruler", "--dense", "tiny-llama"], "give a compressed checkpoint")


def test_an_unknown_task_is_refused_before_loading_with_the_cli_names():
    """The list names the tasks --task takes (not lm-eval's internal lowrank_textppl), before any model loads."""
    _fails(["eval", "no-such-model-either", "--task", "nosuchtask"], "unknown --task 'nosuchtask'", "cache-ppl", "ruler")
