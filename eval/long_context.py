"""Long-context report: perplexity change vs dense against context length, and passkey retrieval at the longest.

  python eval/long_context.py smollm2-135m --recipe recipes/smollm2-135m.yaml \\
      --methods dense ours ours+4bit kivi-4bit --lengths 1024 2048 4096 8192 --depths 8
  python eval/long_context.py smollm2-135m --methods dense ours "ours-w256:exact_window=256" "v2:recipes/v2.yaml"

Methods: ``dense``; a name of the sweep's (``ours`` = the recipe itself, ``ours+4bit``, ``kivi-4bit``, …); or
``LABEL:SPEC``, SPEC comma-separated recipe YAMLs and ``field=value`` overrides. Every method is compressed once
and saved under --ckpt-dir, then measured point by point across methods: lm-eval rolling perplexity of one
held-out document at each --lengths, passkey prompts at the longest (``lowrank_attn.harness.long_context``
documents the run). Points are appended to ``long.jsonl``, so a killed run resumes; ``--max-minutes`` stops
starting new points. Writes ``long.jsonl``, ``long.json``, ``long.md`` and ``ppl_vs_length.png`` in --out
(default ``eval/results/<model>/long``; ``harness.long_report``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.errors import LowrankAttnError  # noqa: E402
from lowrank_attn.harness.long_context import (  # noqa: E402
    DEFAULT_LENGTHS, DEFAULT_METHODS, DEFAULT_TEXT, base_recipe, default_out, run_long,
)
from lowrank_attn.harness.long_report import rewrite_report, write_report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--recipe", default=None, help="base recipe (default recipes/<model>.yaml if it exists, else defaults)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--depths", default="8", help="passkey depths: a count, or comma-separated fractions; 0 = no passkey")
    p.add_argument("--samples", type=int, default=1, help="passkey prompts per depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passkey-length", type=int, default=None, help="default: the longest --lengths")
    p.add_argument("--filler", default=None, help="passkey filler text file (default: neutral sentences)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="held-out text for perplexity")
    p.add_argument("--skip-tokens", type=int, default=None, help="default: the recipe's max_tokens + heldout_tokens")
    p.add_argument("--eval-tokens", type=int, default=None, help="default: the longest --lengths")
    p.add_argument("--out", default=None, help="default eval/results/<model>/long")
    p.add_argument("--ckpt-dir", default=None, help="compressed models are kept here (default runs/long/<model>)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new point after this long; rerun to resume")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", action="store_true", help="only rewrite long.md/json/png in --out from its long.jsonl and "
                   "long.json (no model is loaded)")
    args = p.parse_args(argv)
    out = Path(args.out or default_out(args.model))
    try:
        if args.report:
            rewrite_report(out)
            print((out / "long.md").read_text())
            return 0
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        points, meta = run_long(args.model, out, recipe=base_recipe(args.model, args.recipe), methods=args.methods,
                                lengths=args.lengths, depths=None if args.depths.strip() == "0" else args.depths,
                                samples=args.samples, seed=args.seed, passkey_length=args.passkey_length,
                                filler=args.filler, text=args.text, skip_tokens=args.skip_tokens,
                                eval_tokens=args.eval_tokens, ckpt_dir=args.ckpt_dir, max_minutes=args.max_minutes,
                                progress=not args.no_progress)
        files = write_report(points, meta, out)
    except LowrankAttnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the points so far are kept in long.jsonl: rerun to resume", file=sys.stderr)
        return 130
    print((out / "long.md").read_text())
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
