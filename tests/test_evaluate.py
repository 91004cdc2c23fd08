"""Perplexity through lm-eval's own harness (lowrank_attn.evaluate, eval/tasks, the `lowrank` model type).

No mocking of lm-eval or transformers: every number here comes out of lm_eval.simple_evaluate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowrank_attn.errors import LowrankAttnError
from lowrank_attn.evaluate import (
    TASKS_DIR, TEXTPPL_TASK, perplexity, read_documents, split_paragraphs, split_wikitext,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
    "striking thirteen.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "I thought I would sail about a little.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife.",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do.",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
    "Whether I shall turn out to be the hero of my own life, or whether that station will be held by anybody "
    "else, these pages must show.",
]


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "sample.txt"
    p.write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return p


def _plain_lm_eval(model, tokenizer, text_file: Path, *, max_length: int, min_chars: int, limit=None) -> dict:
    """lm-eval with nothing of ours but the task YAML: stock HFLM, stock simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                     metadata={"text_file": str(text_file), "min_chars": min_chars})
    out = lm_eval.simple_evaluate(model=lm, tasks=[TEXTPPL_TASK], task_manager=tm, limit=limit, bootstrap_iters=0)
    return out["results"][TEXTPPL_TASK]


# ----------------------------------------------------------------------------- (a) no bias vs plain lm-eval


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma3"])
def test_perplexity_equals_plain_hflm(tiny_factory, text_file, kind):
    model, tok = tiny_factory(kind)
    ours = perplexity(model, tok, task=str(text_file), max_length=64, min_chars=200)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(ours[key]) and ours[key] > 0, (key, ours[key])
    assert ours["byte_perplexity"] > 1
    assert ours["task"] == TEXTPPL_TASK and ours["text_file"] == str(text_file.resolve())
    assert ours["documents"] == len(split_paragraphs(text_file.read_text(), 200)) >= 2
    assert ours["bytes"] == sum(len(d.encode()) for d in read_documents(text_file, min_chars=200))
    assert ours["tokens"] > 0 and ours["max_length"] == 64
    assert ours["add_bos_token"] is (kind == "tiny-gemma3")  # the byte tokenizer adds <bos> only for gemma3

    plain = _plain_lm_eval(model, tok, text_file, max_length=64, min_chars=200)
    assert ours["word_perplexity"] == pytest.approx(plain["word_perplexity,none"], rel=1e-9)
    assert ours["byte_perplexity"] == pytest.approx(plain["byte_perplexity,none"], rel=1e-9)
    assert ours["bits_per_byte"] == pytest.approx(plain["bits_per_byte,none"], rel=1e-9)
    # lm-eval's own consistency: bits_per_byte = log2(byte_perplexity)
    assert ours["bits_per_byte"] == pytest.approx(math.log2(ours["byte_perplexity"]), rel=1e-9)
    assert ours["lm_eval"]["results"][TEXTPPL_TASK]["word_perplexity,none"] == ours["word_perplexity"]
    json.dumps(ours)  # the whole result, lm-eval's dict included, is JSON-able


def test_token_perplexity_and_windows(tiny_llama, text_file):
    """token_perplexity = exp(-sum of lm-eval's rolling loglikelihoods / tokens): with a byte tokenizer tokens are
    bytes, so it must equal lm-eval's own byte_perplexity; the model really got max_length-token windows."""
    model, tok = tiny_llama
    res = perplexity(model, tok, task=str(text_file), max_length=64, min_chars=200, progress=True)
    assert res["tokens"] == res["bytes"]
    assert res["token_perplexity"] == pytest.approx(res["byte_perplexity"], rel=1e-6)
    assert res["token_perplexity"] == pytest.approx(math.exp(-res["loglikelihood"] / res["tokens"]), rel=1e-12)
    assert res["forward"]["max_input_tokens"] == 64 and res["forward"]["forwards"] >= res["documents"]
    assert res["forward"]["fused_prefill_calls"] == res["forward"]["blocked_prefill_calls"] == 0  # dense: none


def test_max_length_beyond_positions_refused(tiny_llama, text_file):
    model, tok = tiny_llama  # 2048 positions
    with pytest.raises(LowrankAttnError, match="exceeds the model's maximum of 2048"):
        perplexity(model, tok, task=str(text_file), max_length=4096)


def test_limit_caps_documents(tiny_llama, text_file):
    model, tok = tiny_llama
    full = perplexity(model, tok, task=str(text_file), max_length=64, min_chars=0)
    one = perplexity(model, tok, task=str(text_file), max_length=64, min_chars=0, limit=1)
    assert full["documents"] == len(PARAGRAPHS) and one["documents"] == 1
    assert one["bytes"] == len(PARAGRAPHS[0].encode())
    plain = _plain_lm_eval(model, tok, text_file, max_length=64, min_chars=0, limit=1)
    assert one["word_perplexity"] == pytest.approx(plain["word_perplexity,none"], rel=1e-9)


