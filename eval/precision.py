"""Half precision end to end (issue #14): per model, in bfloat16 and float16 against float32.

    python eval/precision.py --model smollm2-135m          # writes eval/results/precision/<model>.json
    python eval/precision.py --table                       # eval/results/precision/precision.md from the JSONs

For one model (one process, so peak memory is its own):

* the fp32 dense model: token perplexity on 2×2048-token windows of WikiText-2 (eval/dev_ppl.py style)
  and next-token log-probabilities on a 512-token probe window (the reference for everything below);
* per half dtype: the dense model loaded straight in that dtype (its own half-precision error: mean
  next-token KL to fp32 and max |Δ log-prob| on the probe); full rank compressed in that dtype (must
  stay within the dense half model's own error); 50% rank with the model's recipe (token perplexity
  vs the fp32 compression with the same recipe, target within 1%), then save → load → generate;
* ablations at 50% in the half dtype, same maps: the q/k projection in the model dtype instead of
  fp32 (``attention.PROJECTION_DTYPE = None``); and (``--ablate-balance``) unbalanced maps (the
  closed form's raw √N / 1/√N rows) with the projection in the model dtype.

Calibration is the recipe's, with ``--calib-tokens`` fit tokens (a CPU budget); fp32 and the half
dtypes use the same text and settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowrank_attn import fit as fitmod  # noqa: E402
from lowrank_attn.checkpoint import load_compressed, save_compressed  # noqa: E402
from lowrank_attn.compression import compress, prepare_calibration  # noqa: E402
from lowrank_attn.models import load_model, restorable  # noqa: E402
from lowrank_attn.recipe import Recipe  # noqa: E402
from lowrank_attn.runtime import attention  # noqa: E402
from lowrank_attn.texts import load_texts, token_windows  # noqa: E402

OUT = ROOT / "eval" / "results" / "precision"
WIKI = ROOT / ".." / "shared" / "data" / "wikitext2-test.raw"
HALF = ("bfloat16", "float16")
PROMPT = "The old lighthouse keeper climbed the stairs and"


def token_ppl(model, windows) -> float:
    dev = model.get_input_embeddings().weight.device
    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids = w.input_ids[None].to(dev)
            out = model(ids, labels=ids, use_cache=False)
            nll += out.loss.float().item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def logprobs(model, ids) -> torch.Tensor:
    dev = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        return torch.log_softmax(model(ids[None].to(dev), use_cache=False).logits[0].float(), -1).cpu()  # (S, V)


def vs_ref(ref: torch.Tensor, lp: torch.Tensor) -> dict:
    """Mean next-token KL(ref ‖ lp), max |Δ log-prob| over the tokens ref gives ≥ 1e-4, top-1 agreement."""
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
    live = ref > math.log(1e-4)
    return {"kl": kl, "max_dlogp": float((ref - lp).abs()[live].max()),
            "top1_agree": float((ref.argmax(-1) == lp.argmax(-1)).float().mean())}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def generate(model, tok, n=16) -> str:
    dev = model.get_input_embeddings().weight.device
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(dev)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_model(name: str, calib_tokens: int, ablate_balance: bool, dtypes) -> dict:
    t0 = time.time()
    recipe = Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml").replace(max_tokens=calib_tokens)
    res = {"model": name, "recipe": recipe.to_dict(), "calib_tokens": calib_tokens, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "device": "cpu"}
    lm = load_model(name)
    ev = token_windows(lm.tokenizer, load_texts([str(WIKI)]), seq_len=2048, max_tokens=4096)
    probe = ev[0].input_ids[:512]
    res["eval"] = {"windows": len(ev), "tokens": sum(len(w.input_ids) for w in ev), "probe_tokens": len(probe)}
    ref = logprobs(lm.model, probe)
    res["float32"] = {"dense_ppl": token_ppl(lm.model, ev)}
    lm, _ = compress(lm, recipe, progress=False)
    res["float32"]["ppl50"] = token_ppl(lm.model, ev)
    res["float32"]["rss_gb"] = peak_rss_gb()
    del lm
    print(json.dumps({k: res[k] for k in ("model", "float32")}), flush=True)

    for dt in dtypes:
        r = res[dt] = {}
        lm = load_model(name, dtype=dt)
        r["weights_dtype"] = str(next(lm.model.parameters()).dtype)
        r["dense"] = {**vs_ref(ref, logprobs(lm.model, probe)), "ppl": token_ppl(lm.model, ev)}
        full = recipe.replace(policy="uniform", rank_ratio=1.0, max_tokens=2048, heldout_tokens=0, dtype=dt)
        with restorable(lm.model):
            compress(lm, full, progress=False)
            r["full_rank"] = vs_ref(ref, logprobs(lm.model, probe))
        rec = recipe.replace(dtype=dt)
        cal = prepare_calibration(lm, rec, progress=False)
        with restorable(lm.model):
            lm2, report = compress(lm, rec, calibration=cal, progress=False)
            r["ppl50"] = token_ppl(lm.model, ev)
            r["ppl50_vs_fp32"] = r["ppl50"] / res["float32"]["ppl50"] - 1
            r["vs_fp32_dense_50"] = vs_ref(ref, logprobs(lm.model, probe))
            maps = [b for n, b in lm.model.named_buffers() if n.endswith(("lowrank_q_map", "lowrank_k_map"))]
            r["map_abs_max"] = max(float(b.abs().max()) for b in maps) if maps else None
            old = attention.PROJECTION_DTYPE
            attention.PROJECTION_DTYPE = None
            try:
                r["ppl50_half_projection"] = token_ppl(lm.model, ev)
            finally:
                attention.PROJECTION_DTYPE = old
            tmp = Path(tempfile.mkdtemp(prefix="precision-"))
            try:
                save_compressed(lm2, report, tmp / "ckpt")
                back = load_compressed(tmp / "ckpt")
                r["reload"] = {"weights_dtype": str(back.model.get_input_embeddings().weight.dtype),
                               "logits_equal": bool(torch.equal(logprobs(back.model, probe[:128]),
                                                                logprobs(lm.model, probe[:128]))),
                               "checkpoint_mb": round(sum(f.stat().st_size for f in (tmp / "ckpt").glob("*.safetensors")) / 2**20, 1),
                               "generated": generate(back.model, back.tokenizer)}
                del back
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if ablate_balance:
            orig = fitmod.balance_maps
            fitmod.balance_maps = lambda a, b: (a, b)
            attention.PROJECTION_DTYPE = None
            try:
                with restorable(lm.model):
                    compress(lm, rec, calibration=cal, progress=False)
                    maps = [b for n, b in lm.model.named_buffers() if n.endswith(("lowrank_q_map", "lowrank_k_map"))]
                    r["unbalanced_map_abs_max"] = max(float(b.abs().max()) for b in maps)
                    r["ppl50_unbalanced_half_projection"] = token_ppl(lm.model, ev)
            finally:
                fitmod.balance_maps = orig
                attention.PROJECTION_DTYPE = old
        r["rss_gb"] = peak_rss_gb()
        del lm, lm2, cal
        print(json.dumps({dt: r}), flush=True)
    res["seconds"] = round(time.time() - t0)
    return res


def _f(x, fmt=".3f"):
    return "-" if x is None else format(x, fmt)


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = ["# Half precision (bf16, fp16) vs fp32", "",
             "Regenerate: `python eval/precision.py --model NAME` per model, then `python eval/precision.py --table`. "
             "Token perplexity on 2×2048-token windows of WikiText-2 (eval/dev_ppl.py style); KL = mean next-token "
             "KL to the fp32 dense model on a 512-token probe window; 50% = the model's recipe at rank ratio 0.5 "
             "(calibration tokens as listed), compared with the same compression in fp32.", "",
             "| model | dtype | dense ppl (fp32 → half) | dense half KL | full rank KL | full/dense | 50% ppl fp32 | "
             "50% ppl half | Δ vs fp32 50% | half projection | unbalanced + half proj | reload exact | generate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in rows:
        f32 = res["float32"]
        for dt in HALF:
            r = res.get(dt)
            if not r:
                continue
            ratio = r["full_rank"]["kl"] / max(r["dense"]["kl"], 1e-12)
            ub = r.get("ppl50_unbalanced_half_projection")
            lines.append(
                f"| {res['model']} | {dt} | {f32['dense_ppl']:.3f} → {r['dense']['ppl']:.3f} | {r['dense']['kl']:.2e} | "
                f"{r['full_rank']['kl']:.2e} | {ratio:.2f} | {f32['ppl50']:.3f} | {r['ppl50']:.3f} | "
                f"{100 * r['ppl50_vs_fp32']:+.2f}% | {_f(r.get('ppl50_half_projection'))} | {_f(ub)} | "
                f"{'yes' if r['reload']['logits_equal'] else 'NO'} | {r['reload']['generated']!r} |")
    lines += ["", "Per model: calibration tokens, peak RSS and time:", ""]
    for res in rows:
        lines.append(f"* {res['model']}: {res['calib_tokens']} fit tokens (seq_len {res['recipe']['seq_len']}), "
                     f"{res['seconds']} s, peak RSS {max(res[k]['rss_gb'] for k in ('float32', *HALF) if k in res):.2f} GB, "
                     f"torch {res['torch']} on {res['device']} ({res['threads']} threads)")
    text = "\n".join(lines) + "\n"
    (out / "precision.md").write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--dtypes", default=",".join(HALF))
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--ablate-balance", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.model:
        res = run_model(a.model, a.calib_tokens, a.ablate_balance, [d for d in a.dtypes.split(",") if d])
        (a.out / f"{a.model}.json").write_text(json.dumps(res, indent=1) + "\n")
    if a.table or not a.model:
        print(table(a.out))


if __name__ == "__main__":
    main()
