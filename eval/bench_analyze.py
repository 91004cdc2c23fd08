"""Benchmark of `analyze`'s statistics pass (calibrate + GramStats) against a plain forward.

  python eval/bench_analyze.py                       # SmolLM2-135M, 32k Gutenberg tokens, 3 repeats
  python eval/bench_analyze.py --tokens 8192 --repeats 1 --rss-tokens   # quick look

Time: the same windows go through (a) a plain forward (torch.inference_mode, use_cache=False)
and (b) ``analyze.collect_grams`` (the attention hook + float64 Gram accumulation). The two
are interleaved chunk by chunk, alternating which goes first, so a busy machine slows both
alike; each repeat gives a ratio (b)/(a); min and median over repeats are reported.
``--breakdown`` adds (c) the hook with a no-op callback, separating the cost of the hook
from the cost of the accumulation.

Memory: for each of ``--rss-tokens`` a fresh subprocess loads the model, cuts the windows,
resets the peak-RSS counter (/proc/self/clear_refs) and runs the statistics pass; it reports
the peak RSS of the pass (VmHWM) and of the whole process (ru_maxrss). Memory that does not
grow with tokens shows as equal peaks.

Writes JSON to --out (default runs/bench_analyze.json) and prints a small table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.harness import (  # noqa: E402
    REPO, ChildFailed, PeakRSS, data_dir, git_commit, host_info, process_peak_mib, run_child, time_interleaved,
)

DEFAULT_TEXTS = str(data_dir() / "gutenberg-*.txt")


def _windows(lm, texts_glob: str, seq_len: int, tokens: int):
    import glob

    from lowrank_attn.texts import load_texts, token_windows

    files = sorted(glob.glob(texts_glob))
    if not files:
        sys.exit(f"no text files match {texts_glob}")
    windows = token_windows(lm.tokenizer, load_texts(files), seq_len=seq_len, max_tokens=tokens)
    n = sum(len(w.input_ids) for w in windows)
    if n < tokens:
        print(f"warning: only {n} tokens of text available (asked for {tokens})", file=sys.stderr)
    return windows, n, [Path(f).name for f in files]


def _plain(model, windows) -> None:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        for w in windows:
            model(input_ids=w.input_ids[None].to(device), use_cache=False)


def _hook_only(model, windows) -> None:
    import torch

    from lowrank_attn.calibrate import attention_hook

    device = next(model.parameters()).device
    with attention_hook(model, lambda *a: None), torch.inference_mode():
        for w in windows:
            model(input_ids=w.input_ids[None].to(device), use_cache=False)


_ADD_SECONDS = [0.0]  # wall time spent inside GramStats.add (the float64 accumulation)


def _grams(model, windows) -> None:
    """collect_grams, with the time inside GramStats.add summed into _ADD_SECONDS: a measure of
    the accumulation's cost taken within the same pass, so a busy machine cannot bias it
    (on a GPU it would also absorb waiting for the forward's kernels; CPU only)."""
    from lowrank_attn.analysis import collect_grams
    from lowrank_attn.calibrate import GramStats

    original = GramStats.add

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _ADD_SECONDS[0] += time.perf_counter() - t0

    GramStats.add = timed
    try:
        collect_grams(model, windows, progress=False)
    finally:
        GramStats.add = original


def time_passes(lm, windows, *, repeats: int, chunk: int, breakdown: bool) -> dict:
    variants = {"plain": _plain, "statistics": _grams}
    if breakdown:
        variants["hook_only"] = _hook_only
    model = lm.model
    _plain(model, windows[:1])  # warm-up (allocator, kernels)
    _grams(model, windows[:1])
    chunks = [windows[i : i + chunk] for i in range(0, len(windows), chunk)]
    runs = []
    for r in range(repeats):
        totals = {k: 0.0 for k in variants}
        _ADD_SECONDS[0] = 0.0
        for c, part in enumerate(chunks):
            t, _ = time_interleaved({k: (lambda x, f=f: f(model, x)) for k, f in variants.items()}, part,
                                    flip=(r + c) % 2 == 1, model=model)
            for name, v in t.items():
                totals[name] += v
        runs.append({**{f"{k}_s": round(v, 3) for k, v in totals.items()},
                     "ratio": round(totals["statistics"] / totals["plain"], 4),
                     "accumulate_s": round(_ADD_SECONDS[0], 3),
                     "accumulate_share": round(_ADD_SECONDS[0] / totals["statistics"], 4),
                     **({"hook_only_ratio": round(totals["hook_only"] / totals["plain"], 4)} if breakdown else {})})
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k}={v}" for k, v in runs[-1].items()), flush=True)
    ratios = [x["ratio"] for x in runs]
    out = {"runs": runs, "ratio_min": min(ratios), "ratio_median": statistics.median(ratios)}
    shares = [x["accumulate_share"] for x in runs]
    out["accumulate_share_min"], out["accumulate_share_median"] = min(shares), statistics.median(shares)
    for k in variants:
        vals = [x[f"{k}_s"] for x in runs]
        out[f"{k}_s_min"], out[f"{k}_s_median"] = min(vals), statistics.median(vals)
    if breakdown:
        hr = [x["hook_only_ratio"] for x in runs]
        out["hook_only_ratio_min"], out["hook_only_ratio_median"] = min(hr), statistics.median(hr)
    return out


