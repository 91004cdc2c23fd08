"""Error types (defined in ``runtime.errors``, which checkpoints carry; re-exported here)."""

from .runtime.errors import (  # noqa: F401
    CheckpointError, LowrankAttnError, ModelLoadError, RecipeError, StatisticsError, TextError, UnsupportedModelError,
)
