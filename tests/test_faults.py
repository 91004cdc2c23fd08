"""Faults (issue #7): Ctrl-C and kill -9 in the middle of `compress` and `sweep` (real
subprocesses of the command line), and a full disk while a sweep appends a point.

After any of them: nothing under the final --out name (a hidden temp directory is all a kill may
leave; Ctrl-C cleans it up), a one-line message and exit 130 for Ctrl-C, a re-run that succeeds,
and a resumed sweep that keeps its earlier points byte for byte without recomputing them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowrank_attn.cli import app

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
           TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
# The CLI with a pause in the middle of writing the checkpoint (after the weights are in the temp
# directory, before the sidecar and the rename), announced on stderr: a kill lands there for sure.
PAUSED_SAVE = """
import sys, time
import lowrank_attn.checkpoint.save as ck  # where save_compressed looks up the file hash
_sha = ck.file_sha256
def _slow_sha(path):
    print("PAUSED-IN-SAVE", file=sys.stderr, flush=True)
    time.sleep(120)
    return _sha(path)
ck.file_sha256 = _slow_sha
from lowrank_attn.cli import entry
sys.argv[0] = "lowrank-attn"
entry()
"""


class Proc:
    """A CLI subprocess whose stdout and stderr are collected by threads as they arrive."""

    def __init__(self, args, *, paused_save=False, cwd=None):
        cmd = [sys.executable, "-c", PAUSED_SAVE] if paused_save else [sys.executable, "-m", "lowrank_attn.cli"]
        # SIGINT back to its default in the child: a runner that starts the tests in the background
        # (`cmd &` in a script) passes SIGINT down ignored, and Python then never raises KeyboardInterrupt
        self.p = subprocess.Popen(cmd + [str(a) for a in args], env=ENV, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out, self.err = bytearray(), bytearray()
        self.threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                        for s, b in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf.extend(chunk)

    def wait_for(self, ready, timeout=240.0):
        """Poll ``ready()`` until true; fail (killing the process) if it exits or times out first."""
        t0 = time.time()
        while not ready():
            if self.p.poll() is not None:
                self.finish()
                pytest.fail(f"exited {self.p.returncode} before the point to interrupt it:\n{self.text}")
            if time.time() - t0 > timeout:
                self.p.kill()
                self.finish()
                pytest.fail(f"timed out waiting:\n{self.text}")
            time.sleep(0.02)

    def finish(self, timeout=120.0) -> int:
        rc = self.p.wait(timeout)
        for t in self.threads:
            t.join(10)
        return rc

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace") + self.err.decode(errors="replace")


@pytest.fixture(scope="module")
def files(tmp_path_factory, alice_text):
    d = tmp_path_factory.mktemp("faults")
    text = open(alice_text, encoding="utf-8").read()
    (d / "small.txt").write_text(text[20000:24000])
    (d / "eval.txt").write_text(text[30000:31500])
    return d


SMALL = ["--seq-len", "64", "--max-tokens", "512", "--heldout-tokens", "64", "--exact-window", "8"]


def _interrupted_cleanly(proc: Proc, rc: int, message: str):
    assert rc == 130, proc.text
    assert "Traceback" not in proc.text, proc.text
    last = proc.err.decode().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("interrupted") and message in last, proc.text


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and out.name in p.name)


def _rerun_compress(files, out):
    res = runner.invoke(app, ["compress", "tiny-llama", "--text", str(files / "small.txt"), *SMALL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "lowrank_attn.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_compress_ctrl_c_during_calibration(files, long_text, tmp_path):
    out = tmp_path / "ck"
    # 64k tokens of calibration: seconds of work, interrupted as soon as it starts
    proc = Proc(["compress", "tiny-llama", "--text", long_text, "--seq-len", "256", "--max-tokens", "65536",
                 "--heldout-tokens", "256", "--exact-window", "8", "--out", out])
    proc.wait_for(lambda: b"calibration" in proc.err)
    proc.p.send_signal(signal.SIGINT)
    _interrupted_cleanly(proc, proc.finish(), "nothing was written")
    assert not out.exists() and _leftovers(out) == []
    _rerun_compress(files, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_compress_interrupted_while_saving(files, tmp_path, sig):
    out = tmp_path / "ck"
    proc = Proc(["compress", "tiny-llama", "--text", files / "small.txt", *SMALL, "--out", out], paused_save=True)
    proc.wait_for(lambda: b"PAUSED-IN-SAVE" in proc.err)
    tmp = _leftovers(out)
    assert len(tmp) == 1 and tmp[0].startswith(f".{out.name}.tmp-"), tmp  # the weights are being written there
    assert (out.parent / tmp[0] / "model.safetensors").is_file()
    proc.p.send_signal(sig)
    rc = proc.finish()
    assert not out.exists()  # never a partial checkpoint under the final name
    if sig == signal.SIGINT:
        _interrupted_cleanly(proc, rc, "nothing was written")
        assert _leftovers(out) == []  # the temp directory is removed too
    else:
        assert rc == -signal.SIGKILL
        assert all(n.startswith(f".{out.name}.tmp-") for n in _leftovers(out))  # hidden, never the final name
    _rerun_compress(files, out)


def _points(store: Path | str) -> list[dict]:
    text = store.read_text() if isinstance(store, Path) else store
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _logged(output: str) -> set:
    """(method, ratio) of every point a sweep computed, from its log lines."""
    return {(m, None if r == "-" else float(r))
            for m, r in re.findall(r"^\s*(\S+) ratio\s+(\S+): word ppl", output, flags=re.M)}


def _wait_points(proc: Proc, path: Path, n: int):
    proc.wait_for(lambda: path.is_file() and len(path.read_text().splitlines()) >= n)


@pytest.mark.slow
def test_sweep_ctrl_c_then_kill_then_resume(files, tmp_path):
    out = tmp_path / "sw"
    store = out / "sweep.jsonl"
    args = ["sweep", "tiny-llama", "--out", out, "--methods", "weight-svd,ours-uniform", "--ratios", "0.5,0.25",
            "--text", files / "small.txt", "--seq-len", "64", "--max-tokens", "512", "--task", files / "eval.txt",
            "--max-length", "64", "--limit", "1"]

    # Ctrl-C after the first point: exit 130, one line, the point kept
    proc = Proc(args)
    _wait_points(proc, store, 1)
    proc.p.send_signal(signal.SIGINT)
    _interrupted_cleanly(proc, proc.finish(), "sweep.jsonl")
    first = store.read_text()
    assert len(_points(store)) >= 1 and not (out / ".sweep.jsonl.tmp").exists()

    # resumed, then killed -9 after one more point: the earlier lines are untouched
    proc = Proc(args)
    _wait_points(proc, store, len(_points(store)) + 1)
    proc.p.send_signal(signal.SIGKILL)
    assert proc.finish() == -signal.SIGKILL
    second = store.read_text()
    assert second.startswith(first) and len(_points(store)) > len(first.splitlines())
    assert not (_logged(proc.out.decode()) & {(p["method"], p["ratio"]) for p in _points(first)})
    done = {(p["method"], p["ratio"]) for p in _points(store)}

    # resumed to the end: earlier points kept byte for byte and not recomputed
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert store.read_text().startswith(second)
    logged = _logged(res.output)
    assert logged and not (logged & done), (logged, done)
    final = _points(store)
    assert {(p["method"], p["ratio"]) for p in final} == {("dense", None), ("weight-svd", 0.5), ("weight-svd", 0.25),
                                                          ("ours-uniform", 0.5), ("ours-uniform", 0.25)}
    assert len(final) == 5  # each point once


def test_sweep_disk_full_keeps_points(files, tmp_path, monkeypatch):
    """ENOSPC while the next point is written: one-line error, sweep.jsonl as it was, no temp file."""
    import lowrank_attn.harness.store as store_mod  # the sweep's points go through the harness's store

    out = tmp_path / "sw"
    base = ["sweep", "tiny-llama", "--out", str(out), "--ratios", "0.5", "--text", str(files / "small.txt"),
            "--seq-len", "64", "--max-tokens", "512", "--task", str(files / "eval.txt"), "--max-length", "64"]
    res = runner.invoke(app, base + ["--methods", "dense"])
    assert res.exit_code == 0, res.output
    before = (out / "sweep.jsonl").read_bytes()
    assert len(before.splitlines()) == 1

    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name == ".sweep.jsonl.tmp":
            real_write = f.write

            def write(s):
                real_write(s[: len(s) // 2])  # part of it reaches the disk, then it is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            f.write = write
        return f

    monkeypatch.setattr(store_mod, "open", full_disk_open, raising=False)
    res = runner.invoke(app, base + ["--methods", "weight-svd"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "sweep.jsonl" in errors[0] and os.strerror(errno.ENOSPC) in errors[0], res.output
    assert (out / "sweep.jsonl").read_bytes() == before
    assert not (out / ".sweep.jsonl.tmp").exists()
    monkeypatch.undo()
    res = runner.invoke(app, base + ["--methods", "weight-svd"])  # space again: the sweep resumes
    assert res.exit_code == 0, res.output
    assert (out / "sweep.jsonl").read_bytes().startswith(before) and len(_points(out / "sweep.jsonl")) == 2


@pytest.mark.parametrize("body", ['{"method": "dense"}\n[1, 2]\n', '{"method": "dense"}\n{"ratio": 0.5}\n', '"x"\n'])
def test_sweep_refuses_a_store_that_is_not_points(tmp_path, body):
    """A sweep.jsonl line that is JSON but not a point (hand-edited, another tool): one line, no KeyError."""
    from lowrank_attn.errors import LowrankAttnError
    from lowrank_attn.sweep import load_points

    p = tmp_path / "sweep.jsonl"
    p.write_text(body)
    with pytest.raises(LowrankAttnError, match=r"sweep.jsonl:\d+ is not a sweep point"):
        load_points(p)
