"""``lowrank-attn analyze``: the spectra of every head."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import DEVICE_MAP_HELP, DTYPE_HELP, MAX_MEMORY_HELP, MODEL_HELP, OFFLOAD_HELP, TEXT_HELP, app, run_command


@app.command()
def analyze(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", show_default='builtin:gutenberg', help=TEXT_HELP),
    out: Path = typer.Option(Path("runs/spectra"), "--out", "-o", help="Directory for spectra.json, summary.csv/md and plots."),
    seq_len: Optional[int] = typer.Option(None, show_default="auto: 1024 or the model's maximum", help="Tokens per window (default: 1024 or the model's maximum)."),
    max_tokens: Optional[int] = typer.Option(None, show_default='none: all of the text', min=1, help="Cap on the total number of tokens, shared across texts (at least one window per text)."),
    device: str = typer.Option("cpu", help="Torch device: cpu, cuda, cuda:1, …"),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    device_map: Optional[str] = typer.Option(None, "--device-map", show_default='none: --device', help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", show_default='none: no cap', help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", show_default='none: no offloading', help=OFFLOAD_HELP),
    batch_size: int = typer.Option(1, min=1, help="Windows per forward pass."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    plots: bool = typer.Option(True, help="Write PNG plots (matplotlib)."),
):
    """Measure the spectra of the row-centred logit field E~ and of W_Q^T W_K for every head."""

    def go():
        from .. import analysis as analyze_mod
        from ..fsutil import check_writable_target
        from ..report import summary_markdown, write_analysis

        check_writable_target(out, overwrite)
        report = analyze_mod.analyze(model, text, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                     batch_size=batch_size, progress=True, dtype=dtype, device_map=device_map,
                                     max_memory=max_memory, offload_folder=offload_folder)
        write_analysis(report, out, overwrite=overwrite, plots=plots)
        typer.echo(summary_markdown(report))
        typer.echo(f"wrote {out}/spectra.json, summary.csv, summary.md" + (", *.png" if plots else ""))

    run_command(go)
