"""Development probe for long contexts: token perplexity of a compressed model vs dense on the same held-out tokens,
cut into windows of several lengths (the reported numbers go through eval/long_context.py and lm-eval).

    python eval/dev_long.py --model smollm2-135m --lengths 2048,8192 --set rank_ratio=0.5 serve_len=8192

Held-out text: the first N tokens of the WikiText-2 test file and a segment of a Gutenberg novel far beyond what
calibration reads (calibration takes the first windows of each novel). Dense perplexities are cached in
runs/dev_long_dense.json per (model, text, length).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lowrank_attn.compression import compress
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.texts import Window, bos_prefix, load_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dev_ppl  # noqa: E402  (eval/dev_ppl.py: the same token-perplexity measure)

DATA = "../shared/data"
HELD = {"wiki": (f"{DATA}/wikitext2-test.raw", 0), "dracula": (f"{DATA}/gutenberg-dracula.txt", 60000)}
CACHE = Path("runs/dev_long_dense.json")


def held_ids(tok, name: str, n: int) -> list[int]:
    path, start = HELD[name]
    ids = tok(load_texts([path])[0].text, add_special_tokens=False).input_ids
    return ids[start : start + n]


def ppl(model, ids: list[int], length: int, prefix: list[int]) -> float:
    """Token perplexity over ``ids`` cut into ``length``-token windows (each starting with ``prefix``)."""
    body = length - len(prefix)
    windows = [Window("held-out", torch.tensor(prefix + ids[a : a + body])) for a in range(0, len(ids) - body + 1, body)]
    return dev_ppl.ppl(model, windows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--texts", default="wiki,dracula")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value (yaml values)")
    ap.add_argument("--out", help="append the result row (JSON) to this file, e.g. eval/results/position/MODEL.jsonl")
    a = ap.parse_args()
    import yaml

    lengths = [int(x) for x in a.lengths.split(",")]
    texts = a.texts.split(",")
    lm = load_model(a.model)
    prefix = bos_prefix(lm.tokenizer)
    n_tok = max(lengths) - len(prefix)
    data = {t: held_ids(lm.tokenizer, t, n_tok) for t in texts}
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    dense = {}
    for t in texts:
        for L in lengths:
            key = f"{a.model}|{t}|{L}|{n_tok}"
            if key not in cache:
                cache[key] = ppl(lm.model, data[t], L, prefix)
                CACHE.parent.mkdir(exist_ok=True)
                CACHE.write_text(json.dumps(cache, indent=1))
            dense[(t, L)] = cache[key]
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    base = dict(model=a.model, text=[f"{DATA}/gutenberg-*.txt"], seq_len=2048, max_tokens=16384, heldout_tokens=2048,
                exact_sink=1)
    base.update(over)
    t0 = time.time()
    lm, rep = compress(lm, Recipe.from_dict(base), progress=False)
    tc = time.time() - t0
    row = {"set": over, "compress_s": round(tc, 1)}
    for t in texts:
        for L in lengths:
            p = ppl(lm.model, data[t], L, prefix)
            row[f"{t}@{L}"] = f"{p:.2f} ({100 * (p / dense[(t, L)] - 1):+.1f}%)"
    row["ranks"] = [layer["r_max"] for layer in rep["layers"]]
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps({"model": a.model, **row}) + "\n")


if __name__ == "__main__":
    main()
