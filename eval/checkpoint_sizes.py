"""Checkpoint sizes of SmolLM2-135M: full vs delta, fp32 vs bf16 (50% uniform rank, small calibration),
with load times, logit differences after reload, and left-padded batch vs alone generation.
Writes eval/results/checkpoint/smollm2-135m-sizes.json. Run from the repository root."""
import os, time, json, shutil, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from pathlib import Path
from lowrank_attn import compress, Recipe
from lowrank_attn.checkpoint import save_compressed, load_compressed

root = Path("runs/checkpoint_sizes"); shutil.rmtree(root, ignore_errors=True); root.mkdir(parents=True)
t = time.time()
lm, rep = compress("smollm2-135m", Recipe.from_yaml("recipes/smollm2-135m.yaml").replace(max_tokens=4096, seq_len=1024, heldout_tokens=1024, policy="uniform"), progress=False)
print(f"compress {time.time()-t:.0f}s", rep["summary"].get("mean_rank_ratio"), flush=True)
def size(d):
    return sum(p.stat().st_size for p in Path(d).iterdir())
out = {}
for name, kw in [("full-fp32", {}), ("full-bf16", dict(dtype="bfloat16")), ("delta-fp32", dict(delta=True)),
                 ("delta-bf16", dict(delta=True, dtype="bfloat16"))]:
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
# generate: left-padded batch vs alone on the real model
tok = lm.tokenizer; tok.padding_side = "left"
if tok.pad_token is None: tok.pad_token = tok.eos_token
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
json.dump(out, open("eval/results/checkpoint/smollm2-135m-sizes.json", "w"), indent=1)
