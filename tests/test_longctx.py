"""Long-context evaluation (lowrank_attn.longctx, eval --task passkey/textppl, eval/long_context.py) on tiny models.

No mocks: prompts are tokenized by the tiny models' byte tokenizer, scored by real forwards, and checked
against lm-eval's own is_greedy through the lowrank_passkey task."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_attn.errors import LowrankAttnError
from lowrank_attn.longctx import (
    NEEDLE, PasskeyDoc, encode_pair, make_passkey_doc, parse_depths, passkey_docs, run_passkey, score_doc,
    score_passkey, summarize_passkey, watch_forward, write_passkey_jsonl,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _self_doc(model, tok, doc: PasskeyDoc, n: int = 5) -> PasskeyDoc:
    """``doc`` with the answer replaced by the model's own greedy continuation of the context."""
    ctx, _ = encode_pair(tok, doc.context, doc.answer)
    with torch.inference_mode():
        g = model.generate(torch.tensor([ctx]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return dataclasses.replace(doc, answer=tok.decode(g[0, len(ctx):].tolist()))


# ----------------------------------------------------------------------------- generator


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma3"])  # gemma3's tokenizer adds BOS
def test_prompt_length_and_depth(tiny_factory, kind):
    _, tok = tiny_factory(kind)
    from lowrank_attn.texts import bos_prefix

    bos = bos_prefix(tok)
    for length in (400, 1500):
        for d in parse_depths(8):
            doc = make_passkey_doc(tok, length, d, seed=3)
            ctx, ans = encode_pair(tok, doc.context, doc.answer, bos)
            assert doc.n_tokens == len(ctx) + len(ans)
            assert length - 8 <= doc.n_tokens <= length  # within one filler word, never above
            # the needle snaps to a sentence end (~19 byte tokens here): coarse in a short prompt
            assert abs(doc.depth_actual - d) <= (0.1 if length < 1000 else 0.03), (length, d, doc.depth_actual)
            needle = NEEDLE.format(key=doc.key)
            assert doc.context.count(needle) == 1 and doc.answer == f" {doc.key}"
            assert len(doc.key) == 5 and doc.key.isdigit()
            # the needle really starts at needle_token: the tokens from there decode to the needle sentence
            text_from = tok.decode((bos + tok(doc.context, add_special_tokens=False).input_ids)[doc.needle_token:])
            assert text_from.lstrip().startswith(needle)


def test_prompts_are_seeded(tiny_llama, tmp_path):
    _, tok = tiny_llama
    a = passkey_docs(tok, 500, 8, seed=1)
    b = passkey_docs(tok, 500, 8, seed=1)
    c = passkey_docs(tok, 500, 8, seed=2)
    assert [x.to_json() for x in a] == [x.to_json() for x in b]
    assert [x.key for x in a] != [x.key for x in c]
    assert len({x.key for x in a}) > 1  # one key per prompt, not one per run
    filler = tmp_path / "filler.txt"
    filler.write_text(" ".join(f"Sentence number {i} is here." for i in range(400)))
    f1 = make_passkey_doc(tok, 500, 0.5, seed=1, filler=filler)
    assert f1.context == make_passkey_doc(tok, 500, 0.5, seed=1, filler=filler).context
    assert "Sentence number" in f1.context and "grass" not in f1.context


@pytest.mark.parametrize("spec,expect", [(8, 8), ("8", 8), ("0,0.5,1", 3), (1, 1)])
def test_parse_depths(spec, expect):
    d = parse_depths(spec)
    assert len(d) == expect and all(0 <= x <= 1 for x in d)
    if expect == 8:
        assert d[0] == 0 and d[-1] == 1


@pytest.mark.parametrize("spec", [0, -2, "1.5", "-0.1,0.5", "a,b", ""])
def test_parse_depths_refuses(spec):
    with pytest.raises(LowrankAttnError):
        parse_depths(spec)


def test_too_short_length_refused(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(LowrankAttnError, match="too short"):
        make_passkey_doc(tok, 50, 0.5)


# ----------------------------------------------------------------------------- scoring


def test_dense_model_scores_itself_and_broken_model_fails(tiny_llama):
    model, tok = tiny_llama
    docs = [_self_doc(model, tok, d) for d in passkey_docs(tok, 300, 4, seed=0)]
    res = score_passkey(model, tok, docs, progress=False)
    assert all(r["exact"] for r in res) and summarize_passkey(res)["retrieved"] == 4
    with torch.no_grad():  # broken: the final norm zeroed, every logit 0, argmax always token 0
        model.model.norm.weight.zero_()
    assert not any(a in tok.decode([0]) for a in "".join(d.answer for d in docs))
    res = score_passkey(model, tok, docs, progress=False)
    assert not any(r["exact"] for r in res) and summarize_passkey(res)["retrieved"] == 0


def test_scoring_matches_lm_eval_is_greedy(tiny_llama, tmp_path):
    """Our one-forward exact match and loglikelihood agree with lm-eval's own (lowrank_passkey task)."""
    import lm_eval

    from lowrank_attn.evaluate import make_hflm, task_manager

    model, tok = tiny_llama
    docs = passkey_docs(tok, 300, 3, seed=1)
    docs += [_self_doc(model, tok, d) for d in docs[:2]]
    path = write_passkey_jsonl(docs, tmp_path / "pk.jsonl")
    out = lm_eval.simple_evaluate(model=make_hflm(model, tok, max_length=512), tasks=["lowrank_passkey"],
                                  task_manager=task_manager({"docs_file": str(path)}), log_samples=True,
                                  bootstrap_iters=0)
    samples = out["samples"]["lowrank_passkey"]
    assert len(samples) == len(docs)
    accs = []
    for s in samples:
        ours = score_doc(model, tok, PasskeyDoc(**s["doc"]))
        ll, greedy = s["filtered_resps"][0]
        assert bool(greedy) == ours["exact"] == bool(s["acc"])
        assert ours["loglikelihood"] == pytest.approx(ll, rel=1e-4, abs=1e-4)
        accs.append(ours["exact"])
    assert sum(accs) == 2  # the self-continuations, and nothing else


def test_watch_forward_sees_long_fused_prefill(single_thread):
    """A compressed model's prefill from FUSED_WINDOW_MIN_LEN tokens on goes through the fused SDPA kernel; shorter
    ones do not (values quantised, their exact band wider than the keys': a correction on the fused output)."""
    from lowrank_attn.runtime.attention import FUSED_WINDOW_MIN_LEN
    from lowrank_attn import Recipe, compress
    from lowrank_attn.models import load_model
    from lowrank_attn.runtime.surgery import prefill_as

    lm = load_model("tiny-llama")
    lm.model.config.max_position_embeddings = 8192
    lm, _ = compress(lm, Recipe(model="tiny-llama", rank_ratio=0.5, exact_window=16, v_window=32, exact_sink=1,
                                max_tokens=1024, heldout_tokens=256, seq_len=256, serve_len=2048), progress=False)
    for n, fused in ((FUSED_WINDOW_MIN_LEN - 1, False), (FUSED_WINDOW_MIN_LEN, True), (4096, True)):
        ids = torch.randint(0, 256, (1, n))
        with watch_forward(lm.model) as w, torch.inference_mode(), prefill_as(lm.model, "compressed"):
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        layers = lm.model.config.num_hidden_layers
        assert w.max_input_tokens == n and w.forwards == 1
        assert (w.fused_prefill, w.blocked_prefill) == ((layers, 0) if fused else (0, layers))


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    from typer.testing import CliRunner

    from lowrank_attn.cli import app

    return CliRunner().invoke(app, list(args))


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


@pytest.mark.parametrize("args,msg", [
    (["--depths", "1.5"], "depths"),
    (["--depths", "0"], "depth"),
    (["--max-length", "5000"], "exceeds the model's maximum of 2048"),
    (["--max-length", "40"], "too short"),
    (["--max-length", "1"], "at least 2"),
    (["--samples", "0"], "samples"),
])
def test_cli_passkey_errors(args, msg, tmp_path, single_thread):
    res = _cli("eval", "tiny-llama", "--task", "passkey", *(["--max-length", "400"] if "--max-length" not in args else []),
               *args, "-o", str(tmp_path / "pk.json"))
    assert msg in _one_line_error(res)
    assert not (tmp_path / "pk.json").exists()


def test_cli_passkey_runs(tmp_path, single_thread):
    out = tmp_path / "pk.json"
    res = _cli("eval", "tiny-llama", "--task", "passkey", "--max-length", "300", "--depths", "0,0.5,1", "--dense",
               "tiny-llama", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "passkey at 300 tokens" in res.output and "dense" in res.output
    doc = json.loads(out.read_text())
    assert doc["summary"]["total"] == 3 and set(doc["summary"]["by_depth"]) == {"0", "0.5", "1"}
    # same model, same prompts: the dense side scores exactly the same
    assert [x["loglikelihood"] for x in doc["passkey"]["results"]] == \
        [x["loglikelihood"] for x in doc["dense_passkey"]["results"]]


def test_cli_textppl(tmp_path, single_thread):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"Line {i} of a small text." for i in range(20)))
    res = _cli("eval", "tiny-llama", "--task", "textppl", "--text", str(text), "--max-length", "256", "-o",
               str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert s["forward"]["max_input_tokens"] == 256 and s["token_perplexity"] > 1
    assert "--text" in _one_line_error(_cli("eval", "tiny-llama", "--task", "textppl", "--max-length", "256"))
    assert "exceeds the model's maximum" in _one_line_error(
        _cli("eval", "tiny-llama", "--task", "textppl", "--text", str(text), "--max-length", "4096"))


# ----------------------------------------------------------------------------- the report script


def test_long_context_report_resumes(tmp_path, single_thread):
    from lowrank_attn.harness import long_context, long_report
    from lowrank_attn.recipe import Recipe

    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"Chapter {i}. " + "The ship sailed on and the sea was calm and grey. " * 12
                                for i in range(12)))
    out = tmp_path / "long"
    base = Recipe(model="tiny-llama", text=(str(text),), seq_len=128, max_tokens=512, heldout_tokens=128)
    kw = dict(recipe=base, methods=["dense", "ours", "kivi-4bit", "weight-svd"], lengths=[128, 512], depths="0,1", text=str(text),
              skip_tokens=1000, ckpt_dir=tmp_path / "ck", progress=False, log=lambda *a: None)
    points, meta = long_context.run_long("tiny-llama", out, max_minutes=0, **kw)  # out of time at once
    assert points == [] and not meta["complete"]
    points, meta = long_context.run_long("tiny-llama", out, **kw)
    assert meta["complete"] and len(points) == 4 * (1 + 2 + 2)  # K bytes, 2 lengths, 2 passkey depths
    lines = (out / "long.jsonl").read_text().splitlines()
    assert len(lines) == 20
    # methods side by side, point by point (weight-svd, which cannot be saved, alone at the end)
    order = [(json.loads(x)["method"], json.loads(x)["kind"], json.loads(x).get("length")) for x in lines]
    assert [k for _, k, _ in order[:3]] == ["kbytes"] * 3
    assert order[3:6] == [("dense", "ppl", 128), ("ours", "ppl", 128), ("kivi-4bit", "ppl", 128)]
    assert [m for m, _, _ in order[9:15]] == ["dense", "ours", "kivi-4bit"] * 2 and order[15][0] == "weight-svd"
    ppl = {(p["method"], p["length"]): p for p in points if p["kind"] == "ppl"}
    assert ppl[("dense", 512)]["forward"]["max_input_tokens"] == 512  # one window of the whole document
    assert ppl[("dense", 128)]["forward"]["max_input_tokens"] == 128
    assert ppl[("ours", 128)]["token_perplexity"] != ppl[("dense", 128)]["token_perplexity"]
    assert (tmp_path / "ck").is_dir() and any((tmp_path / "ck").iterdir())  # ours saved for a resumed run
    again, meta = long_context.run_long("tiny-llama", out, **kw)  # nothing left: nothing recomputed
    assert (out / "long.jsonl").read_text().splitlines() == lines and meta["complete"]
    files = long_report.write_report(again, meta, out)
    assert {"long.json", "long.md", "long.jsonl"} <= set(files)
    md = (out / "long.md").read_text()
    assert long_report.rewrite_report(out) == files and (out / "long.md").read_text() == md  # --report: the same
    assert "| ours |" in md and "ppl @ 512" in md and "passkey @ 512" in md
    rows = json.loads((out / "long.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"dense", "ours", "kivi-4bit", "weight-svd"}
    assert rows[0]["passkey"]["total"] == 2
    kb = {r["method"]: r["k_bytes_vs_bf16_dense"] for r in rows}
    # bf16 bytes on the 512-token document: quantised keys (codes + scales + 64 exact) < dense; a weight fold keeps
    # full keys; ours (half rank + exact window and sink) in between
    assert kb["dense"] == 1 and kb["weight-svd"] == 1 and kb["kivi-4bit"] < kb["ours"] < 1


def test_long_context_bad_method(tmp_path):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "eval" / "long_context.py"), "tiny-llama", "--methods", "nope",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown method" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_dense_retrieves_passkey(smollm2):
    """The real dense model finds the key at both ends of a 1024-token prompt (the instrument's sanity check)."""
    res = run_passkey(smollm2.model, smollm2.tokenizer, 1024, "0,1", progress=False)
    assert res["summary"]["retrieved"] == 2, res["results"]
    assert all(1016 <= r["n_tokens"] <= 1024 for r in res["results"])


def test_key_digits_retrieved_separates_retrieval_from_formatting():
    """A model that answers ' the79698' for the key 79698 retrieved the key (every digit right after the true
    prefix) but fails the exact match on its first token; wrong digits fail both."""
    from lowrank_attn.longctx import key_digits_retrieved

    assert key_digits_retrieved(" the79698", "79698") and key_digits_retrieved(" 79698", "79698")
    assert not key_digits_retrieved(" the15324", "75324") and not key_digits_retrieved(" the119..", "11966")
    res = [{"depth": 0.5, "exact": False, "predicted": " the79698", "key": "79698"},
           {"depth": 0.5, "exact": True, "predicted": " 12345", "key": "12345"},
           {"depth": 1.0, "exact": False, "predicted": " the1", "key": "11111"}]
    s = summarize_passkey(res)
    assert (s["retrieved"], s["key_digits"], s["total"]) == (1, 2, 3)
    assert s["by_depth"] == {"0.5": [1, 2], "1": [0, 1]} and s["by_depth_digits"] == {"0.5": [2, 2], "1": [0, 1]}
