"""The measurement harness (lowrank_attn.harness) and the one perplexity and KL the eval/ scripts use: the results
store resumes, writes atomically and stamps every row; the stamp names commit, machine and threads; the held-out
windows; the token perplexity (one forward or through the cache) and the next-token KL; every eval/ script's
``--help`` runs."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_attn.errors import LowrankAttnError
from lowrank_attn.harness import REPO, ResultsStore, append_atomic, git_commit, stamp, time_interleaved, windows_of

EVAL_SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "eval").rglob("*.py"))


# ----------------------------------------------------------------------------- the store


def test_store_resumes_skipping_done_rows(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl", ("method", "ratio"), commit="abc1234")
    todo = [("dense", None), ("ours", 0.5), ("ours", 0.25)]
    ran = []
    for key in todo[:2]:  # a first run stops after two points
        ran.append(key)
        store.append({"method": key[0], "ratio": key[1], "ppl": 1.0})
    again = ResultsStore(tmp_path / "r.jsonl", ("method", "ratio"), commit="abc1234")
    done = again.latest()
    assert [k for k in todo if not again.done(k, latest=done)] == [("ours", 0.25)]
    assert again.done(("ours", 0.5), when=lambda r: r["ppl"] == 1.0)
    assert not again.done(("ours", 0.5), when=lambda r: r["ppl"] > 2)  # e.g. a smoke row rerun with more samples
    again.append({"method": "ours", "ratio": 0.5, "ppl": 3.0})  # a later row supersedes the earlier one
    assert again.latest()[("ours", 0.5)]["ppl"] == 3.0 and len(again.rows()) == 3


def test_store_stamps_every_row_with_the_commit(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl", ("method",), commit="abc1234")
    written = store.append({"method": "dense"})
    assert written["commit"] == "abc1234"
    assert store.append({"method": "x", "commit": "mine"})["commit"] == "mine"  # a row's own commit is kept
    assert [json.loads(x)["commit"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == ["abc1234", "mine"]
    assert "commit" not in ResultsStore(tmp_path / "s.jsonl", ("method",), stamp=False).append({"method": "d"})
    assert ResultsStore(tmp_path / "t.jsonl", ("method",)).commit == git_commit()  # default: the checkout's


def test_store_lines_sorted_and_torn_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultsStore(path, ("method",), commit=None)
    store.append({"method": "a", "b": 1, "a": 2})
    assert path.read_text() == json.dumps({"a": 2, "b": 1, "commit": None, "method": "a"}, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write('{"method": "b", "pp')  # a writer killed mid-line
    assert [r["method"] for r in store.rows()] == ["a"]  # lenient: the torn line is skipped
    store.append({"method": "c"})  # ... and stays alone on its line
    assert [r["method"] for r in store.rows()] == ["a", "c"]
    strict = ResultsStore(path, ("method",), strict=True, what="test point")
    with pytest.raises(LowrankAttnError, match=r"r.jsonl:2 is not valid JSON"):
        strict.rows()
    path.write_text('{"method": "a"}\n{"other": 1}\n')
    with pytest.raises(LowrankAttnError, match=r"r.jsonl:2 is not a test point \(no 'method'\)"):
        strict.rows()


def test_append_is_atomic_on_a_full_disk(tmp_path, monkeypatch):
    import lowrank_attn.harness.store as store_mod

    path = tmp_path / "r.jsonl"
    append_atomic(path, {"method": "a"})
    before = path.read_bytes()
    real_open = open

    def full(p, mode="r", *a, **kw):
        f = real_open(p, mode, *a, **kw)
        if "w" in mode:
            def write(s):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
            f.write = write
        return f

    monkeypatch.setattr(store_mod, "open", full, raising=False)
    with pytest.raises(LowrankAttnError, match="cannot write .*r.jsonl"):
        append_atomic(path, {"method": "b"})
    assert path.read_bytes() == before and not (tmp_path / ".r.jsonl.tmp").exists()


# ----------------------------------------------------------------------------- stamp, timing, windows


def test_stamp_names_commit_machine_and_threads():
    import torch

    s = stamp()
    assert set(s) == {"commit", "machine", "threads"}
    assert s["threads"] == torch.get_num_threads() == s["machine"]["torch_threads"]
    assert s["machine"]["cpu_count"] == os.cpu_count() and s["machine"]["device"] == "cpu"
    assert s["commit"] is None or len(s["commit"].removesuffix("+dirty")) >= 7


def test_time_interleaved_alternates_order():
    calls = []
    variants = {"a": lambda x: calls.append(("a", x)) or 1, "b": lambda x: calls.append(("b", x)) or 2}
    secs, res = time_interleaved(variants, 7)
    assert calls == [("a", 7), ("b", 7)] and res == {"a": 1, "b": 2} and all(s >= 0 for s in secs.values())
    _, res = time_interleaved(variants, 8, flip=True)
    assert calls[2:] == [("b", 8), ("a", 8)] and list(res) == ["b", "a"]


def test_windows_of_start_with_the_prefix():
    wins = windows_of(list(range(10)), 4, [99])
    assert [w.tolist() for w in wins] == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]  # the tail is dropped
    assert [w.tolist() for w in windows_of(list(range(4)), 2)] == [[0, 1], [2, 3]]


# ----------------------------------------------------------------------------- the one perplexity and KL


def test_token_perplexity_forward_and_through_the_cache(single_thread):
    import torch

    from lowrank_attn.cachepath import cache_perplexity, token_perplexity
    from lowrank_attn.heldout import logprob_kl, next_token_logprobs, output_kl
    from lowrank_attn.tiny import build_tiny

    model, _ = build_tiny("tiny-llama")
    g = torch.Generator().manual_seed(0)
    wins = [torch.randint(0, model.config.vocab_size, (64,), generator=g) for _ in range(2)]
    nll = n = 0.0
    with torch.inference_mode():  # what the eval scripts measured before: the model's own loss
        for ids in wins:
            nll += float(model(ids[None], labels=ids[None], use_cache=False).loss) * (ids.numel() - 1)
            n += ids.numel() - 1
    single = token_perplexity(model, wins)
    assert single == pytest.approx(math.exp(nll / n), rel=1e-5)
    chunked = token_perplexity(model, wins, chunk=16)  # a dense cache holds exactly what one forward sees
    assert chunked == pytest.approx(single, rel=1e-4)
    assert cache_perplexity(model, wins, chunk=16)["token_perplexity"] == chunked
    ref = next_token_logprobs(model, wins[0])
    assert float(logprob_kl(ref, ref).abs().max()) == 0.0 and output_kl(ref, model, wins[0]) == 0.0
    other = torch.log_softmax(ref + torch.randn(ref.shape, generator=g), -1)
    kl = logprob_kl(ref, other)
    assert kl.shape == (64,) and bool((kl > 0).all())


# ----------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", EVAL_SCRIPTS)
def test_eval_script_help_runs(script):
    """Every eval/ script is a main() behind argparse: --help prints its usage and runs nothing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: " + Path(script).name), r.stdout[:200]