def test_registered_lowrank_model_matches(text_file):
    """`lm_eval.simple_evaluate(model="lowrank", ...)` (our registered type, loading by short name)
    gives the number perplexity() gives for the same deterministic tiny model."""
    import lm_eval
    from lm_eval.api.registry import get_model

    import lowrank_attn.lm_eval_model as lem
    from lowrank_attn.evaluate import task_manager
    from lowrank_attn.tiny import build_tiny

    assert get_model("lowrank") is lem.LowrankLM
    tm = task_manager({"text_file": str(text_file), "min_chars": 200})
    out = lm_eval.simple_evaluate(model="lowrank", model_args={"pretrained": "tiny-llama", "max_length": 64},
                                  device="cpu", tasks=[TEXTPPL_TASK], task_manager=tm, bootstrap_iters=0)
    model, tok = build_tiny("tiny-llama")
    ours = perplexity(model, tok, task=str(text_file), max_length=64, min_chars=200)
    assert out["results"][TEXTPPL_TASK]["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-9)


def test_lowrank_model_loads_compressed_checkpoint(tmp_path, text_file):
    """`pretrained=DIR` with a lowrank_attn.json goes through checkpoint.load_compressed: lm-eval on
    the reloaded checkpoint with prefill=compressed gives exactly the in-memory compressed model's number (and
    not the dense one); with the default exact prefill, one forward per window, the dense one's."""
    import lm_eval

    from lowrank_attn.checkpoint import save_compressed
    from lowrank_attn.compression import compress
    from lowrank_attn.evaluate import task_manager
    from lowrank_attn.lm_eval_model import LowrankLM
    from lowrank_attn.recipe import Recipe
    from lowrank_attn.tiny import build_tiny

    recipe = Recipe(model="tiny-llama", rank_ratio=0.5, text=[str(text_file)], seq_len=128, max_tokens=2048,
                    heldout_tokens=0, exact_window=0)  # exact_window=0: no key is kept exact, so it differs from dense
    lm, report = compress("tiny-llama", recipe, progress=False)
    ckpt = save_compressed(lm, report, tmp_path / "ckpt")
    in_memory = perplexity(lm.model, lm.tokenizer, task=str(text_file), max_length=64, min_chars=200)
    dense_model, dense_tok = build_tiny("tiny-llama")
    dense = perplexity(dense_model, dense_tok, task=str(text_file), max_length=64, min_chars=200)

    def lm_eval_ppl(**kw):
        reloaded = LowrankLM(pretrained=str(ckpt), max_length=64, device="cpu", **kw)
        out = lm_eval.simple_evaluate(model=reloaded, tasks=[TEXTPPL_TASK], bootstrap_iters=0,
                                      task_manager=task_manager({"text_file": str(text_file), "min_chars": 200}))
        return out["results"][TEXTPPL_TASK]["word_perplexity,none"]

    got = lm_eval_ppl(prefill="compressed")  # what perplexity() measures by default
    assert got == pytest.approx(in_memory["word_perplexity"], rel=1e-9)
    assert got != pytest.approx(dense["word_perplexity"], rel=1e-9)
    # as served (exact prefill, the default): a text scored in one forward gets the dense model's score
    assert lm_eval_ppl() == pytest.approx(dense["word_perplexity"], rel=1e-6)


# ----------------------------------------------------------------------------- documents


def test_split_wikitext_rule():
    raw = (" \n = Alpha = \n \n Alpha text . \n \n = = Early life = = \n \n More alpha . \n"
           " = Beta = \n \n Beta text . \n \n = = = Deep = = = \n x \n")
    docs = split_wikitext(raw)
    assert len(docs) == 2
    assert docs[0].startswith(" = Alpha = ") and "= = Early life = =" in docs[0]
    assert docs[1].startswith(" = Beta = ") and "= = = Deep = = =" in docs[1]


def test_split_paragraphs_rule():
    text = "aaaa\n\nbb\n \ncccc\n\nd\n"
    assert split_paragraphs(text, 0) == ["aaaa", "bb", "cccc", "d"]
    assert split_paragraphs(text, 3) == ["aaaa", "bb\n \ncccc\n\nd"]  # short tail "d" joins the last document
    assert split_paragraphs(text, 10**9) == [text.strip()]
    assert split_paragraphs(text, 5) == ["aaaa\n\nbb", "cccc\n\nd"]


def test_wikitext2_local_documents(shared_data):
    path = shared_data / "wikitext2-test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    docs = read_documents(path, split="wikitext")
    assert len(docs) == 62
    heading = lambda line: line.replace("= = =", "===").replace("= =", "==").strip()  # noqa: E731
    for d in docs:
        lines = d.split("\n")
        assert heading(lines[0]).startswith("= ") and heading(lines[0]).endswith(" =")
        assert not any(heading(x).startswith("= ") and heading(x).endswith(" =") for x in lines[1:])


# ----------------------------------------------------------------------------- (c) bad input


def test_unknown_task(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(LowrankAttnError, match="unknown evaluation task 'no-such-task'") as e:
        perplexity(model, tok, task="no-such-task")
    assert "\n" not in str(e.value)


def test_missing_file(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(LowrankAttnError, match="no such text file") as e:
        perplexity(model, tok, task=str(tmp_path / "missing.txt"))
    assert "\n" not in str(e.value)
    with pytest.raises(LowrankAttnError, match="no such text file"):
        perplexity(model, tok, task="wikitext2-local", text_file=tmp_path / "missing.raw")


@pytest.mark.parametrize("content", ["", " \n\n \n"])
def test_empty_file(tiny_llama, tmp_path, content):
    model, tok = tiny_llama
    p = tmp_path / "empty.txt"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(LowrankAttnError, match="is empty") as e:
        perplexity(model, tok, task=str(p))
    assert "\n" not in str(e.value)


def test_bad_numbers(tiny_llama, text_file):
    model, tok = tiny_llama
    for kwargs in ({"max_length": 1}, {"batch_size": 0}, {"limit": 0}, {"min_chars": -1}):
        with pytest.raises(LowrankAttnError):
            perplexity(model, tok, task=str(text_file), **kwargs)


# ----------------------------------------------------------------------------- (d) offline


@pytest.mark.parametrize("offline_flags", [True, False])
def test_offline_no_network(text_file, offline_flags):
    """In a fresh process with every outbound socket connection refused, perplexity() on a local
    file completes and nothing tried to connect anywhere -- with HF_HUB_OFFLINE=1 /
    HF_DATASETS_OFFLINE=1 set, and also without them (no hub call is made for a local file)."""
    script = textwrap.dedent(f"""
        import json, socket
        attempts = []
        _connect = socket.socket.connect
        def guarded(self, address):
            host = address[0] if isinstance(address, tuple) else address
            if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
                attempts.append(str(address))
                raise OSError("network disabled by test")
            return _connect(self, address)
        socket.socket.connect = guarded
        from lowrank_attn.tiny import build_tiny
        from lowrank_attn.evaluate import perplexity
        m, t = build_tiny("tiny-llama")
        r = perplexity(m, t, task={str(text_file)!r}, max_length=64, min_chars=200)
        print(json.dumps({{"ppl": r["word_perplexity"], "attempts": attempts}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    if offline_flags:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert math.isfinite(res["ppl"]) and res["attempts"] == []


# ----------------------------------------------------------------------------- (b) real model, slow


@pytest.mark.slow
def test_smollm2_wikitext2_local(smollm2, shared_data):
    if not (shared_data / "wikitext2-test.raw").is_file():
        pytest.skip("wikitext2-test.raw not in shared data")
    r = perplexity(smollm2.model, smollm2.tokenizer, task="wikitext2-local", max_length=2048, limit=1)
    assert r["documents"] == 1 and r["add_bos_token"] is False
    assert 5 < r["word_perplexity"] < 200, r["word_perplexity"]
    assert 1 < r["byte_perplexity"] < r["word_perplexity"]
    assert 0 < r["bits_per_byte"] < 2
    assert r["lm_eval_version"].startswith("0.4")


@pytest.mark.slow
def test_cli_wrapper_runs_lowrank_model(text_file):
    """`python -m lowrank_attn.lm_eval_model` = lm-eval's own CLI with `--model lowrank` available."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    meta = json.dumps({"text_file": str(text_file), "min_chars": 200})
    proc = subprocess.run(
        [sys.executable, "-m", "lowrank_attn.lm_eval_model", "--model", "lowrank", "--model_args",
         "pretrained=tiny-llama,max_length=64", "--tasks", TEXTPPL_TASK, "--metadata", meta, "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "word_perplexity" in proc.stdout and TEXTPPL_TASK in proc.stdout


def test_progress_is_one_labelled_bar(tiny_llama, text_file, capsys):
    """progress=True: one bar of ours, labelled (desc and task), instead of lm-eval's unlabelled one per window."""
    model, tok = tiny_llama
    perplexity(model, tok, task=str(text_file), max_length=64, min_chars=200, progress=True, desc="compressed")
    err = capsys.readouterr().err
    assert "compressed: lowrank_textppl perplexity" in err
    assert "Running loglikelihood requests" not in err
