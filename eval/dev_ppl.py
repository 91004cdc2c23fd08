"""Quick token-level perplexity for development iterations (the reported numbers go through lm-eval:
see lowrank_attn.evaluate). Usage: python eval/dev_ppl.py --ratio 0.5 --weighting attention ...

The measure is the package's (``lowrank_attn.cachepath.token_perplexity``: one forward per window)."""

import argparse
import json
import time

from lowrank_attn import Recipe, compress, load_model, load_texts, token_windows
from lowrank_attn.cachepath import token_perplexity
from lowrank_attn.harness import data_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-len", type=int, default=2048)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value (yaml values)")
    a = ap.parse_args()
    import yaml

    lm = load_model(a.model)
    ev = token_windows(lm.tokenizer, load_texts([str(data_dir() / "wikitext2-test.raw")]), seq_len=a.eval_len,
                       max_tokens=a.eval_tokens)
    if a.dense:
        print(json.dumps({"dense": token_perplexity(lm.model, ev)}), flush=True)
        if not a.set:
            return
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    base = dict(model=a.model, text=[str(data_dir() / "gutenberg-*.txt")], seq_len=2048, max_tokens=16384,
                heldout_tokens=2048)
    base.update(over)
    t = time.time()
    lm, rep = compress(lm, Recipe.from_dict(base), progress=False)
    tc = time.time() - t
    print(json.dumps({"set": over, "ppl": token_perplexity(lm.model, ev), "compress_s": round(tc, 1),
                      "summary": {k: round(v, 4) for k, v in rep["summary"].items()}}))


if __name__ == "__main__":
    main()
