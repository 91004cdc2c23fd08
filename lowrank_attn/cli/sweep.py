"""``lowrank-attn sweep``: perplexity, KL and K-cache bytes versus rank, ours beside the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import LowrankAttnError
from .app import DEVICE_MAP_HELP, DTYPE_HELP, MODEL_HELP, TEXT_HELP, RegistryHelp, app, run_command


@app.command(cls=RegistryHelp)
def sweep(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="Directory for sweep.jsonl/csv/md/json and plots; "
                             "an existing one is resumed."),
    ratios: str = typer.Option("0.75,0.5,0.25", help="Comma-separated mean rank ratios in (0, 1]."),
    methods: str = typer.Option("dense,weight-svd,key-pca,think,ours-uniform,ours,ours+4bit", help="Comma-separated: <methods>; one point each: <bound> (certificate policy), "
                                "<quant> (K-cache quantisation alone)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", show_default='none: built-in defaults', help="Recipe for calibration settings (text, seq_len, …)."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", show_default='builtin:gutenberg', help=TEXT_HELP),
    seq_len: Optional[int] = typer.Option(None, show_default="the recipe's; auto: 2048 or the model's maximum", help="Calibration window length (overrides the recipe)."),
    max_tokens: Optional[int] = typer.Option(None, show_default="the recipe's, 32768", help="Calibration tokens (overrides the recipe)."),
    task: str = typer.Option("wikitext2-local", help="Evaluation task (see eval --help)."),
    text_file: Optional[str] = typer.Option(None, show_default="the task's default file", help="Text file for the evaluation task."),
    max_length: int = typer.Option(2048, help="lm-eval context length."),
    limit: Optional[int] = typer.Option(None, show_default='none: every document', help="Only the first N evaluation documents (faster)."),
    device: Optional[str] = typer.Option(None, show_default="the recipe's, cpu",
                                         help="cpu, cuda or cuda:N (overrides the recipe)."),
    dtype: Optional[str] = typer.Option(None, show_default="the recipe's, float32", help=DTYPE_HELP + " Default: the recipe's (float32)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", show_default='none: --device', help=DEVICE_MAP_HELP),
):
    """Perplexity (lm-eval), attention KL and K-cache bytes versus rank, for ours and the baselines."""

    def go():
        from ..recipe import Recipe
        from ..sweep import run_sweep
        from ..sweep_report import sweep_markdown, write_sweep_report

        try:
            rlist = [float(x) for x in ratios.split(",") if x.strip()]
        except ValueError:
            raise LowrankAttnError(f"--ratios: expected comma-separated numbers, got {ratios!r}") from None
        r = Recipe.from_yaml(recipe) if recipe else Recipe()
        r = r.replace(model=model, text=list(text) if text else None, device=device, seq_len=seq_len,
                      max_tokens=max_tokens, dtype=dtype)
        mlist = [m.strip() for m in methods.split(",") if m.strip()]
        if not mlist:
            raise LowrankAttnError(f"--methods: give at least one method, got {methods!r}")
        points = run_sweep(r.model, out, ratios=rlist, methods=mlist, recipe=r, task=task, text_file=text_file,
                           max_length=max_length, limit=limit, log=typer.echo, device_map=device_map)
        files = write_sweep_report(points, out, title=model)
        typer.echo(sweep_markdown(points))
        typer.echo(f"wrote {', '.join(str(out / f) for f in files)}")

    run_command(go, interrupted=f"interrupted; the points so far are kept in {out / 'sweep.jsonl'}: rerun to resume")
