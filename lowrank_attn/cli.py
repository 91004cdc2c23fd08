"""The ``lowrank-attn`` command line: a thin layer over the Python API.

Errors of type ``LowrankAttnError`` print one line and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import LowrankAttnError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Measure the low-rank structure of attention on real text and compress query/key maps and the K cache.",
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LowrankAttnError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        raise typer.Exit(130)


MODEL_HELP = ("Short name (smollm2-135m, qwen2.5-0.5b, gemma3-270m, tiny-llama, tiny-gpt2, …), "
              "a local HF model directory, a .gguf file, or a hub id (online only).")
TEXT_HELP = ("Text to calibrate on: files, globs, directories, a JSONL with a 'text' field, or hf:NAME[:CONFIG[:SPLIT]]. "
             "Repeatable. Default: text sampled from the model itself (real text is better).")


@app.command()
def analyze(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", help=TEXT_HELP),
    out: Path = typer.Option(Path("runs/spectra"), "--out", "-o", help="Directory for spectra.json, summary.csv/md and plots."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per window (default: 1024 or the model's maximum)."),
    max_tokens: Optional[int] = typer.Option(None, help="Cap on the total number of tokens, shared across texts."),
    device: str = typer.Option("cpu", help="Torch device: cpu, cuda, cuda:1, …"),
    batch_size: int = typer.Option(1, min=1, help="Windows per forward pass."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    plots: bool = typer.Option(True, help="Write PNG plots (matplotlib)."),
):
    """Measure the spectra of the row-centred logit field E~ and of W_Q^T W_K for every head."""
    from . import analyze as analyze_mod
    from .fsutil import check_writable_target
    from .report import summary_markdown, write_analysis

    def go():
        check_writable_target(out, overwrite)
        report = analyze_mod.analyze(model, text, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                     batch_size=batch_size, progress=True)
        write_analysis(report, out, overwrite=overwrite, plots=plots)
        typer.echo(summary_markdown(report))
        typer.echo(f"wrote {out}/spectra.json, summary.csv, summary.md" + (", *.png" if plots else ""))

    _run(go)


def entry() -> None:  # pragma: no cover - console script wrapper
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
