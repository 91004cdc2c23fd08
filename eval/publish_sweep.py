"""Copy a sweep's results into eval/results/NAME (tables + plots, committed as the project's own
output) and print its markdown table. Usage: python eval/publish_sweep.py runs/smol-sweep smollm2-135m"""

import shutil
import sys
from pathlib import Path

from lowrank_attn.sweep import load_points
from lowrank_attn.sweep_report import sweep_markdown, write_sweep_report

src, name = Path(sys.argv[1]), sys.argv[2]
dst = Path(__file__).parent / "results" / name
dst.mkdir(parents=True, exist_ok=True)
points = list(load_points(src / "sweep.jsonl").values())
shutil.copy(src / "sweep.jsonl", dst / "sweep.jsonl")
write_sweep_report(points, dst, title=f"{name}: perplexity vs rank")
print(sweep_markdown(points))
