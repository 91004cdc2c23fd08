"""`lowrank-attn analyze` in-process (typer's CliRunner): the files it writes, and one clear
line for every bad input, with nothing left behind."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lowrank_attn.cli import app
from lowrank_attn.errors import LowrankAttnError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAMPLE = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
          "nothing to do: once or twice she had peeped into the book her sister was reading. ")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "sample.txt"
    f.write_text(SAMPLE * 6, encoding="utf-8")
    return f


def invoke(runner, *args):
    return runner.invoke(app, ["analyze", *map(str, args)])


def leftovers(parent, out_name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}."))


def test_analyze_writes_report(runner, text_file, tmp_path):
    out = tmp_path / "spectra"
    res = invoke(runner, "tiny-llama", "--text", text_file, "--seq-len", 64, "--out", out)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["spectra.json", "summary.csv", "summary.md",
                            "energy_curves.png", "r90_heatmap.png", "r90_per_text.png"])
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000

    rep = json.loads((out / "spectra.json").read_text())
    assert rep["schema"] == "lowrank-attn/spectra" and rep["version"] == 1
    assert rep["model"]["name"] == "tiny-llama" and rep["model"]["model_type"] == "llama"
    lay = rep["model"]["layout"]
    assert (lay["num_layers"], lay["num_heads"], lay["num_kv_heads"], lay["head_dim"]) == (2, 4, 2, 16)
    assert rep["seq_len"] == 64 and rep["texts"][0]["name"] == "sample"
    assert rep["sampled_text"] is False
    assert len(rep["layers"]) == 2
    for layer in rep["layers"]:
        assert len(layer["kv_heads"]) == 2
        for h in layer["kv_heads"]:
            for key in ("logit_field", "weights"):
                e = np.array(h[key]["energy"])
                assert len(e) == 16 and abs(e.sum() - 1) < 1e-9 and np.all(e >= 0)
                assert {"r90", "r99", "entropy_rank", "stable_rank"} <= set(h[key])

    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [r["text"] for r in rows] == ["sample", "pooled"]
    assert all(r["model"] == "tiny-llama" and int(r["kv_heads"]) == 4 for r in rows)
    md = (out / "summary.md").read_text()
    assert md.startswith("# Attention spectra: tiny-llama") and "| pooled |" in md
    assert "| pooled |" in res.output  # the table is printed too
    assert leftovers(tmp_path, "spectra") == []


def test_overwrite_and_empty_out_dir(runner, text_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()  # an existing empty directory is fine
    assert invoke(runner, "tiny-gpt2", "-t", text_file, "--seq-len", 64, "-o", out, "--no-plots").exit_code == 0
    assert not list(out.glob("*.png"))
    (out / "stale.txt").write_text("old")
    res = invoke(runner, "tiny-gpt2", "-t", text_file, "--seq-len", 64, "-o", out, "--overwrite", "--no-plots")
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and (out / "spectra.json").is_file()
    assert leftovers(tmp_path, "o") == []


def test_gguf_copy_is_named_by_content_not_path(tmp_path):
    """The dequantised copy of a GGUF is found again from another install of the same file (a new venv, a
    reinstall: another path, another mtime), and not for a file whose bytes differ."""
    from lowrank_attn.models import gguf_fingerprint

    body = os.urandom(3 << 20)
    a, b, c = (tmp_path / d / "m.gguf" for d in "abc")
    for p, data in ((a, body), (b, body), (c, body[:-1] + bytes([body[-1] ^ 1]))):
        p.parent.mkdir()
        p.write_bytes(data)
    os.utime(b, (1, 1))
    assert gguf_fingerprint(a) == gguf_fingerprint(b)
    assert gguf_fingerprint(a) != gguf_fingerprint(c)


def test_local_model_directory(runner, text_file, tmp_path, tiny_llama):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    res = invoke(runner, tmp_path / "m", "-t", text_file, "--seq-len", 64, "-o", tmp_path / "out", "--no-plots")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "spectra.json").read_text())["model"]["model_type"] == "llama"


# --- bad input: one line, non-zero exit, nothing written -------------------------------------

def _bert_dir(tmp_path):
    from transformers import BertConfig

    d = tmp_path / "bert"
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(d)
    return d


def _t5_dir(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                        num_heads=2)).save_pretrained(d)
    return d


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _file(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    return f


def _textless_dir(tmp_path):
    d = tmp_path / "notext"
    d.mkdir()
    (d / "data.bin").write_bytes(b"\x00\x01")
    return d


# name -> (builder(tmp_path, text_file) -> CLI args, words expected in the message)
BAD = {
    "unknown model name": (lambda t, f: ["no-such-model-xyz", "-t", f], ["no-such-model-xyz"]),
    "unknown tiny model": (lambda t, f: ["tiny-nothing", "-t", f], ["tiny-nothing"]),
    "empty directory as model": (lambda t, f: [_empty_dir(t), "-t", f], ["not a model directory"]),
    "missing gguf file": (lambda t, f: [t / "none.gguf", "-t", f], ["no such GGUF"]),
    "empty text": (lambda t, f: ["tiny-llama", "-t", _file(t, "empty.txt", "  \n\n")], ["empty"]),
    "text too short": (lambda t, f: ["tiny-llama", "-t", _file(t, "short.txt", "hello world")], ["too short", "32"]),
    "missing text file": (lambda t, f: ["tiny-llama", "-t", t / "nope.txt"], ["nope.txt"]),
    "directory without text": (lambda t, f: ["tiny-llama", "-t", _textless_dir(t)], ["no text files"]),
    "binary text file": (lambda t, f: ["tiny-llama", "-t", _file(t, "bin.txt", b"\xff\xfe\x00\xd0" * 50)],
                         ["cannot read"]),
    "bad jsonl": (lambda t, f: ["tiny-llama", "-t", _file(t, "x.jsonl", '{"nottext": 1}\n')], ["'text'"]),
    "jsonl null text": (lambda t, f: ["tiny-llama", "-t", _file(t, "n.jsonl", '{"text": null}\n')], ["not a string"]),
    "seq-len above maximum": (lambda t, f: ["tiny-llama", "-t", f, "--seq-len", "4096"], ["4096", "2048"]),
    "seq-len below 2": (lambda t, f: ["tiny-llama", "-t", f, "--seq-len", "1"], ["seq-len"]),
    "unsupported architecture (bert)": (lambda t, f: [_bert_dir(t), "-t", f], ["bert", "not supported"]),
    "unsupported architecture (t5)": (lambda t, f: [_t5_dir(t), "-t", f], ["t5", "not supported"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error(runner, text_file, tmp_path, case):
    build, words = BAD[case]
    args = build(tmp_path, text_file)
    out = tmp_path / "out"
    res = invoke(runner, *args, "--seq-len", 64, "--out", out) if "--seq-len" not in map(str, args) \
        else invoke(runner, *args, "--out", out)
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


def test_existing_out_without_overwrite(runner, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = invoke(runner, "tiny-llama", "-t", text_file, "--seq-len", 64, "--out", out)
    assert res.exit_code != 0 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, "out") == []


def test_out_is_a_file(runner, text_file, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    res = invoke(runner, "tiny-llama", "-t", text_file, "--seq-len", 64, "--out", out)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert out.read_text() == "a file"


def test_debug_shows_the_exception(runner, tmp_path):
    res = runner.invoke(app, ["--debug", "analyze", "tiny-llama", "-t", str(tmp_path / "nope.txt"),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert isinstance(res.exception, LowrankAttnError)


def test_failure_while_writing_leaves_nothing(tmp_path):
    """report.atomic_dir: an error during writing removes the half-written temp directory."""
    from lowrank_attn.report import atomic_dir

    out = tmp_path / "res"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "spectra.json").write_text("{")
            raise RuntimeError("disk on fire")
    assert not out.exists() and leftovers(tmp_path, "res") == []
    # and replacing an existing result keeps the old one until the new one is complete
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            raise RuntimeError("again")
    assert (out / "old.txt").read_text() == "old" and leftovers(tmp_path, "res") == []


def test_a_failed_swap_puts_the_old_result_back(tmp_path, monkeypatch):
    """atomic_dir with overwrite: if moving the new directory into place fails after the old one was moved aside
    (a full disk, Ctrl-C between the two renames), the old one is moved back — not left hidden beside it."""
    import os

    from lowrank_attn.report import atomic_dir

    out = tmp_path / "res"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new directory into place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert (out / "old.txt").read_text() == "old" and leftovers(tmp_path, "res") == []


def test_overwriting_a_file_leaves_nothing_beside_it(tmp_path):
    """atomic_dir over an existing file (--overwrite): the file is replaced by the directory, no hidden .old left."""
    from lowrank_attn.report import atomic_dir

    out = tmp_path / "res"
    out.write_text("a file")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "x.txt").write_text("new")
    assert (out / "x.txt").read_text() == "new" and leftovers(tmp_path, "res") == []


@pytest.mark.may_skip("needs Linux's /proc: a directory where nothing can be created, even by root")
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc")
def test_an_output_where_nothing_can_be_created_is_refused_before_any_work(tmp_path):
    from lowrank_attn.errors import LowrankAttnError
    from lowrank_attn.fsutil import check_writable_target

    with pytest.raises(LowrankAttnError, match="cannot create"):
        check_writable_target("/proc/lowrank-attn-out", overwrite=False)  # exists as a directory, takes nothing
    check_writable_target(tmp_path / "fine", overwrite=False)
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing
