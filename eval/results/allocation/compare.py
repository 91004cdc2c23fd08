"""Allocation signals compared on one model: token perplexity (``lowrank_attn.cachepath.token_perplexity``, the
measure of eval/dev_ppl.py) of WikiText-2
windows after compressing with each configuration, the calibration shared by all of them.

    flock /tmp/lowrank-heavy.lock python eval/results/allocation/compare.py --model smollm2-135m \\
        --set min_rank=1 exact_sink=1 --configs "rank_ratio=0.5 signal=output" "rank_ratio=0.5 signal=fisher"

Each configuration is a dev_ppl.py run (same base recipe: Gutenberg calibration text, seq_len 2048,
max_tokens 16384, heldout_tokens 2048; same evaluation windows) except that the calibration pass is
done once. Appends one JSON line per configuration to eval/results/allocation/<model>.jsonl."""

import argparse
import json
import subprocess
import time
from pathlib import Path

from lowrank_attn import Recipe, compress, load_model, load_texts, prepare_calibration, token_windows
from lowrank_attn.cachepath import token_perplexity as ppl
from lowrank_attn.harness import REPO, ResultsStore, data_dir, git_commit
from lowrank_attn.recipe import yaml_value


def _kv(items):  # values read as recipe YAML (so 1e-4 is a float)
    return {k: yaml_value(v) for k, v in (s.split("=", 1) for s in items)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-len", type=int, default=2048)
    ap.add_argument("--set", nargs="*", default=[], help="overrides shared by every configuration, key=value")
    ap.add_argument("--configs", nargs="+", required=True, help='one quoted "key=value key=value" per configuration')
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    store = ResultsStore(a.out or Path(__file__).parent / f"{a.model}.jsonl", ("model",))
    commit = git_commit()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "lowrank_attn"], capture_output=True, text=True,
                                cwd=REPO).stdout)

    lm = load_model(a.model)
    ev = token_windows(lm.tokenizer, load_texts([str(data_dir() / "wikitext2-test.raw")]), seq_len=a.eval_len,
                       max_tokens=a.eval_tokens)
    dense = ppl(lm.model, ev)
    print(json.dumps({"dense": dense}), flush=True)
    common = _kv(a.set)
    base = {**dict(model=a.model, text=[str(data_dir() / "gutenberg-*.txt")], seq_len=2048, max_tokens=16384,
                   heldout_tokens=2048), **common}
    t = time.time()
    cal = prepare_calibration(lm, Recipe.from_dict(base), progress=False)
    t_cal = time.time() - t
    for cfg in a.configs:
        over = _kv(cfg.split())
        recipe = Recipe.from_dict({**base, **over})
        fresh = load_model(a.model)
        t = time.time()
        fresh, rep = compress(fresh, recipe, calibration=cal, progress=False)
        tc = time.time() - t
        p = ppl(fresh.model, ev)
        row = {"model": a.model, "set": common, "config": over, "dense_ppl": dense, "ppl": p,
               "change": p / dense - 1, "eval_tokens": sum(len(w.input_ids) for w in ev),
               "compress_s": round(tc, 1), "calibration_s": round(t_cal, 1),
               "layer_ranks": [layer["r_max"] for layer in rep["layers"]],
               "summary": {k: round(v, 4) for k, v in rep["summary"].items()},
               "allocation": {k: v for k, v in rep.get("allocation", {}).items() if k != "probes"},
               "commit": commit, "lowrank_attn_dirty": dirty}
        print(json.dumps(row), flush=True)
        store.append(row)
        del fresh


if __name__ == "__main__":
    main()
