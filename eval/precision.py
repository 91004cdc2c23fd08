"""Half precision end to end (issue #14): per model, in bfloat16 and float16 against float32.

    python eval/precision.py --model smollm2-135m          # writes eval/results/precision/<model>.json
    python eval/precision.py --table                       # eval/results/precision/precision.md from the JSONs

For one model (one process, so peak memory is its own):

* the fp32 dense model: token perplexity on 2×2048-token windows of WikiText-2 (``cachepath.token_perplexity``)
  and next-token log-probabilities on a 512-token probe window (the reference for everything below);
* per half dtype: the dense model loaded straight in that dtype (its own half-precision error: mean
  next-token KL to fp32 and max |Δ log-prob| on the probe); full rank compressed in that dtype (must
  stay within the dense half model's own error); 50% rank with the model's recipe (token perplexity
  vs the fp32 compression with the same recipe, target within 1%), then save → load → generate;
* with ``--ablate-balance``, ablations at 50% in the half dtype: the same maps with the q/k projection
  in the model dtype instead of fp32 (``kernels.PROJECTION_DTYPE = None``); and unbalanced maps (the
  closed form's raw √N / 1/√N rows) with the projection in the model dtype.

Calibration is the recipe's, with ``--calib-tokens`` fit tokens (a CPU budget); fp32 and the half
dtypes use the same text and settings.

    python eval/precision.py --gram-products smollm2-135m   # → gram_products-<model>.json, then --table

compares the fit statistics with per-forward products in float32 (summed in float64) against float64
products (``stats.PRODUCT_DTYPE``): the relative difference of the Grams, the logit error of the
rank-d/2 maps fitted from the float32-product Grams measured on the float64 ones (excess over the
optimum), and the 50% token perplexity of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lowrank_attn import LowrankAttnError, Recipe, compress, load_compressed, load_model, load_texts
from lowrank_attn import fit as fitmod
from lowrank_attn import prepare_calibration, save_compressed, token_windows
from lowrank_attn.cachepath import token_perplexity as token_ppl
from lowrank_attn.harness import REPO as ROOT
from lowrank_attn.harness import data_dir, git_commit, process_peak_mib
from lowrank_attn.heldout import logprob_kl
from lowrank_attn.heldout import next_token_logprobs as logprobs
from lowrank_attn.models import restorable
from lowrank_attn.runtime import kernels

OUT = ROOT / "eval" / "results" / "precision"
WIKI = data_dir() / "wikitext2-test.raw"
HALF = ("bfloat16", "float16")
PROMPT = "The old lighthouse keeper climbed the stairs and"


def vs_ref(ref: torch.Tensor, lp: torch.Tensor) -> dict:
    """Mean next-token KL(ref ‖ lp), max |Δ log-prob| over the tokens ref gives ≥ 1e-4, top-1 agreement."""
    kl = float(logprob_kl(ref, lp).mean())
    live = ref > math.log(1e-4)
    return {"kl": kl, "max_dlogp": float((ref - lp).abs()[live].max()),
            "top1_agree": float((ref.argmax(-1) == lp.argmax(-1)).float().mean())}


def peak_rss_gb() -> float:
    return process_peak_mib(None) / 1024


def generate(model, tok, n=16) -> str:
    dev = model.get_input_embeddings().weight.device
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(dev)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def half_dtype(name: str, dt: str, recipe, res: dict, ref, probe, ev, ablate_balance: bool, r: dict) -> None:
    """One half dtype into ``r``: the dense model in it, full rank, 50% rank vs the fp32 compression, save → load
    → generate, and (``ablate_balance``) the projection-dtype and balancing ablations."""
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
        old = kernels.PROJECTION_DTYPE
        if ablate_balance:
            kernels.PROJECTION_DTYPE = None
            try:
                r["ppl50_half_projection"] = token_ppl(lm.model, ev)
            finally:
                kernels.PROJECTION_DTYPE = old
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
        kernels.PROJECTION_DTYPE = None
        try:
            with restorable(lm.model):
                compress(lm, rec, calibration=cal, progress=False)
                maps = [b for n, b in lm.model.named_buffers() if n.endswith(("lowrank_q_map", "lowrank_k_map"))]
                r["unbalanced_map_abs_max"] = max(float(b.abs().max()) for b in maps)
                r["ppl50_unbalanced_half_projection"] = token_ppl(lm.model, ev)
        finally:
            fitmod.balance_maps = orig
            kernels.PROJECTION_DTYPE = old


def run_model(name: str, calib_tokens: int, ablate_balance: bool, dtypes, heldout: int | None = None) -> dict:
    t0 = time.time()
    recipe = Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml").replace(max_tokens=calib_tokens, heldout_tokens=heldout)
    res = {"model": name, "recipe": recipe.to_dict(), "calib_tokens": calib_tokens, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "device": "cpu", "commit": git_commit()}
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
        try:  # a model that cannot run in this dtype (gemma-3 overflows fp16) is recorded, not fatal
            half_dtype(name, dt, recipe, res, ref, probe, ev, ablate_balance, r)
        except LowrankAttnError as e:
            r["error"] = f"{type(e).__name__}: {e}"
        r["rss_gb"] = peak_rss_gb()
        print(json.dumps({dt: r}), flush=True)
    res["seconds"] = round(time.time() - t0)
    return res


def gram_products(name: str, calib_tokens: int) -> dict:
    import numpy as np

    from lowrank_attn import stats as gram_stats
    from lowrank_attn.runtime import adapters

    recipe = Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml").replace(max_tokens=calib_tokens)
    lm = load_model(name)
    ev = token_windows(lm.tokenizer, load_texts([str(WIKI)]), seq_len=2048, max_tokens=4096)
    layout = adapters.head_layout(lm.model)
    cal = prepare_calibration(lm, recipe, progress=False)
    key = (recipe.weighting, recipe.exact_window, recipe.exact_sink)
    stats, ppl, secs = {}, {}, {}
    for dt in (torch.float64, torch.float32):
        gram_stats.PRODUCT_DTYPE = dt
        cal.stats_cache.clear()
        t = time.time()
        stats[dt] = cal.stats(lm.model, *key[:2], False, key[2])
        secs[str(dt)] = round(time.time() - t, 1)
        with restorable(lm.model):
            compress(lm, recipe, calibration=cal, progress=False)
            ppl[str(dt)] = token_ppl(lm.model, ev)
    gram_stats.PRODUCT_DTYPE = torch.float64
    s64, s32 = stats[torch.float64], stats[torch.float32]
    rel, excess, conds = [], [], []
    r = layout.head_dim // 2
    for layer in range(layout.num_layers):
        gk64, gk32 = s64.key_gram_centred(layer), s32.key_gram_centred(layer)
        for j in range(layout.num_kv_heads):
            gq64, gq32 = s64.query_gram_group(layer, j), s32.query_gram_group(layer, j)
            rel.append(max(np.linalg.norm(gq32 - gq64) / np.linalg.norm(gq64), np.linalg.norm(gk32 - gk64) / np.linalg.norm(gk64)))
            lam = np.linalg.eigvalsh(gk64)
            conds.append(float(lam[-1] / max(lam[0], 1e-300)))
            f64 = fitmod.fit_head(gq64, gk64, ridge=recipe.ridge)
            f32 = fitmod.fit_head(gq32, gk32, ridge=recipe.ridge)
            e_opt = fitmod.logit_error(gq64, gk64, f64.q_map[:r], f64.k_map[:r])
            e_32 = fitmod.logit_error(gq64, gk64, f32.q_map[:r], f32.k_map[:r])
            excess.append((e_32 - e_opt) / max(e_opt, 1e-300))
    return {"model": name, "calib_tokens": calib_tokens, "heads": len(rel), "rank": r,
            "gram_rel_diff_max": float(max(rel)), "gram_rel_diff_median": float(np.median(rel)),
            "key_cond_median": float(np.median(conds)), "key_cond_max": float(max(conds)),
            "excess_error_max": float(max(excess)), "excess_error_median": float(np.median(excess)),
            "ppl50": ppl, "stats_seconds": secs}


def _f(x, fmt=".3f"):
    return "-" if x is None else format(x, fmt)


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.startswith("gram_products")]
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
            if "error" in r:  # the model cannot run in this dtype: what the tool said, in place of numbers
                dense = f"{f32['dense_ppl']:.3f} → {r['dense']['ppl']:.3f}" if "dense" in r else "-"
                lines.append(f"| {res['model']} | {dt} | {dense} | " + " | ".join(["-"] * 9) + f" | refused: {r['error']} |")
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
        lines.append(f"* {res['model']}: {res['calib_tokens']} fit + {res['recipe']['heldout_tokens']} held-out tokens "
                     f"(seq_len {res['recipe']['seq_len'] or 'default'}), "
                     f"{res.get('seconds', '?')} s, peak RSS {max(res[k]['rss_gb'] for k in ('float32', *HALF) if 'rss_gb' in res.get(k, {})):.2f} GB, "
                     f"torch {res['torch']} on {res['device']} ({res['threads']} threads)")
    grams = [json.loads(p.read_text()) for p in sorted(out.glob("gram_products-*.json"))]
    if grams:
        lines += ["", "## Gram products: float32 per forward (summed in float64) vs float64", "",
                  "`python eval/precision.py --gram-products NAME`. Relative difference of the (query, centred key) Grams, "
                  "max over KV heads; excess logit error of the rank-d/2 maps fitted from the float32-product Grams, "
                  "measured on the float64 Grams, relative to the optimum; 50% token perplexity with each.", "",
                  "| model | KV heads | key Gram condition (median / max) | Gram rel. diff (median / max) | "
                  "excess error (median / max) | 50% ppl fp64 products | 50% ppl fp32 products | statistics s (fp64 / fp32) |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in grams:
            p64, p32 = g["ppl50"]["torch.float64"], g["ppl50"]["torch.float32"]
            lines.append(f"| {g['model']} | {g['heads']} | {g['key_cond_median']:.1e} / {g['key_cond_max']:.1e} | "
                         f"{g['gram_rel_diff_median']:.1e} / {g['gram_rel_diff_max']:.1e} | "
                         f"{g['excess_error_median']:.1e} / {g['excess_error_max']:.1e} | {p64:.4f} | {p32:.4f} | "
                         f"{g['stats_seconds']['torch.float64']} / {g['stats_seconds']['torch.float32']} |")
    text = "\n".join(lines) + "\n"
    (out / "precision.md").write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--dtypes", default=",".join(HALF))
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--heldout", type=int, default=None, help="held-out tokens (default: the recipe's)")
    ap.add_argument("--ablate-balance", action="store_true", help="also the projection-dtype and balancing ablations")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--gram-products", metavar="MODEL")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.model:
        res = run_model(a.model, a.calib_tokens, a.ablate_balance, [d for d in a.dtypes.split(",") if d], a.heldout)
        (a.out / f"{a.model}.json").write_text(json.dumps(res, indent=1) + "\n")
    if a.gram_products:
        res = gram_products(a.gram_products, a.calib_tokens)
        (a.out / f"gram_products-{a.gram_products}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res))
    if a.table or not (a.model or a.gram_products):
        print(table(a.out))


if __name__ == "__main__":
    main()
