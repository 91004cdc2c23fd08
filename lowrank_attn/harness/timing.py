"""Timing that other jobs' load falls on every variant alike.

:func:`time_interleaved` runs every variant once on the same input, in turn, each timed (synchronised on CUDA), the
order reversed when ``flip``: callers alternate ``flip`` over chunks and repeats.
"""

from __future__ import annotations

import time
from typing import Any, Callable


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
