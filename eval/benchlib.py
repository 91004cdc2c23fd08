"""Shared pieces of the eval/bench_*.py scripts: host facts, the interleaved timing loop, peak-RSS measurement
in a fresh process.

* :func:`host_info`, :func:`git_commit`: what every result JSON records about the machine and the code.
* :func:`time_interleaved`: run every variant once on the same input, in turn, each timed (synchronised on
  CUDA), the order reversed when ``flip`` -- callers alternate ``flip`` over chunks and repeats so load
  from other jobs falls on every variant alike.
* :class:`PeakRSS` (inside the child: RSS before, peak-RSS counter reset, peak after) and
  :func:`run_child` (the parent: a fresh ``python`` process whose last stdout line is its JSON result).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def host_info(torch) -> dict:
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        up = None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"), "uptime": up,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- timing


def sync(model) -> None:
    """Wait for the model's device to finish (CUDA runs asynchronously): call around every timed region."""
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(variants: dict[str, Callable[[Any], Any]], part: Any, *, flip: bool = False,
                     model=None) -> tuple[dict[str, float], dict[str, Any]]:
    """Call every ``variants[name](part)`` once, in order (reversed if ``flip``), each timed with
    ``time.perf_counter`` (and ``sync(model)`` around it when a model is given). Returns (seconds per
    variant, return value per variant), both in the order they ran."""
    order = list(variants)[::-1] if flip else list(variants)
    seconds, results = {}, {}
    for name in order:
        if model is not None:
            sync(model)
        t0 = time.perf_counter()
        results[name] = variants[name](part)
        if model is not None:
            sync(model)
        seconds[name] = time.perf_counter() - t0
    return seconds, results


# ----------------------------------------------------------------------------- memory


def status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, …); None where there is no such file."""
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def status_mib(field: str) -> float | None:
    kib = status_kib(field)
    return None if kib is None else round(kib / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (/proc/self/clear_refs, Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_peak_mib(ndigits: int | None = 1) -> float:
    """Peak RSS of the whole process so far (ru_maxrss), MiB (rounded to ``ndigits``; None: not rounded)."""
    mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return mib if ndigits is None else round(mib, ndigits)


class PeakRSS:
    """In a child process: ``with PeakRSS() as m: work()`` records the RSS before (``rss_before_kib``), resets
    the peak counter, and ``m.peak_mib()`` is the peak RSS since (None where the reset is unsupported)."""

    def __enter__(self) -> "PeakRSS":
        self.rss_before_kib = status_kib("VmRSS")
        self.reset = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak_mib(self) -> float | None:
        return status_mib("VmHWM") if self.reset else None


class ChildFailed(RuntimeError):
    """A measurement child exited non-zero (the message: the end of its stderr) or ran out of time
    (``timed_out``; the message: "timed out after N s")."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


def run_child(cmd: list[str], *, timeout: float | None = None, tail: int = 3000) -> dict:
    """Run ``cmd`` (a fresh ``python`` process) from the repository root; its last stdout line is its JSON result.
    Raises ChildFailed with the last ``tail`` characters of its stderr, or "timed out after N s"."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"timed out after {timeout} s", timed_out=True) from None
    if proc.returncode != 0:
        raise ChildFailed(proc.stderr[-tail:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def script_cmd(script: str | Path, *args: str) -> list[str]:
    return [sys.executable, str(Path(script).resolve()), *map(str, args)]


class AnonPeak:
    """``with AnonPeak() as a: work()``; ``a.peak_mib``: the largest RssAnon sampled every ``interval`` s — the
    memory that cannot be reclaimed. File-backed pages (an offloaded model's weights, memory-mapped from disk for
    each forward) count in VmRSS/VmHWM but are page cache the kernel drops under pressure; anonymous ones are not."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mib = interval, 0.0

    def __enter__(self) -> "AnonPeak":
        import threading

        self._stop = threading.Event()

        def sample():
            while True:
                self.peak_mib = max(self.peak_mib, status_mib("RssAnon") or 0.0)
                if self._stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
