"""Peak memory of one measurement, in a fresh process.

* :class:`PeakRSS` (inside the child: RSS before, peak-RSS counter reset, peak after) and :class:`AnonPeak` (the
  largest anonymous RSS, sampled: memory the kernel cannot drop);
* :func:`run_child` (the parent: a fresh ``python`` process whose last stdout line is its JSON result) and
  :func:`script_cmd` (the command line that reruns a script).
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import threading
from pathlib import Path

from .provenance import REPO


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


class AnonPeak:
    """``with AnonPeak() as a: work()``; ``a.peak_mib``: the largest RssAnon sampled every ``interval`` s — the
    memory that cannot be reclaimed. File-backed pages (an offloaded model's weights, memory-mapped from disk for
    each forward) count in VmRSS/VmHWM but are page cache the kernel drops under pressure; anonymous ones are not."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mib = interval, 0.0

    def __enter__(self) -> "AnonPeak":
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


class ChildFailed(RuntimeError):
    """A measurement child exited non-zero (the message: the end of its stderr) or ran out of time
    (``timed_out``; the message: "timed out after N s")."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


def run_child(cmd: list[str], *, timeout: float | None = None, tail: int = 3000, cwd=REPO) -> dict:
    """Run ``cmd`` (a fresh ``python`` process) from ``cwd`` (the checkout); its last stdout line is its JSON
    result. Raises ChildFailed with the last ``tail`` characters of its stderr, or "timed out after N s"."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"timed out after {timeout} s", timed_out=True) from None
    if proc.returncode != 0:
        raise ChildFailed(proc.stderr[-tail:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def script_cmd(script: str | Path, *args: str) -> list[str]:
    """The command line that runs ``script`` with ``args`` in this interpreter (for :func:`run_child`)."""
    return [sys.executable, str(Path(script).resolve()), *map(str, args)]