def rss_child(args) -> None:
    """Run in a fresh process: one statistics pass over ``args.rss_child`` tokens; print JSON."""
    from lowrank_attn.analysis import collect_grams
    from lowrank_attn.models import load_model

    lm = load_model(args.model, device=args.device)
    windows, n, _ = _windows(lm, args.texts, args.seq_len, args.rss_child)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if args.rss_mode == "plain":
            _plain(lm.model, windows)
            stats = {}
        else:
            stats = collect_grams(lm.model, windows, progress=False)
        elapsed = time.perf_counter() - t0
    stats_bytes = sum(getattr(s, a).nbytes for s in stats.values() for a in ("gq", "skk", "sk", "n", "scale"))
    print(json.dumps({
        "pass": args.rss_mode, "tokens": n, "windows": len(windows), "seconds": round(elapsed, 2),
        "rss_before_pass_mib": round(mem.rss_before_kib / 1024, 1) if mem.rss_before_kib else None,
        "pass_peak_rss_mib": mem.peak_mib(),
        "process_peak_rss_mib": process_peak_mib(),
        "gram_stats_mib": round(stats_bytes / 2**20, 2), "texts": len(stats),
    }))


def measure_rss(args, tokens: int, mode: str = "statistics") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(tokens), "--rss-mode", mode,
           "--model", args.model,
           "--texts", args.texts, "--seq-len", str(args.seq_len), "--device", args.device]
    try:
        return run_child(cmd)
    except ChildFailed as e:
        raise RuntimeError(f"RSS child for {tokens} tokens failed:\n{e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", default=DEFAULT_TEXTS, help="glob of text files (default: shared Gutenberg novels)")
    p.add_argument("--tokens", type=int, default=32768, help="tokens for the timing comparison (>= 32k by default)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=4, help="windows per interleaved chunk")
    p.add_argument("--breakdown", action="store_true", help="also time the hook with a no-op callback")
    p.add_argument("--rss-tokens", type=int, nargs="*", default=[8192, 65536],
                   help="token counts for the peak-RSS runs (each in a fresh process); none to skip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_analyze.json"))
    p.add_argument("--no-rss-baseline", action="store_true",
                   help="skip the plain-forward peak-RSS baseline (at the smallest --rss-tokens)")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-mode", choices=["statistics", "plain"], default="statistics", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.rss_child is not None:
        rss_child(args)
        return 0

    import torch

    from lowrank_attn.models import load_model

    result: dict = {
        "model": args.model, "seq_len": args.seq_len, "device": args.device, "commit": git_commit(),
        "host_start": host_info(),
    }
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    result["load_s"] = round(time.perf_counter() - t0, 2)
    windows, n, files = _windows(lm, args.texts, args.seq_len, args.tokens)
    result.update(tokens=n, windows=len(windows), texts=files)
    print(f"timing: {n} tokens in {len(windows)} windows of {args.seq_len}, {args.repeats} repeats, "
          f"interleaved in chunks of {args.chunk} windows", flush=True)
    result["timing"] = time_passes(lm, windows, repeats=args.repeats, chunk=args.chunk, breakdown=args.breakdown)
    del lm, windows

    result["rss"] = []
    runs = [(tok, "statistics") for tok in args.rss_tokens or []]
    if runs and not args.no_rss_baseline:
        runs.insert(0, (min(args.rss_tokens), "plain"))
    for tok, mode in runs:
        print(f"peak RSS: {mode} pass over {tok} tokens in a fresh process …", flush=True)
        result["rss"].append(measure_rss(args, tok, mode))
        print(f"  {result['rss'][-1]}", flush=True)
    result["host_end"] = host_info()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    t = result["timing"]
    print()
    print(f"| {args.model}, {n} tokens | min | median |")
    print("|---|---|---|")
    print(f"| plain forward (s) | {t['plain_s_min']:.1f} | {t['plain_s_median']:.1f} |")
    print(f"| statistics pass (s) | {t['statistics_s_min']:.1f} | {t['statistics_s_median']:.1f} |")
    if "hook_only_s_min" in t:
        print(f"| hook only, no-op (s) | {t['hook_only_s_min']:.1f} | {t['hook_only_s_median']:.1f} |")
        print(f"| hook only ÷ plain | {t['hook_only_ratio_min']:.3f} | {t['hook_only_ratio_median']:.3f} |")
    print(f"| statistics ÷ plain | {t['ratio_min']:.3f} | {t['ratio_median']:.3f} |")
    print(f"| share of the statistics pass in GramStats.add | {t['accumulate_share_min']:.3f} | "
          f"{t['accumulate_share_median']:.3f} |")
    if result["rss"]:
        print()
        print("| pass | tokens | peak RSS of the pass (MiB) | process peak RSS (MiB) | RSS before pass (MiB) | Gram stats (MiB) |")
        print("|---|---|---|---|---|---|")
        for r in result["rss"]:
            print(f"| {r['pass']} | {r['tokens']} | {r['pass_peak_rss_mib']} | {r['process_peak_rss_mib']} | "
                  f"{r['rss_before_pass_mib']} | {r['gram_stats_mib']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
