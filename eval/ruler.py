"""RULER (lm-eval 0.4.13's own tasks, offline) for dense, our compressed checkpoints and KV-cache peers.

  python eval/ruler.py --model qwen2.5-0.5b --methods dense quanto-4bit hqq-4bit "ours:50pct=runs/qwen-50pct" \\
      --lengths 4096,8192 --limit 10
  python eval/ruler.py --model qwen2.5-0.5b --table        # README.md + ruler_vs_kv_bytes.png from the rows
  python eval/ruler.py --paired       # PAIRED.md + paired.json: each method minus dense, doc by doc, with a 95% interval

Tasks: the six RULER tasks that build their data offline from a tokenizer (niah_single_1, niah_multikey_2,
niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe); the others need a download and are refused in one line.
Methods: ``dense``, ``ours:<label>=<checkpoint dir>``, ``ours-exact:<label>=<dir>`` (each prompt attended exactly,
stored compressed, as QuantizedCache runs), or a peer (quanto-4bit, quanto-2bit, hqq-4bit, hqq-2bit; quanto-4bit-kivi, quanto-2bit-kivi: keys per channel),
each through lm-eval's Python API (``lowrank_attn.harness.ruler_run``, which documents the run and the rows).
Rows: one JSON line per (model, method, task, length) in ``eval/results/ruler/<model>.jsonl``; a rerun skips
what is done, and a larger ``--limit`` runs only the docs a row lacks (docs 10-19 for ``--limit 20`` after 10) and
merges them into it. ``--table`` writes ``README.md`` and ``ruler_vs_kv_bytes.png`` there (``harness.ruler_report``);
``--paired`` ``PAIRED.md`` (``harness.ruler_paired``: per-doc scores recomputed from the stored responses).

The same through lm-eval's command line (one method, no rows; TOKDIR a directory with the model's
tokenizer files, e.g. ``python eval/ruler.py --model qwen2.5-0.5b --tokenizer-dir`` prints it)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lowrank_attn.lm_eval_model --model lowrank \\
        --model_args pretrained=qwen2.5-0.5b,tokenizer=TOKDIR,kv_cache=quanto-4bit,max_length=4352 \\
        --tasks niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,ruler_cwe,ruler_fwe \\
        --metadata '{"max_seq_lengths":[4096]}' --limit 10 --batch_size 1 --device cpu

(``pretrained=`` a compressed checkpoint directory for ours; drop ``kv_cache=`` for dense.)
GPU: ``--device cuda`` (default dtype there bfloat16; float32 on cpu). Nothing else is device-specific.
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
from lowrank_attn.harness.ruler import DEFAULT_LENGTHS, DEFAULT_LIMIT, OFFLINE_TASKS, RESULTS, RulerError  # noqa: E402
from lowrank_attn.harness.ruler_paired import write_paired  # noqa: E402
from lowrank_attn.harness.ruler_report import write_table  # noqa: E402
from lowrank_attn.harness.ruler_run import run, tokenizer_dir  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b", help="the base model (short name, HF directory, ...)")
    p.add_argument("--methods", nargs="+", default=["dense"],
                   help="dense, ours:<label>=<checkpoint dir>, ours-exact:<label>=<dir> (prompt attended exactly), "
                        "or a peer (quanto-4bit, quanto-2bit, hqq-4bit, hqq-2bit, quanto-4bit-kivi, quanto-2bit-kivi)")
    p.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="comma-separated, among the six offline tasks")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated token lengths")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="samples per task (lm-eval's first N seeded docs)")
    p.add_argument("--max-gen-toks", type=int, default=None,
                   help="cap on generated tokens (default: each task's own, 30-128)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (passed through)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on cpu, else bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tokenizer", default=None, help="a directory with the tokenizer files (default: saved once from the model)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where <model>.jsonl and the table go")
    p.add_argument("--table", action="store_true", help="write README.md and ruler_vs_kv_bytes.png from the rows")
    p.add_argument("--paired", action="store_true",
                   help="write PAIRED.md: each method minus dense on the same docs, with a 95%% interval")
    p.add_argument("--tokenizer-dir", action="store_true", help="print the tokenizer directory for --model and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        if args.pop("tokenizer_dir"):
            print(tokenizer_dir(args["model"]))
            return 0
        if args.pop("table"):
            print(write_table(args["results"]))
            return 0
        if args.pop("paired"):
            print(write_paired(tokenizer_dir, args["results"]))
            return 0
        return run(**args)
    except RulerError as e:
        print(f"ruler: {e}", file=sys.stderr)
        return 2
    except LowrankAttnError as e:  # lowrank-attn's own one-line errors: bad model, missing backend, ...
        print(f"ruler: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
