"""Where the prefill time goes: torch.profiler per op, dense vs compressed, one prompt length and dtype.

    python eval/profile_prefill.py --model smollm2-135m --dtype bfloat16 --length 2048
    python eval/profile_prefill.py --model smollm2-135m --dtype float32 --length 4096 --set k_bits=4 v_bits=4

Compresses with the defaults (plus ``--set`` overrides; calibration shortened to ``--calib-tokens``: the maps'
values do not change the time), then profiles one prefill of ``--length`` random tokens through the cache for the
dense and the compressed model, interleaved, after one warm-up each. Writes the top ops by self CPU time of each
to eval/results/bench/profile-MODEL-DTYPE-LENGTH.md with the machine, threads and commit; the ratio of the two
wall times is measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from lowrank_attn.harness import REPO, git_commit

OUT = REPO / "eval" / "results" / "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import yaml
    from torch.profiler import ProfilerActivity, profile

    from lowrank_attn import Recipe, compress, load_model

    over = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    dense = load_model(args.model, dtype=args.dtype)
    comp, _ = compress(load_model(args.model, dtype=args.dtype),
                       Recipe(model=args.model, dtype=args.dtype, max_tokens=args.calib_tokens, heldout_tokens=2048,
                              **over), progress=False)
    ids = torch.randint(100, 10000, (1, args.length))
    models = {"dense": dense.model, "compressed": comp.model}
    walls, tables = {}, {}
    with torch.inference_mode():
        for name, m in models.items():
            m(input_ids=ids[:, :256], use_cache=True)  # warm-up
        for name, m in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                m(input_ids=ids, use_cache=True)
                walls[name] = time.perf_counter() - t0
            tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    commit = git_commit()
    text = [f"# Prefill profile: {args.model}, {args.dtype}, {args.length} tokens", "",
            f"machine {platform.machine()} ({os.cpu_count()} cpus), torch threads {torch.get_num_threads()}, commit "
            f"{commit}, recipe overrides {over or 'none'}; one prefill each under the profiler (its overhead included).",
            "", f"wall: dense {walls['dense']:.2f} s, compressed {walls['compressed']:.2f} s "
            f"(**{walls['compressed'] / walls['dense']:.2f}× dense**)", ""]
    for name in models:
        text += [f"## {name}", "", "```", tables[name], "```", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"profile-{args.model}-{args.dtype}-{args.length}.md"
    path.write_text("\n".join(text))
    print("\n".join(text[:6]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
