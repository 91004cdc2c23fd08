"""The ``lowrank-attn`` application: the typer app, how a command body runs (one-line errors, Ctrl-C), help lists
read from the registries when shown, and the help texts the commands share."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperCommand

from ..errors import LowrankAttnError

app = typer.Typer(
    add_completion=False,
    context_settings={"show_default": True},  # every option's default in --help; None defaults say what auto means
    no_args_is_help=True,
    help="Measure the low-rank structure of attention on real text, compress query/key maps and the K and V cache, "
         "and evaluate the result beside the peers.",
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug


def run_command(fn, *, interrupted: str = "interrupted; nothing was written"):
    """Run a command body: its errors print one line and exit 2, Ctrl-C prints ``interrupted`` and exits 130.
    Command bodies do their (slow) imports inside ``fn`` so that an early Ctrl-C is handled the same way."""
    try:
        return fn()
    except LowrankAttnError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        typer.echo(interrupted, err=True)
        raise typer.Exit(130)


def registry_names() -> dict[str, str]:
    """What help texts list from the registries: modes (``runtime.modes.MODES``), allocation policies
    (``policies.POLICIES``), value rotations (``vrotation.ROTATIONS``) and sweep methods (``sweep``: ours, the baselines of ``fits.FITS``, …)."""
    from ..policies import POLICIES
    from ..runtime.modes import MODES
    from ..sweep import BOUND, METHODS, QUANT_ONLY
    from ..vrotation import ROTATIONS

    return {"<modes>": " | ".join(["auto", *MODES]), "<policies>": " | ".join(POLICIES),
            "<v-rotations>": " | ".join(f"{r.name} ({r.doc})" for r in ROTATIONS.values()),
            "<methods>": ", ".join(["dense", *METHODS]), "<bound>": ", ".join(BOUND), "<quant>": ", ".join(QUANT_ONLY)}


class RegistryHelp(TyperCommand):
    """A command whose help reads its lists (``<modes>``, ``<policies>``, ``<methods>`` …) from the registries when
    the help is shown: importing them at start-up would cost every command the torch import."""

    def format_help(self, ctx, formatter):
        names = registry_names()
        for param in self.params:
            text = getattr(param, "help", None)
            if text and "<" in text:
                for key, value in names.items():
                    text = text.replace(key, value)
                param.help = text
        return super().format_help(ctx, formatter)


MODEL_HELP = ("Short name (smollm2-135m, qwen2.5-0.5b, gemma3-270m, tiny-llama, tiny-gpt2, …), "
              "a local HF model directory, a .gguf file, or a hub id (online only).")
DTYPE_HELP = "Weights dtype, loaded directly: float32, bfloat16 or float16 (statistics stay float64)."
DEVICE_MAP_HELP = ("Place the model with accelerate as it loads (auto, cpu, …), for models larger than one device "
                   "or host RAM; overrides --device.")
MAX_MEMORY_HELP = ("With --device-map: the most each device may hold, e.g. cpu=8GiB or 0=20GiB,cpu=30GiB; what does "
                   "not fit is offloaded to --offload-folder and streamed in layer by layer for each forward.")
OFFLOAD_HELP = ("With --device-map: where weights that do not fit (--max-memory) are offloaded, for models bigger than "
                "host RAM. Such a model compresses in post-rope mode and saves a --delta checkpoint.")
SAVE_DTYPE_DEFAULT = ("auto: the dtype the model was published in, its config's: bfloat16 for smollm2-135m, qwen2.5-*, "
                      "gemma3-270m and other GGUFs, float32 for tiny-*; --dtype's when that is bfloat16/float16")
TEXT_HELP = ("Text to calibrate on: files, globs, directories, a JSONL with a 'text' field, hf:NAME[:CONFIG[:SPLIT]], "
             "builtin:gutenberg (public-domain excerpts shipped with the package) or sampled (text sampled from the "
             "model itself: data-free, measured much worse). Repeatable. Default: builtin:gutenberg; text from the "
             "domain you serve is better.")


def write_json(out: Path | None, doc: dict) -> None:
    """A command's results JSON at ``out`` (nothing when None); a failure is one line."""
    import json

    if out:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        except OSError as e:
            raise LowrankAttnError(f"cannot write {out}: {e.strerror or e}") from e
