"""The budget allocation with and without its concave majorant (``fit.allocate_budget(majorant=...)``) on
held-out text through the cache: does allocating optimally on the measured errors help a model compressed with
the defaults?

    python eval/allocation_ab.py --model qwen2.5-0.5b [--ratio 0.75]

One calibration (the defaults), compressed twice — the plain greedy (the default) and with ``majorant=True``
(switched in ``fit`` for that arm only) — each measured on the held-out text of eval/kv_total.py (2×2048 tokens
of WikiText-2 test and of Dracula, never calibrated on), fed in 512-token chunks through the model's own cache,
prompts exact (the default): next-token KL to the dense model over the tokens that read the cache (after the
first chunk) and token perplexity. Rows: eval/results/allocation/ab-MODEL.jsonl.
"""
from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "allocation"
CHUNK, LENGTH, WINDOWS = 512, 2048, 2


def logprobs(model, ids):
    """Per chunk of ``ids`` fed through the model's own cache: (start, next-token log-probs (s, V), targets (s,))."""
    from transformers import DynamicCache

    from lowrank_attn.cachepath import chunked_logprobs

    for start, lp, targets, _ in chunked_logprobs(model, ids, DynamicCache(config=model.config), chunk=CHUNK):
        yield start, lp, targets


def measure(model, windows, dense_lp) -> dict:
    import math

    out = {}
    for name, wins in windows.items():
        kl, nll, n, n_kl = 0.0, 0.0, 0, 0
        for w, ids in enumerate(wins):
            for start, lp, targets in logprobs(model, ids):
                nll -= float(lp.gather(-1, targets[:, None]).sum())
                n += targets.numel()
                if start:  # tokens that read the cache
                    ref = dense_lp[name][w][start].float()
                    kl += float((ref.exp() * (ref - lp)).sum())
                    n_kl += targets.numel()
        out[name] = {"ppl": math.exp(nll / n), "kl": kl / n_kl}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--ratio", type=float, default=None, help="key budget (default: the recipe default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from lowrank_attn import Recipe, compress, load_model, prepare_calibration
    from lowrank_attn import fit as fitmod
    from lowrank_attn.harness import HELD_TEXTS, ResultsStore, held_windows, stamp
    from lowrank_attn.models import restorable

    torch.set_num_threads(1)
    lm = load_model(args.model)
    recipe = Recipe(model=args.model) if args.ratio is None else Recipe(model=args.model, rank_ratio=args.ratio)
    windows = {t: held_windows(lm.tokenizer, t, LENGTH, WINDOWS) for t in HELD_TEXTS}
    dense_lp = {t: [{s: lp.half() for s, lp, _ in logprobs(lm.model, ids) if s} for ids in wins]
                for t, wins in windows.items()}
    dense = measure(lm.model, windows, dense_lp)
    cal = prepare_calibration(lm, recipe, progress=False)
    store = ResultsStore(OUT / f"ab-{args.model}.jsonl", key=("model", "arm", "rank_ratio", "commit"))
    budget = fitmod.allocate_budget
    for arm, majorant in (("plain greedy", False), ("majorant", True)):
        fitmod.allocate_budget = functools.partial(budget, majorant=majorant)  # what budget_policy calls
        try:
            with restorable(lm.model):
                lm2, report = compress(lm, recipe, calibration=cal, progress=False)
                res = measure(lm2.model, windows, dense_lp)
        finally:
            fitmod.allocate_budget = budget
        ranks = [layer["r_max"] for layer in report["layers"]]
        row = {"model": args.model, "arm": arm, "rank_ratio": recipe.rank_ratio, "ranks": ranks,
               "kl_mean": sum(r["kl"] for r in res.values()) / len(res),
               "ppl_change_mean": sum(res[t]["ppl"] / dense[t]["ppl"] - 1 for t in res) / len(res),
               "texts": res, "dense": dense, "chunk": CHUNK, "length": LENGTH, "windows": WINDOWS, **stamp()}
        store.append(row)
        detail = ", ".join("%s KL %.5f ppl %.3f" % (t, r["kl"], r["ppl"]) for t, r in res.items())
        print(f"{args.model} {arm}: KL {row['kl_mean']:.5f}, ppl change {100 * row['ppl_change_mean']:+.3f}% ({detail})",
              flush=True)


if __name__ == "__main__":
    main()
