"""Is the budget policy's greedy allocation optimal on the errors it measures? (eval/results/allocation)

``fit.allocate_budget`` takes blocks by gain per cost, which is optimal when each layer's error falls by
less with every further block (convex error vs rank). The ``output`` signal measures each layer's error at
grid ranks (d/8 steps); where a later step drops the error more than an earlier one, the greedy can stop
before the better step. This script compresses MODEL with the defaults, captures the measured errors (the
policy's own ``output_errors``, wrapped here), says which layers are non-convex above the rank floor, and
allocates the same budgets with the plain greedy (the default) and with ``allocate_budget(majorant=True)`` (the
greedy also run on each layer's least concave majorant of its cumulative gain, the classic fix, and the
allocation keeping more of the measured gain taken), reporting the predicted total error (the measured errors
at the allocated ranks, interpolated on the grid) of both. Whether that helps on other text:
eval/allocation_ab.py.

    python eval/allocation_convexity.py --model smollm2-135m [--max-tokens 8192] [--ratios 0.75,0.5,0.375]

Writes eval/results/allocation/convexity-MODEL.json (errors, allocations, totals, commit).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "allocation"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--ratios", default="0.75,0.5,0.375")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from lowrank_attn import Recipe, policies
    from lowrank_attn import fit as fitmod
    from lowrank_attn.compression import compress
    from lowrank_attn.harness import stamp

    torch.set_num_threads(1)
    seen = {}
    measured = policies.output_errors

    def capture(ctx, *a, **k):  # the policy's own measurement, kept for the re-allocation below
        grid, errs = measured(ctx, *a, **k)
        seen.update(grid=list(map(int, grid)), errors=[list(map(float, e)) for e in errs], d=ctx.d,
                    costs=ctx.layer_costs(), limits={r: ctx.budget_limits(r) for r in ratios})
        return grid, errs

    ratios = [float(r) for r in args.ratios.split(",")]
    policies.output_errors = capture
    try:
        compress(args.model, Recipe(model=args.model, max_tokens=args.max_tokens), progress=False)
    finally:
        policies.output_errors = measured
    grid, errs, d = seen["grid"], seen["errors"], seen["d"]
    gains = [policies.gains_from_errors(grid, e, d) for e in errs]
    rows = []
    for ratio in ratios:
        lim = seen["limits"][ratio]
        r0 = lim.get("min_rank") or 1
        nonconvex = [layer for layer, e in enumerate(errs) if _nonconvex_above(grid, e, r0)]
        row = {"ratio": ratio, "min_rank": r0, "nonconvex_layers": nonconvex}
        for name, majorant in (("greedy", False), ("majorant", True)):
            ranks = fitmod.allocate_budget(gains, ratio, costs=seen["costs"], majorant=majorant, **lim)
            row[name] = {"ranks": ranks, "predicted_error": sum(float(np.interp(r, grid, e)) for e, r in zip(errs, ranks))}
        rows.append(row)
        print(f"{args.model} ratio {ratio}: {len(nonconvex)} of {len(errs)} layers non-convex above rank {r0}; "
              f"predicted error greedy {row['greedy']['predicted_error']:.4g}, majorant "
              f"{row['majorant']['predicted_error']:.4g}; ranks {'identical' if row['greedy']['ranks'] == row['majorant']['ranks'] else 'differ'}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"convexity-{args.model}.json"
    path.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "grid": grid, "errors": errs,
                                "rows": rows, **stamp()}, indent=1) + "\n")
    print(f"wrote {path}")


def _nonconvex_above(grid: list[int], e: list[float], r0: int) -> bool:
    drops = [(e[i] - e[i + 1]) / (grid[i + 1] - grid[i]) for i in range(len(grid) - 1) if grid[i] >= r0]
    return any(b > a * (1 + 1e-4) for a, b in zip(drops, drops[1:]))


if __name__ == "__main__":
    main()
