"""Development probe for long contexts: token perplexity of a compressed model vs dense on the same held-out tokens,
cut into windows of several lengths (the reported numbers go through eval/long_context.py and lm-eval).

    python eval/dev_long.py --model smollm2-135m --lengths 2048,8192 --set rank_ratio=0.5 serve_len=8192

Held-out text (``lowrank_attn.harness.HELD_TEXTS``): the first N tokens of the WikiText-2 test file and a segment
of a Gutenberg novel far beyond what calibration reads (calibration takes the first windows of each novel). The
measure is the package's token perplexity (``lowrank_attn.cachepath.token_perplexity``, one forward per window).
Dense perplexities are cached in runs/dev_long_dense.json per (model, text, length).
"""

import argparse
import json
import time
from pathlib import Path

from lowrank_attn import Recipe, compress, load_model
from lowrank_attn.cachepath import token_perplexity
from lowrank_attn.harness import ResultsStore, data_dir, held_ids, windows_of
from lowrank_attn.texts import bos_prefix

CACHE = Path("runs/dev_long_dense.json")


def ppl(model, ids: list[int], length: int, prefix: list[int]) -> float:
    """Token perplexity over ``ids`` cut into ``length``-token windows (each starting with ``prefix``)."""
    return token_perplexity(model, windows_of(ids, length, prefix))


def dense_ppls(lm, model: str, data: dict, lengths: list[int], prefix: list[int], n_tok: int) -> dict:
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    dense = {}
    for t in data:
        for L in lengths:
            key = f"{model}|{t}|{L}|{n_tok}"
            if key not in cache:
                cache[key] = ppl(lm.model, data[t], L, prefix)
                CACHE.parent.mkdir(exist_ok=True)
                CACHE.write_text(json.dumps(cache, indent=1))
            dense[(t, L)] = cache[key]
    return dense


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--texts", default="wiki,dracula")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value (yaml values)")
    ap.add_argument("--out", help="append the result row (JSON, with the commit) to this file, e.g. "
                                  "eval/results/position/MODEL.jsonl")
    a = ap.parse_args()
    import yaml

    lengths = [int(x) for x in a.lengths.split(",")]
    texts = a.texts.split(",")
    lm = load_model(a.model)
    prefix = bos_prefix(lm.tokenizer)
    n_tok = max(lengths) - len(prefix)
    data = {t: held_ids(lm.tokenizer, t, n_tok) for t in texts}
    dense = dense_ppls(lm, a.model, data, lengths, prefix, n_tok)
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    base = dict(model=a.model, text=[str(data_dir() / "gutenberg-*.txt")], seq_len=2048, max_tokens=16384,
                heldout_tokens=2048, exact_sink=1)
    base.update(over)
    t0 = time.time()
    lm, rep = compress(lm, Recipe.from_dict(base), progress=False)
    row = {"set": over, "compress_s": round(time.time() - t0, 1)}
    for t in texts:
        for L in lengths:
            p = ppl(lm.model, data[t], L, prefix)
            row[f"{t}@{L}"] = f"{p:.2f} ({100 * (p / dense[(t, L)] - 1):+.1f}%)"
    row["ranks"] = [layer["r_max"] for layer in rep["layers"]]
    print(json.dumps(row), flush=True)
    if a.out:
        ResultsStore(a.out, ("model",)).append({"model": a.model, **row})


if __name__ == "__main__":
    main()
