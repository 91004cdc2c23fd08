"""Phases of a long job, each announced when it starts (no silent minutes) and timed: ``PhaseClock``."""

from __future__ import annotations

import sys
import time


class PhaseClock:
    """``clock.start("fit", "closed-form maps per KV head")`` closes the previous phase and announces the next (on
    stderr, when ``progress``); ``clock.stop()`` closes the last; ``clock.times`` = {phase: seconds}."""

    def __init__(self, progress: bool = True, prefix: str = "compress"):
        self.progress, self.prefix = progress, prefix
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def start(self, name: str, what: str = "") -> None:
        self.stop()
        self._name, self._t0 = name, time.perf_counter()
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"[{self.prefix}] {name}{': ' + what if what else ''} ...", file=sys.stderr)

    def stop(self) -> None:
        if self._name is not None:
            took = time.perf_counter() - self._t0
            self.times[self._name] = round(self.times.get(self._name, 0.0) + took, 2)
            if self.progress:
                from tqdm.auto import tqdm

                tqdm.write(f"[{self.prefix}] {self._name} took {took:.1f} s", file=sys.stderr)
            self._name = None
