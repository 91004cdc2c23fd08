"""Prefill benchmark: compressed against dense, every cache kind we ship, side by side in one run.

    python eval/bench_prefill.py --model smollm2-135m --dtype bfloat16 --lengths 512 2048 8192
    python eval/bench_prefill.py --model qwen2.5-0.5b --dtype float32 --lengths 2048 8192 16384 --repeats 2

For one model and dtype, compresses it once per variant (``--variants``: ``default`` = the recipe defaults,
4-bit K and V; ``lowrank`` = the same ranks, nothing quantised; ``unrotated`` = the default with values
quantised as they are, ``v_rotation: none``, what the rotation costs; ``exact-prefill`` = the default served with
``set_prefill(model, "exact")``, the prompt attended densely and stored compressed; calibration shortened to ``--calib-tokens``,
the time does not depend on the maps' values), then times one prefill of L random tokens through a fresh cache
(``logits_to_keep=1``, as ``generate`` does) for dense and each variant, interleaved (the order reversed on
alternate repeats), after one warm-up each. Reports the median seconds per prompt token and the median of the
per-repeat ratios variant ÷ dense. Rows go to eval/results/bench/prefill-MODEL-DTYPE.json with the machine,
threads and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.harness import REPO, git_commit, host_info, time_interleaved  # noqa: E402

VARIANTS = {"default": {}, "lowrank": {"k_bits": 16, "v_bits": 16}, "unrotated": {"v_rotation": "none"},
            "exact-prefill": {"prefill": "exact"}}  # recipe overrides; "prefill": set_prefill after compressing


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, … (timed regions synchronise on CUDA)")
    ap.add_argument("--out", default=None, help="default eval/results/bench/prefill-MODEL-DTYPE.json")
    args = ap.parse_args(argv)
    import torch
    from transformers import DynamicCache

    from lowrank_attn import Recipe, compress, load_model, set_prefill

    torch.set_num_threads(args.threads)
    models = {"dense": load_model(args.model, device=args.device, dtype=args.dtype).model}
    for name in args.variants:
        overrides = {k: v for k, v in VARIANTS[name].items() if k != "prefill"}
        lm, _ = compress(load_model(args.model, device=args.device, dtype=args.dtype),
                         Recipe(model=args.model, device=args.device, dtype=args.dtype, max_tokens=args.calib_tokens,
                                heldout_tokens=1024, **overrides), progress=False)
        models[name] = set_prefill(lm.model, VARIANTS[name].get("prefill", "compressed"))
    prefill = {name: (lambda ids, m=m: m(input_ids=ids, past_key_values=DynamicCache(config=m.config), use_cache=True,
                                         logits_to_keep=1)) for name, m in models.items()}
    rows = []
    with torch.inference_mode():
        for fn in prefill.values():
            fn(torch.randint(100, 10000, (1, 256), device=args.device))  # warm-up
        for length in args.lengths:
            ids = torch.randint(100, 10000, (1, length), generator=torch.Generator().manual_seed(length)).to(args.device)
            seconds = {name: [] for name in prefill}
            for rep in range(args.repeats):
                took, _ = time_interleaved(prefill, ids, flip=rep % 2 == 1, model=models["dense"])
                for name, s in took.items():
                    seconds[name].append(s)
            for name in args.variants:
                ratio = statistics.median(v / d for v, d in zip(seconds[name], seconds["dense"]))
                rows.append({"length": length, "variant": name, "recipe_overrides": VARIANTS[name],
                             "ms_per_token": 1e3 * statistics.median(seconds[name]) / length,
                             "dense_ms_per_token": 1e3 * statistics.median(seconds["dense"]) / length,
                             "ratio_vs_dense": ratio})
                print(f"{length:6d} {name:8s} {rows[-1]['ms_per_token']:.3f} ms/token, dense "
                      f"{rows[-1]['dense_ms_per_token']:.3f}: {ratio:.3f}× dense", flush=True)
    out = Path(args.out or REPO / "eval" / "results" / "bench" / f"prefill-{args.model}-{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python eval/bench_prefill.py " + " ".join(sys.argv[1:] if argv is None else argv),
                               "model": args.model, "dtype": args.dtype, "repeats": args.repeats,
                               "commit": git_commit(), "host": host_info(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
