"""Regenerate the README's headline sweep (table + plots) from scratch.

    python eval/reproduce.py                      # SmolLM2-135M, ~1.5–3 h on a 2-core CPU
    python eval/reproduce.py --model qwen2.5-0.5b --ratios 0.5 --methods dense,ours,weight-svd,key-pca
    python eval/reproduce.py --publish-only runs/reproduce-smollm2-135m     # just re-tabulate a run

Runs ``lowrank-attn sweep`` with the model's recipe (calibration: the Gutenberg novels in
``../shared/data``; evaluation: lm-eval word perplexity on the first ``--limit`` documents of the
WikiText-2 test text), resumable in ``runs/reproduce-MODEL``, then copies the points, tables and
plots into ``eval/results/MODEL`` and prints the markdown table the README shows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from lowrank_attn.harness import REPO as ROOT

METHODS = ("dense,ours,weight-svd,key-pca,think,ours-uniform,ours+4bit,ours+2bit,ours-bound,"
           "kivi-4bit,kivi-3bit,kivi-2bit")


def publish(run_dir: Path, name: str) -> str:
    from lowrank_attn.sweep import load_points
    from lowrank_attn.sweep_report import sweep_markdown, write_sweep_report

    dst = ROOT / "eval" / "results" / name
    dst.mkdir(parents=True, exist_ok=True)
    points = list(load_points(run_dir / "sweep.jsonl").values())
    if not points:
        sys.exit(f"no points in {run_dir / 'sweep.jsonl'}")
    if (run_dir / "sweep.jsonl").resolve() != (dst / "sweep.jsonl").resolve():
        shutil.copy(run_dir / "sweep.jsonl", dst / "sweep.jsonl")
    write_sweep_report(points, dst, title=name)
    return sweep_markdown(points)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", help="default: recipes/MODEL.yaml")
    ap.add_argument("--ratios", default="0.75,0.5,0.25")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--limit", type=int, default=3, help="WikiText-2 test documents to evaluate on")
    ap.add_argument("--out", help="default: runs/reproduce-MODEL")
    ap.add_argument("--publish-only", metavar="RUN_DIR", help="only tabulate and publish an existing sweep")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(ROOT)  # the recipes' text globs are relative to the repository root
    if args.publish_only:
        print(publish(Path(args.publish_only), args.model))
        return
    from lowrank_attn.recipe import Recipe
    from lowrank_attn.sweep import run_sweep

    recipe = Recipe.from_yaml(args.recipe or ROOT / "recipes" / f"{args.model}.yaml")
    out = Path(args.out or ROOT / "runs" / f"reproduce-{args.model}")
    run_sweep(args.model, out, ratios=[float(r) for r in args.ratios.split(",")],
              methods=[m.strip() for m in args.methods.split(",") if m.strip()], recipe=recipe, limit=args.limit)
    print(publish(out, args.model))


if __name__ == "__main__":
    main()
