"""Quick token-level perplexity for development iterations (the reported numbers go through lm-eval:
see lowrank_attn.evaluate). Usage: python eval/dev_ppl.py --ratio 0.5 --weighting attention ..."""

import argparse
import json
import time

import torch

from lowrank_attn.compression import compress
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.texts import load_texts, token_windows


def ppl(model, windows):
    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids = w.input_ids[None]
            out = model(ids, labels=ids, use_cache=False)
            nll += out.loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / n)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-len", type=int, default=2048)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value (yaml values)")
    a = ap.parse_args()
    import yaml

    lm = load_model(a.model)
    ev = token_windows(lm.tokenizer, load_texts(["../shared/data/wikitext2-test.raw"]), seq_len=a.eval_len,
                       max_tokens=a.eval_tokens)
    if a.dense:
        print(json.dumps({"dense": ppl(lm.model, ev)}), flush=True)
        if not a.set:
            return
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    base = dict(model=a.model, text=["../shared/data/gutenberg-*.txt"], seq_len=2048, max_tokens=16384, heldout_tokens=2048)
    base.update(over)
    t = time.time()
    lm, rep = compress(lm, Recipe.from_dict(base), progress=False)
    tc = time.time() - t
    print(json.dumps({"set": over, "ppl": ppl(lm.model, ev), "compress_s": round(tc, 1),
                      "summary": {k: round(v, 4) for k, v in rep["summary"].items()}}))


if __name__ == "__main__":
    main()
