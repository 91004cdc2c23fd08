"""Benchmark of `compress`'s calibration against a plain forward, and of its stages.

  python eval/bench_calibrate.py                       # SmolLM2-135M, 32k Gutenberg tokens in 2048 windows + one compress
  python eval/bench_calibrate.py --tokens 8192 --no-compress   # quick look at the statistics pass only
  python eval/bench_calibrate.py --profile             # also cProfile the compress run (top functions in the JSON)

1. Statistics pass ÷ plain forward. The same windows (the recipe's 2048 tokens) go through
   (a) a plain forward (torch.inference_mode, use_cache=False, logits for every position — what a user
   calls "a forward"), (b) the same forward with ``logits_to_keep=1`` (the LM head on the last position
   only, which is what the statistics pass runs), and (c) the statistics pass of ``compress``:
   ``calibrate.run_hooked`` with ``FitStats(weighting='attention', window=64)`` — the attention-weighted
   float64 moments the fit uses. They are interleaved chunk by chunk (``--chunk`` windows), alternating
   the order, so a machine busy with other jobs slows them alike. Ratios (c)/(a) and (c)/(b) are given
   for the whole pass and per chunk (min / median over chunks and repeats). The time inside
   ``FitStats._attention_weights`` is summed separately (its share of the pass).

2. Stages of one ``compress`` run (recipe ``--recipe`` with ``--rank-ratio``), timed by wrapping the
   module functions: ``prepare_calibration`` (tokenising, the held-out sample), ``Calibration.stats``
   (the statistics pass), ``fit_all`` (the closed-form fits), ``allocate`` (rank allocation; the
   output-driven budget measures 8 ranks per layer on held-out tokens), the certificates
   (``head_certificate``). Fit time is reported as a fraction of calibration (prepare + stats).

Writes JSON to --out (default eval/results/bench/calibrate.json) and prints tables.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.harness import REPO, data_dir, git_commit, host_info, time_interleaved  # noqa: E402

DEFAULT_TEXTS = str(data_dir() / "gutenberg-*.txt")


class Timer:
    """Wrap ``owner.name`` so that the wall time of every call is summed into ``self.seconds``."""

    def __init__(self, owner, name):
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, 0
        self.original = getattr(owner, name)

    def __enter__(self):
        original = self.original

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        setattr(self.owner, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)


def _forward(model, windows, **kw) -> None:
    import torch

    with torch.inference_mode():
        for w in windows:
            model(input_ids=w.input_ids[None], use_cache=False, **kw)


def time_statistics(lm, windows, *, repeats: int, chunk: int, window: int) -> dict:
    from lowrank_attn.runtime import adapters
    from lowrank_attn.calibrate import FitStats, run_hooked

    layout = adapters.head_layout(lm.model)
    model = lm.model

    def stats_pass(part):
        st = FitStats(layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim,
                      weighting="attention", window=window)
        run_hooked(model, part, st, "statistics", False, with_values=True)  # as compress runs it
        _ = st.gq  # the sums on the host, as compress reads them

    variants = {"plain": lambda part: _forward(model, part),
                "plain_last_logits": lambda part: _forward(model, part, logits_to_keep=1),
                "statistics": stats_pass}
    for f in variants.values():  # warm-up
        f(windows[:1])
    chunks = [windows[i : i + chunk] for i in range(0, len(windows), chunk)]
    runs, chunk_rows = [], []
    for r in range(repeats):
        totals = {k: 0.0 for k in variants}
        with Timer(FitStats, "_attention_weights") as aw:
            for c, part in enumerate(chunks):
                t, _ = time_interleaved(variants, part, flip=(r + c) % 2 == 1)
                for name, v in t.items():
                    totals[name] += v
                chunk_rows.append({"repeat": r, "chunk": c, **{f"{k}_s": round(v, 3) for k, v in t.items()},
                                   "ratio": round(t["statistics"] / t["plain"], 4),
                                   "ratio_vs_last_logits": round(t["statistics"] / t["plain_last_logits"], 4)})
                print(f"  repeat {r + 1} chunk {c + 1}/{len(chunks)}: " + ", ".join(f"{k}={v:.2f}s" for k, v in t.items())
                      + f", ratio {chunk_rows[-1]['ratio']:.3f}", flush=True)
        runs.append({**{f"{k}_s": round(v, 3) for k, v in totals.items()},
                     "ratio": round(totals["statistics"] / totals["plain"], 4),
                     "ratio_vs_last_logits": round(totals["statistics"] / totals["plain_last_logits"], 4),
                     "last_logits_vs_plain": round(totals["plain_last_logits"] / totals["plain"], 4),
                     "attention_weights_s": round(aw.seconds, 3),
                     "attention_weights_share": round(aw.seconds / totals["statistics"], 4)})
        print(f"  repeat {r + 1}: " + ", ".join(f"{k}={v}" for k, v in runs[-1].items()), flush=True)
    out = {"runs": runs, "chunks": chunk_rows}
    for key in ("ratio", "ratio_vs_last_logits"):
        whole = [x[key] for x in runs]
        per_chunk = [x[key] for x in chunk_rows]
        out[f"{key}_min"], out[f"{key}_median"] = min(whole), statistics.median(whole)
        out[f"{key}_chunk_min"], out[f"{key}_chunk_median"] = min(per_chunk), statistics.median(per_chunk)
    return out


def time_compress(args, lm) -> dict:
    from lowrank_attn import compression
    from lowrank_attn.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe).replace(rank_ratio=args.rank_ratio, text=[args.texts])
    if args.compress_tokens:
        recipe = recipe.replace(max_tokens=args.compress_tokens)
    prof = cProfile.Profile() if args.profile else None
    timers = [Timer(compression, "prepare_calibration"), Timer(compression.Calibration, "stats"),
              Timer(compression, "fit_all"), Timer(compression, "allocate"), Timer(compression, "head_certificate"),
              Timer(compression, "apply_lowrank")]
    for t in timers:
        t.__enter__()
    try:
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        _, report = compression.compress(lm, recipe, progress=False)
        if prof:
            prof.disable()
        total = time.perf_counter() - t0
    finally:
        for t in timers:
            t.__exit__()
    s = {t.name: round(t.seconds, 3) for t in timers}
    calibration = s["prepare_calibration"] + s["stats"]
    out = {"recipe": recipe.to_dict(), "fit_tokens": report["calibration"]["fit_tokens"],
           "heldout_tokens": report["calibration"]["heldout_tokens"], "total_s": round(total, 2), "stages_s": s,
           "calibration_s": round(calibration, 3),
           "fit_fraction_of_calibration": round(s["fit_all"] / calibration, 5),
           "allocate_fraction_of_calibration": round(s["allocate"] / calibration, 4),
           "certificate_fraction_of_calibration": round(s["head_certificate"] / calibration, 4),
           "summary": report["summary"]}
    if prof:
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("tottime").print_stats(15)
        out["profile_top_tottime"] = [
            {"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls": v[1], "tottime_s": round(v[2], 3),
             "cumtime_s": round(v[3], 3)}
            for k, v in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]]
        print(buf.getvalue())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-135m.yaml"))
    p.add_argument("--rank-ratio", type=float, default=0.5)
    p.add_argument("--texts", default=DEFAULT_TEXTS, help="glob of text files (default: shared Gutenberg novels)")
    p.add_argument("--tokens", type=int, default=32768, help="tokens for the statistics-pass timing")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--window", type=int, default=64, help="exact window of the attention weighting")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--chunk", type=int, default=2, help="windows per interleaved chunk")
    p.add_argument("--no-compress", action="store_true", help="skip the compress stage timing")
    p.add_argument("--compress-tokens", type=int, default=None, help="max_tokens of the compress run (default: the recipe's)")
    p.add_argument("--profile", action="store_true", help="cProfile the compress run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bench" / "calibrate.json"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from lowrank_attn.models import load_model
    from lowrank_attn.texts import load_texts, token_windows

    result: dict = {"benchmark": "calibrate", "model": args.model, "commit": git_commit(), "seq_len": args.seq_len,
                    "host_start": host_info()}
    lm = load_model(args.model)
    files = sorted(glob.glob(args.texts))
    windows = token_windows(lm.tokenizer, load_texts(files), seq_len=args.seq_len, max_tokens=args.tokens)
    n = sum(len(w.input_ids) for w in windows)
    result.update(tokens=n, windows=len(windows), texts=[Path(f).name for f in files])
    print(f"statistics pass: {n} tokens in {len(windows)} windows of {args.seq_len}, {args.repeats} repeat(s), "
          f"interleaved in chunks of {args.chunk} windows", flush=True)
    result["statistics"] = time_statistics(lm, windows, repeats=args.repeats, chunk=args.chunk, window=args.window)
    if not args.no_compress:
        print("compress, timed by stage …", flush=True)
        result["compress"] = time_compress(args, lm)
    result["host_end"] = host_info()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    t = result["statistics"]
    r0 = t["runs"][0]
    print()
    print(f"| {args.model}, {n} tokens, windows of {args.seq_len} | whole pass (min / median over repeats) | per chunk (min / median) |")
    print("|---|---|---|")
    print(f"| statistics ÷ plain forward | {t['ratio_min']:.3f} / {t['ratio_median']:.3f} | "
          f"{t['ratio_chunk_min']:.3f} / {t['ratio_chunk_median']:.3f} |")
    print(f"| statistics ÷ forward with last-position logits | {t['ratio_vs_last_logits_min']:.3f} / "
          f"{t['ratio_vs_last_logits_median']:.3f} | {t['ratio_vs_last_logits_chunk_min']:.3f} / "
          f"{t['ratio_vs_last_logits_chunk_median']:.3f} |")
    print(f"\nrepeat 1: plain {r0['plain_s']:.1f} s, last-position logits {r0['plain_last_logits_s']:.1f} s, statistics "
          f"{r0['statistics_s']:.1f} s (attention weights {r0['attention_weights_s']:.1f} s, "
          f"{100 * r0['attention_weights_share']:.0f}% of the pass)")
    if "compress" in result:
        c = result["compress"]
        print(f"\ncompress ({c['fit_tokens']} fit + {c['heldout_tokens']} held-out tokens): total {c['total_s']:.1f} s; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in c["stages_s"].items()))
        print(f"fit ÷ calibration = {c['fit_fraction_of_calibration']:.4f}; allocation ÷ calibration = "
              f"{c['allocate_fraction_of_calibration']:.3f}; certificates ÷ calibration = {c['certificate_fraction_of_calibration']:.3f}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
