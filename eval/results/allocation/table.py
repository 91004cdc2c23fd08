"""The comparison table of eval/results/allocation/*.jsonl (written by compare.py) as markdown:
    python eval/results/allocation/table.py > eval/results/allocation/table.md"""

import argparse
from pathlib import Path

from lowrank_attn.harness import ResultsStore

HERE = Path(__file__).parent


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    rows = []
    for f in sorted(HERE.glob("*.jsonl")):
        rows += ResultsStore(f, ("model",)).rows()
    print("| model | rank ratio | signal | shared settings | dense ppl | ppl | change | compress s | ranks per layer |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows.sort(key=lambda r: (r["model"], -r["config"].get("rank_ratio", 0.5), r["config"].get("signal", "output")))
    for r in rows:
        c = r["config"]
        shared = " ".join(f"{k}={v}" for k, v in r["set"].items())
        print(f"| {r['model']} | {c.get('rank_ratio', 0.5)} | {c.get('signal', 'output')} | {shared} | {r['dense_ppl']:.3f} "
              f"| {r['ppl']:.3f} | {r['change']:+.2%} | {r['compress_s']} | {' '.join(map(str, r['layer_ranks']))} |")


if __name__ == "__main__":
    main()
