"""Checkpoint sizes of SmolLM2-135M: full vs delta, fp32 vs bf16 (50% uniform rank, small calibration),
with load times, logit differences after reload, and left-padded batch vs alone generation.

    python eval/checkpoint_sizes.py          # writes eval/results/checkpoint/smollm2-135m-sizes.json
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from lowrank_attn.harness import REPO

OUT = REPO / "eval" / "results" / "checkpoint" / "smollm2-135m-sizes.json"
RUNS = REPO / "runs" / "checkpoint_sizes"
VARIANTS = [("full-fp32", {}), ("full-bf16", dict(dtype="bfloat16")), ("delta-fp32", dict(delta=True)),
            ("delta-bf16", dict(delta=True, dtype="bfloat16"))]


def size(d) -> int:
    return sum(p.stat().st_size for p in Path(d).iterdir())


def sizes_and_reloads(lm, rep, root: Path) -> dict:
    """Save every variant, then load each back: bytes, files, save/load seconds, max |logit diff| vs in memory."""
    import torch

    from lowrank_attn import load_compressed, save_compressed

    out = {}
    for name, kw in VARIANTS:
        t = time.time()
        d = save_compressed(lm, rep, root / name, **kw)
        out[name] = {"bytes": size(d), "save_s": round(time.time() - t, 1),
                     "files": {p.name: p.stat().st_size for p in sorted(d.iterdir())}}
        print(name, out[name], flush=True)
    ids = lm.tokenizer("The Queen of Hearts, she made some tarts, all on a summer day.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
    for name in out:
        t = time.time()
        back = load_compressed(root / name)
        out[name]["load_s"] = round(time.time() - t, 1)
        with torch.no_grad():
            lg = back.model(input_ids=ids).logits.float()
        out[name]["max_abs_logit_diff_vs_in_memory"] = float((lg - ref).abs().max())
        print(name, out[name]["load_s"], out[name]["max_abs_logit_diff_vs_in_memory"], flush=True)
    return out


def batch_vs_alone(lm) -> None:
    """Generate: a left-padded batch vs each prompt alone on the real model, and beam search's shape."""
    import torch

    tok = lm.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = ["Alice was beginning to get very tired of sitting by her sister on the bank,", "The Queen of Hearts"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        batch = lm.model.generate(**enc, **kw)
        same = []
        for i, p in enumerate(prompts):
            alone = lm.model.generate(**tok([p], return_tensors="pt"), **kw)
            same.append(bool(torch.equal(alone[0, -16:], batch[i, -16:])))
        beams = lm.model.generate(**enc, **kw, num_beams=3)
    print("batch==alone", same, "beam shape", tuple(beams.shape))
    print(tok.batch_decode(batch[:, -16:]))


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lowrank_attn import Recipe, compress

    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    t = time.time()
    recipe = Recipe.from_yaml(REPO / "recipes" / "smollm2-135m.yaml").replace(max_tokens=4096, seq_len=1024,
                                                                              heldout_tokens=1024, policy="uniform")
    os.chdir(REPO)  # the recipe's paths are relative to the repository root
    lm, rep = compress("smollm2-135m", recipe, progress=False)
    print(f"compress {time.time() - t:.0f}s", rep["summary"].get("mean_rank_ratio"), flush=True)
    out = sizes_and_reloads(lm, rep, RUNS)
    batch_vs_alone(lm)
    OUT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
