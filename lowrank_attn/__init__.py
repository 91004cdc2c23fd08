"""lowrank-attn: measure what attention really uses, and compress query/key maps and the K cache to it.

Public API (imports are lazy: nothing heavy happens at import time)::

    from lowrank_attn import analyze, compress, save_compressed, load_compressed, set_prefill, Recipe, perplexity

``set_prefill(model, "exact" | "compressed")`` sets how prompts attend (exact, the default of post-rope
checkpoints, as ``QuantizedCache`` runs; compressed, over what the cache stores); ``with prefill_as(model,
"compressed"):`` does it for a block, as measurements of a single forward need.
"""

from __future__ import annotations

__version__ = "0.2.0"

_LAZY = {
    "analyze": ("analysis", "analyze"),
    "collect_grams": ("analysis", "collect_grams"),
    "load_model": ("models", "load_model"),
    "load_texts": ("texts", "load_texts"),
    "token_windows": ("texts", "token_windows"),
    "attention_hook": ("calibrate", "attention_hook"),
    "GramStats": ("calibrate", "GramStats"),
    "build_tiny": ("tiny", "build_tiny"),
    "write_analysis": ("report", "write_analysis"),
    "compress": ("compression", "compress"),
    "prepare_calibration": ("compression", "prepare_calibration"),
    "Recipe": ("recipe", "Recipe"),
    "save_compressed": ("checkpoint", "save_compressed"),
    "load_compressed": ("checkpoint", "load_compressed"),
    "set_prefill": ("runtime.surgery", "set_prefill"),
    "prefill_as": ("runtime.surgery", "prefill_as"),
    "perplexity": ("evaluate", "perplexity"),
    "run_sweep": ("sweep", "run_sweep"),
}

from .errors import (  # noqa: E402  (tiny module, no torch)
    CheckpointError, LowrankAttnError, ModelLoadError, RecipeError, StatisticsError, TextError, UnsupportedModelError,
)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'lowrank_attn' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["LowrankAttnError", "ModelLoadError", "UnsupportedModelError", "TextError",
                           "RecipeError", "CheckpointError", "StatisticsError"]
