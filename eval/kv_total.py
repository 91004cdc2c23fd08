"""The whole KV cache: quality against total K+V bytes, ours beside what users already have.

    python eval/kv_total.py --model smollm2-135m                  # resumable: eval/results/kv/MODEL.jsonl
    python eval/kv_total.py --model qwen2.5-0.5b --points ours-k50,quanto-4bit
    python eval/kv_total.py --model qwen2.5-0.5b --points ours-default --redo ours-default   # after a default changed
    python eval/kv_total.py --table                                # eval/results/kv/README.md + plot

Every method is measured through the cache (``lowrank_attn.cachepath``): each 2048-token held-out window is fed
in 512-token chunks through one cache object, so every token after the first chunk attends to what the method
stored — our low-rank/quantised cache, transformers' ``QuantizedCache`` (quanto/HQQ, its defaults: groups of 64,
128-token residual; ``-kivi``: quanto with keys per channel, ``axis_key=-1``), or the dense ``DynamicCache``. Bytes are measured from that cache's tensors after the
2048-token window (codes, scales, zero-points, exact windows and sinks included; floats at 2 bytes, a bf16 cache)
against the dense bf16 cache: for ``QuantizedCache`` just after a re-quantisation (each 512-token chunk
fills its residual), its smallest; between re-quantisations it holds up to 127 more tokens in full precision
(up to +6.2% of the dense cache at 2048 tokens). Ours also reports the single-forward perplexity (what a prefill sees).

Held-out text (never calibrated on; ``lowrank_attn.harness.HELD_TEXTS``): the first 2×2047 tokens of WikiText-2
test (``wiki``) and 2×2047 tokens of Dracula from token 60000 (``dracula``); each window starts with BOS where the
tokenizer adds one. One calibration per model (the defaults: built-in Gutenberg sample, 2048-token windows) shared
by every point of ours. Rows: ``lowrank_attn.harness.ResultsStore`` (a rerun skips the points already in the file).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lowrank_attn.harness import HELD_TEXTS, REPO, ResultsStore, held_windows, stamp

OUT = REPO / "eval" / "results" / "kv"
LENGTH, WINDOWS, CHUNK = 2048, 2, 512

# ours: recipe overrides on the model's defaults (k = key rank ratio and bits, v = value rank ratio and bits)
KIVI = dict(fit="think", policy="uniform", weighting="none", exact_window=64, exact_sink=0, rank_ratio=1.0,
            v_rotation="none", k_clip="minmax", v_clip="minmax")
# every point states its key rank and both bit widths (16 = not quantised): the recipe defaults changed under them
OURS = {
    "ours-default": dict(),  # the recipe defaults of the commit that measured it
    # points measured before values were rotated by default say so (v_rotation none), so a rerun means the same
    "ours-k50": dict(rank_ratio=0.5, k_bits=16, v_bits=16, v_rotation="none"),
    "ours-k50-v4": dict(rank_ratio=0.5, k_bits=16, v_bits=4, v_rotation="none"),
    "ours-k50-v50": dict(rank_ratio=0.5, k_bits=16, v_bits=16, v_rank_ratio=0.5, v_rotation="none"),
    "ours-k50-v50v4": dict(rank_ratio=0.5, k_bits=16, v_rank_ratio=0.5, v_bits=4, v_rotation="none"),
    "ours-k75k4-v4": dict(rank_ratio=0.75, k_bits=4, v_bits=4, v_rotation="none"),
    "ours-k75k4-v75v4": dict(rank_ratio=0.75, k_bits=4, v_rank_ratio=0.75, v_bits=4, v_rotation="none"),
    "ours-k75k4-v50v4": dict(rank_ratio=0.75, k_bits=4, v_rank_ratio=0.5, v_bits=4, v_rotation="none"),
    "ours-k50k4-v50v4": dict(rank_ratio=0.5, k_bits=4, v_rank_ratio=0.5, v_bits=4, v_rotation="none"),
    "ours-k50k4-v4": dict(rank_ratio=0.5, k_bits=4, v_bits=4, v_rotation="none"),
    "ours-k50k4-v3": dict(rank_ratio=0.5, k_bits=4, v_bits=3, v_rotation="none"),
    "ours-k50k4-v2": dict(rank_ratio=0.5, k_bits=4, v_bits=2, v_rotation="none"),
    "ours-k75k4-v3": dict(rank_ratio=0.75, k_bits=4, v_bits=3, v_rotation="none"),
    "ours-k75k4-v4w128": dict(rank_ratio=0.75, k_bits=4, v_bits=4, v_window=128, v_rotation="none"),
    # scales and zero-points per 64 tokens (keys) / 64 channels (values), as QuantizedCache's default groups
    "ours-k75k4-v4-g64": dict(rank_ratio=0.75, k_bits=4, v_bits=4, k_group=64, v_group=64, v_rotation="none"),
    "ours-k50k4-v4-g64": dict(rank_ratio=0.5, k_bits=4, v_bits=4, k_group=64, v_group=64, v_rotation="none"),
    "ours-k75k4-v3-g64": dict(rank_ratio=0.75, k_bits=4, v_bits=3, k_group=64, v_group=64, v_rotation="none"),
    "ours-k50k4-v3-g64": dict(rank_ratio=0.5, k_bits=4, v_bits=3, k_group=64, v_group=64, v_rotation="none"),
    "ours-k50-g64": dict(rank_ratio=0.5, k_bits=4, v_bits=4, k_group=64, v_group=64),  # values rotated (default)
    # the fidelity policy: the fewest K+V bytes within a held-out next-token KL (key budget x value width)
    "ours-kl01": dict(policy="fidelity", max_kl=0.01, k_bits=4, v_bits=[3, 4], v_rotation="none"),
    "ours-kl02": dict(policy="fidelity", max_kl=0.02, k_bits=4, v_bits=[3, 4], v_rotation="none"),
    "ours-kl04": dict(policy="fidelity", max_kl=0.04, k_bits=4, v_bits=[3, 4], v_rotation="none"),
    # the byte target: the lowest held-out KL within 18.5% of the bf16 K+V bytes at the serving length (~20% at 4096)
    "ours-kv0185": dict(policy="fidelity", max_kv_fraction=0.185, v_bits=[3, 4], k_group=64, v_group=64),
    # served as checkpoints serve by default (prefill exact): each chunk attends its own tokens exactly, as
    # QuantizedCache runs; the other points set prefill compressed
    "ours-default-exact": dict(prefill="exact"),
    "ours-k50-g64-exact": dict(rank_ratio=0.5, k_bits=4, v_bits=4, k_group=64, v_group=64, prefill="exact"),
    "ours-kv0185-exact": dict(policy="fidelity", max_kv_fraction=0.185, v_bits=[3, 4], k_group=64, v_group=64,
                              prefill="exact"),
    # 2-bit values among the widths (the value band showed value error far smaller than measured before)
    "ours-kv0185-v234-exact": dict(policy="fidelity", max_kv_fraction=0.185, v_bits=[2, 3, 4], k_group=64, v_group=64,
                                   prefill="exact"),
    # quantisation ranges shrunk to the least squared error (k_clip / v_clip "mse"; the defaults and earlier rows: minmax)
    "ours-kv0185-exact-kvmse": dict(policy="fidelity", max_kv_fraction=0.185, v_bits=[3, 4], k_group=64, v_group=64,
                                    prefill="exact", k_clip="mse", v_clip="mse"),
    "ours-default-exact-kvmse": dict(prefill="exact", k_clip="mse", v_clip="mse"),
    "ours-kv0185-exact-vmse": dict(policy="fidelity", max_kv_fraction=0.185, v_bits=[3, 4], k_group=64, v_group=64,
                                   prefill="exact", v_clip="mse"),
    "ours-default-exact-vmse": dict(prefill="exact", v_clip="mse"),
    # 3-bit keys at a wider key budget, the same key bits per token as 4-bit keys at a narrower one
    "ours-k50k3-v3-g64-exact": dict(rank_ratio=0.5, k_bits=3, v_bits=3, k_group=64, v_group=64, prefill="exact"),
    "ours-k62k3-v3-g64-exact": dict(rank_ratio=0.625, k_bits=3, v_bits=3, k_group=64, v_group=64, prefill="exact"),
    "ours-k50k4-v3-g64-exact": dict(rank_ratio=0.5, k_bits=4, v_bits=3, k_group=64, v_group=64, prefill="exact"),
    "ours-k37k4-v3-g64-exact": dict(rank_ratio=0.375, k_bits=4, v_bits=3, k_group=64, v_group=64, prefill="exact"),
    "kivi-4bit": dict(KIVI, k_bits=4, v_bits=4),
    "kivi-2bit": dict(KIVI, k_bits=2, v_bits=2),
}
DEFAULT_POINTS = ["dense", "ours-default-exact", "ours-default", "ours-k50k4-v4-g64", "ours-k50k4-v3-g64", "kivi-4bit", "quanto-4bit", "quanto-2bit",
                  "hqq-4bit", "quanto-4bit-kivi", "quanto-2bit-kivi"]


def evaluate_point(model, windows: dict, factory=None, single: bool = False) -> dict:
    """Cache-path (and optionally single-forward) token perplexity per text, and the K/V bytes per token after one
    window through the cache (``lowrank_attn.cachepath``: the code ``lowrank-attn eval --task cache-ppl`` runs)."""
    from lowrank_attn.cachepath import cache_perplexity, token_perplexity

    row = {"ppl_cache": {}, "ppl_single": {} if single else None}
    for name, wins in windows.items():
        res = cache_perplexity(model, wins, chunk=CHUNK, cache_factory=factory)
        row["ppl_cache"][name] = res["token_perplexity"]
        row["bytes_per_token"] = res["bytes_per_token"]
        if single:
            row["ppl_single"][name] = token_perplexity(model, wins)
    return row


KEY = ("method", "dtype")  # a row per point and dtype in each model's file; the latest one counts


def measure(args) -> None:
    from lowrank_attn import Recipe, compress, load_model, prepare_calibration, set_prefill
    from lowrank_attn.models import restorable
    from lowrank_attn.peers import PEERS, make_cache

    points = args.points.split(",") if args.points else DEFAULT_POINTS
    unknown = [p for p in points if p not in OURS and p not in PEERS and p != "dense"]
    if unknown:
        raise SystemExit(f"unknown points {unknown}; known: dense, {', '.join(OURS)}, {', '.join(PEERS)}")
    store = ResultsStore(args.out or OUT / f"{args.model}.jsonl", KEY)
    done = store.latest()
    lm = load_model(args.model, dtype=args.dtype)
    windows = {t: held_windows(lm.tokenizer, t, LENGTH, WINDOWS) for t in HELD_TEXTS}
    recipe = Recipe(model=args.model, dtype=args.dtype)
    cal = None
    redo = set(args.redo.split(",")) if args.redo else set()
    for point in points:
        # measured in this dtype, and for our points with the recipe OURS gives it now (else measured again)
        if point not in redo and store.done((point, args.dtype), latest=done,
                                            when=lambda r, p=point: p not in OURS or r.get("recipe") == OURS[p]):
            continue
        t0 = time.time()
        row = {"model": args.model, "dtype": args.dtype, "method": point, **stamp()}
        if point == "dense":
            row.update(evaluate_point(lm.model, windows))
        elif point in PEERS:
            row.update(evaluate_point(lm.model, windows, factory=lambda m, p=point: make_cache(p, m)))
        else:
            rec = recipe.replace(**{k: v for k, v in OURS[point].items() if k != "prefill"})
            cal = cal or prepare_calibration(lm, rec, progress=False)
            with restorable(lm.model):
                lm2, report = compress(lm, rec, calibration=cal, progress=False)
                set_prefill(lm2.model, OURS[point].get("prefill", "compressed"))
                row.update(evaluate_point(lm2.model, windows, single=True), recipe=OURS[point],
                           summary=report["summary"])
                if "v_bits" in report["allocation"]:  # the fidelity policy's choice
                    row["chosen"] = {k: report["allocation"][k] for k in ("rank_ratio", "v_bits", "kl", "probes")}
        row["seconds"] = round(time.time() - t0, 1)
        store.append(row)
        print(point, json.dumps({k: row[k] for k in ("ppl_cache", "bytes_per_token")}), f"{row['seconds']:.0f}s",
              flush=True)


def _mean_change(row: dict, dense: dict, key: str = "ppl_cache") -> float:
    vals = row.get(key)
    if not vals:
        return float("nan")
    return sum(100 * (vals[t] / dense["ppl_cache"][t] - 1) for t in vals) / len(vals)


def table() -> None:
    # the latest row per method (a point re-measured after the defaults changed supersedes the earlier row)
    rows = [r for f in sorted(OUT.glob("*.jsonl")) if not f.name.startswith("fidelity-")
            for r in ResultsStore(f, KEY).latest().values()]
    dense = {(r["model"], r["dtype"]): r for r in rows if r["method"] == "dense"}
    out = ["# The whole KV cache: quality vs total K+V bytes", "",
           "Regenerate: `python eval/kv_total.py --model MODEL`, then `python eval/kv_total.py --table`. "
           + "Every method " + " ".join(__doc__.split("Every method", 1)[1].split("\n\n")[0].split()).replace("``", "`"), "",
           "`cache Δppl`: token perplexity through the cache (512-token chunks) vs dense through its own cache; "
           "`prefill Δppl`: one forward per window (ours only). `KV`: total bytes vs the dense bf16 cache, "
           "K and V shown separately (each vs its own dense half). `-exact` points: how a checkpoint serves by default "
           "(`prefill: exact`), each chunk attends its own tokens densely and the cached ones as stored (how "
           "`QuantizedCache` runs; the same cache), so their prefill Δppl is dense's; the other `ours` points ran "
           "with `set_prefill(model, \"compressed\")`, every token over what the cache stores (rows before fb587c5: "
           "each chunk's rows read its recent values quantised, where a decode step reads its last v_window exact; "
           "NOTES.md).", ""]
    chart = []
    for (model, dtype), d in sorted(dense.items()):
        db = d["bytes_per_token"]
        out += [f"## {model} ({dtype})", "",
                "| method | cache Δppl (mean) | wiki | dracula | prefill Δppl | KV bytes | K | V | commit |",
                "|---|---|---|---|---|---|---|---|---|",
                f"| dense | 0 | {d['ppl_cache']['wiki']:.2f} | {d['ppl_cache']['dracula']:.2f} | - | 100% | 100% | 100% "
                f"| {d['commit']} |"]
        body = [r for r in rows if (r["model"], r["dtype"]) == (model, dtype) and r["method"] != "dense"]
        for r in sorted(body, key=lambda r: r["bytes_per_token"]["total"]):
            b = r["bytes_per_token"]
            ch = _mean_change(r, d)
            cells = " | ".join(f"{r['ppl_cache'][t]:.2f} ({100 * (r['ppl_cache'][t] / d['ppl_cache'][t] - 1):+.1f}%)"
                               for t in ("wiki", "dracula"))
            single = _mean_change(r, d, "ppl_single")
            label = r["method"] + (f" (key budget {r['chosen']['rank_ratio']:g}, {r['chosen']['v_bits']}-bit values)"
                                   if r.get("chosen") else "")
            out.append(f"| {label} | {ch:+.2f}% | {cells} | {'-' if single != single else f'{single:+.2f}%'} | "
                       f"{b['total'] / db['total']:.1%} | {b['k'] / db['k']:.1%} | {b['v'] / db['v']:.1%} | {r['commit']} |")
            chart.append((model, r["method"], b["total"] / db["total"], ch))
        out.append("")
    text = "\n".join(out) + "\n"
    (OUT / "README.md").write_text(text)
    print(text)
    _plot(chart)


def _plot(chart) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({c[0] for c in chart})
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        for model, method, kb, ch in chart:
            if model != m:
                continue
            style = "o" if method.startswith("ours") else "s" if method.startswith("kivi") else "^"
            ax.plot(100 * kb, ch, style)
            ax.annotate(method, (100 * kb, ch), fontsize=6)
        ax.set(title=m, xlabel="total KV bytes vs bf16 dense (%)", ylabel="cache-path ppl change (%)", yscale="symlog")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "ppl_vs_kv_bytes.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--points", help=f"comma-separated (default: {','.join(DEFAULT_POINTS)})")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", help="default eval/results/kv/MODEL.jsonl")
    ap.add_argument("--redo", help="comma-separated points to measure again (e.g. ours-default after a default changed)")
    ap.add_argument("--table", action="store_true", help="only tabulate the committed results")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    table() if args.table else measure(args)


if __name__ == "__main__":
    main()
