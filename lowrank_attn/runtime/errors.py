"""Error types. Every failure a user can cause is one of these; the CLI prints
its message on one line and exits non-zero (``--debug`` shows the traceback)."""


class LowrankAttnError(Exception):
    """Base class: a problem with the user's input or environment, explained in words."""


class ModelLoadError(LowrankAttnError):
    """The model name/path cannot be resolved or loaded."""


class UnsupportedModelError(LowrankAttnError):
    """The architecture is not one lowrank-attn knows how to read or compress."""


class TextError(LowrankAttnError):
    """Calibration/evaluation text is missing, unreadable, empty or too short."""


class RecipeError(LowrankAttnError):
    """A recipe field or CLI override is unknown, of the wrong type, or out of range."""


class CheckpointError(LowrankAttnError):
    """A compressed checkpoint is missing, corrupt, or inconsistent with itself."""


class StatisticsError(LowrankAttnError):
    """Calibration statistics are unusable (NaN/inf, too few tokens)."""
