"""Decode benchmark: dense SmolLM2-135M against its compressed checkpoints, side by side in one run.

  python eval/bench_decode.py                          # contexts 512, 2048; batch 1 and 8; 3 repeats
  python eval/bench_decode.py --long                   # adds context 8192 (batch 1 only by default)
  python eval/bench_decode.py --contexts 512 --batches 1 --repeats 1   # quick look
  python eval/bench_decode.py --modes ours-kv --remote-code runs/bench-v4/smollm2-135m-ours-kv-r0.75 …
                                                       # the same checkpoint run by this package and by the
                                                       # (older) runtime bundled in it: an A/B of the runtime
  python eval/bench_decode.py --model qwen2.5-0.5b --modes --checkpoint default=runs/qwen-default-rot \
      --peers quanto-4bit hqq-4bit …                   # an existing checkpoint beside transformers' QuantizedCache

For every context length T and batch size B, each model (dense, ``post-rope`` at 50% rank with the
recipe's exact window, ``rope-pairs`` at 50%) is measured on the same prompt:

* prefill: one forward over B=1 × T prompt tokens into a fresh ``DynamicCache``
  (``logits_to_keep=1``, as ``generate`` does); seconds per prompt token;
* peers (``--peers``): the dense model decoding through transformers' ``QuantizedCache`` (``lowrank_attn.peers``,
  quanto/HQQ at their defaults), what a user already has;
* K-cache bytes after the prefill, measured from the cache tensors (``cachepath.cache_bytes``),
  against the dense cache and against the prediction r̄/d_h + w·d_h/(T·d_h) (mean padded rank over
  d_h, plus the exact window);
* decode: ``--new-tokens`` greedy steps (one token per row per step) from a copy of the prefilled
  cache, the models in lockstep (one step of each in turn, the order alternating every step, so
  load from other jobs falls on all alike); tokens/s = B × new tokens / seconds spent in the steps. For B > 1 the B=1 cache is replicated B times
  (``batch_repeat_interleave``) — decode cost does not depend on the rows being different, and it
  saves B-1 prefills.

Prefills are interleaved (A B C, then C B A, …), decode steps in lockstep; min and median over
repeats are reported, and the ratios compressed/dense are taken per repeat (same machine state)
before the median. If the compressed decode is slower than
dense at short contexts, the crossover context (log-linear interpolation of the median speed ratio
between measured contexts) is reported.

Compressed checkpoints are made once (``compress`` with a small calibration, the speed and bytes
do not depend on its quality) and saved under ``--ckpt-dir`` (default ``runs/bench/``, gitignored).

Writes JSON to --out (default eval/results/bench/decode.json) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lowrank_attn.harness import REPO, data_dir, git_commit, host_info, sync, time_interleaved  # noqa: E402

DATA = data_dir()


def ensure_checkpoint(args, mode: str) -> Path:
    """A compressed checkpoint of ``mode`` at ``--rank-ratio`` (made and saved once)."""
    from lowrank_attn import Recipe, compress, save_compressed
    from lowrank_attn.models import load_model

    from lowrank_attn.sweep import METHODS, QUANT_ONLY

    ratio = 1.0 if mode in QUANT_ONLY else args.rank_ratio
    path = Path(args.ckpt_dir) / f"{args.model}-{mode}-r{ratio:g}"
    if (path / "lowrank_attn.json").is_file():
        return path
    recipe = Recipe.from_yaml(args.recipe).replace(rank_ratio=ratio, max_tokens=args.calib_tokens,
                                                   text=sorted(str(p) for p in DATA.glob("gutenberg-*.txt"))[:3])
    if mode == "rope-pairs":
        recipe = recipe.replace(mode="rope-pairs", exact_window=0)
    elif mode in METHODS or mode in QUANT_ONLY:  # a method of the sweep: its overrides on the recipe
        recipe = recipe.replace(**{**METHODS, **QUANT_ONLY}[mode])
    elif mode != "post-rope":
        sys.exit(f"unknown mode {mode!r}: post-rope, rope-pairs, or a sweep method ({', '.join([*METHODS, *QUANT_ONLY])})")
    print(f"making the {mode} checkpoint (once) → {path}", flush=True)
    t0 = time.perf_counter()
    lm, report = compress(load_model(args.model, device=args.device, dtype=args.dtype), recipe, progress=False)
    save_compressed(lm, report, path, overwrite=True)
    print(f"  compress {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def prompt_ids(tokenizer, ctx: int):
    from lowrank_attn.texts import load_texts, token_windows

    wins = token_windows(tokenizer, load_texts([str(DATA / "wikitext2-test.raw")]), seq_len=ctx, max_tokens=ctx)
    if len(wins[0].input_ids) < ctx:
        sys.exit(f"the prompt text has fewer than {ctx} tokens")
    return wins[0].input_ids[None]


def prefill(model, ids, cache_factory=None):
    import torch
    from transformers.cache_utils import DynamicCache

    cache = cache_factory(model) if cache_factory else DynamicCache(config=model.config)
    ids = ids.to(next(model.parameters()).device)
    with torch.inference_mode():
        sync(model)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(model)
        dt = time.perf_counter() - t0
    return out.logits[:, -1], out.past_key_values, dt


def decode_lockstep(models: dict, states: dict, steps: int, flip: bool) -> dict:
    """Greedy decode ``steps`` tokens per row with every model, in lockstep: one step of each model in
    turn (the order reversed every step, and overall by ``flip``), so load from other jobs on the
    machine falls on all models alike. Returns the seconds each model spent in its steps."""
    import torch

    names = list(models)[::-1] if flip else list(models)
    logits = {n: states[n][0] for n in names}
    caches = {n: states[n][1] for n in names}
    spent = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        for step in range(steps):
            for n in names if step % 2 == 0 else names[::-1]:
                nxt = logits[n].argmax(-1, keepdim=True)
                sync(models[n].model)
                t0 = time.perf_counter()
                logits[n] = models[n].model(input_ids=nxt, past_key_values=caches[n], use_cache=True).logits[:, -1]
                sync(models[n].model)
                spent[n] += time.perf_counter() - t0
    return spent


def predicted_key_ratio(lm, ctx: int) -> float | None:
    """Bytes of the compressed K cache over dense (same dtype), predicted from the plan: padded rank per
    layer for every position, plus the exact window (and exact sink keys) at full head dim; with k_bits,
    the projected keys older than the window in whole groups of k_group positions take k_bits each plus a
    (low, step) pair per group and channel in the cache dtype."""
    from lowrank_attn.runtime import adapters

    mods = adapters.attention_modules(lm.model)
    plans = [getattr(m, "lowrank_plan", None) for m in mods]
    if any(p is None for p in plans):
        return None
    d = adapters.head_layout(lm.model).head_dim
    es = next(lm.model.parameters()).element_size()
    per_layer = []
    for p in plans:
        bits, group = getattr(p, "k_bits", None), getattr(p, "k_group", 32)
        n_q = max(0, (ctx - p.window) // group * group) if bits else 0
        proj = p.r_max * (n_q * (bits / 8 + 2 * es / group) if bits else 0) + p.r_max * (ctx - n_q) * es
        exact = (min(p.window, ctx) + min(getattr(p, "sink", 0), ctx)) * d * es
        per_layer.append((proj + exact) / (d * ctx * es))
    return sum(per_layer) / len(per_layer)


def crossover(contexts, ratios) -> float | None:
    """Smallest context where the speed ratio (compressed/dense) crosses 1 upward, log-linear."""
    pts = sorted(zip(contexts, ratios))
    if pts and pts[0][1] >= 1:
        return None  # not slower at the shortest context measured
    for (c0, r0), (c1, r1) in zip(pts, pts[1:]):
        if r0 < 1 <= r1:
            f = (1 - r0) / (r1 - r0)
            return round(math.exp(math.log(c0) + f * (math.log(c1) - math.log(c0))))
    return float("inf")  # slower at every measured context


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-135m.yaml"))
    p.add_argument("--rank-ratio", type=float, default=0.5)
    p.add_argument("--modes", nargs="*", default=["post-rope", "rope-pairs"],
                   help="post-rope, rope-pairs (at --rank-ratio), or sweep methods: ours, ours+4bit, kivi-4bit, …")
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="NAME=DIR",
                   help="existing compressed checkpoints, loaded by this package")
    p.add_argument("--peers", nargs="+", default=[], metavar="PEER",
                   help="the dense model through transformers' QuantizedCache: quanto-4bit, quanto-2bit, hqq-4bit, "
                        "hqq-2bit, quanto-4bit-kivi, quanto-2bit-kivi (lowrank_attn.peers)")
    p.add_argument("--bf16-bytes", action="store_true", help="also print K-cache bytes against a bf16 dense cache "
                   "(always in the JSON: key_bytes_vs_bf16_dense)")
    p.add_argument("--remote-code", nargs="+", default=[], metavar="DIR",
                   help="checkpoints also loaded through transformers' trust_remote_code, i.e. run by the runtime "
                        "bundled in them (a checkpoint written by older code: an A/B of the runtime on one model)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--long", action="store_true", help="add context 8192 (batch 1 unless --long-batches)")
    p.add_argument("--long-batches", type=int, nargs="+", default=[1])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="decode repeats (each from a fresh copy of the prefilled cache)")
    p.add_argument("--prefill-repeats", type=int, default=2, help="prefill repeats at contexts ≤ 2048 (1 above)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens when a checkpoint must be made")
    p.add_argument("--ckpt-dir", default=str(REPO / "runs" / "bench"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, … (timed regions synchronise on CUDA)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bench" / "decode.json"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from lowrank_attn.cachepath import cache_bytes
    from lowrank_attn.checkpoint import load_compressed
    from lowrank_attn.models import load_model
    from lowrank_attn.peers import make_cache

    result: dict = {"benchmark": "decode", "model": args.model, "rank_ratio": args.rank_ratio, "commit": git_commit(),
                    "new_tokens": args.new_tokens, "repeats": args.repeats, "host_start": host_info()}
    ckpts = {m: ensure_checkpoint(args, m) for m in args.modes}
    for spec in args.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "lowrank_attn.json").is_file():
            sys.exit(f"--checkpoint {spec!r}: expected NAME=DIR with a compressed checkpoint in DIR")
        ckpts[name] = Path(path)
    models = {"dense": load_model(args.model, device=args.device, dtype=args.dtype)}
    for m, path in ckpts.items():
        models[m] = load_compressed(path, device=args.device, dtype=args.dtype)
    for d in args.remote_code:  # the runtime bundled in the checkpoint, not this package's
        from types import SimpleNamespace

        from transformers import AutoModelForCausalLM

        remote = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=getattr(torch, args.dtype))
        models[f"bundled:{Path(d).name}"] = SimpleNamespace(model=remote.to(args.device).eval())
        ckpts[f"bundled:{Path(d).name}"] = Path(d)
    factories = {}  # name → cache factory (None: a DynamicCache)
    for peer in args.peers:
        models[peer], factories[peer] = models["dense"], (lambda m, peer=peer: make_cache(peer, m))
        make_cache(peer, models["dense"].model)  # an uninstalled backend fails here, before any timing
    result["checkpoints"] = {m: str(p) for m, p in ckpts.items()}
    result["padded_rank_ratio"] = {
        m: (json.loads((p / "lowrank_attn.json").read_text()).get("summary") or {}).get("padded_rank_ratio")
        for m, p in ckpts.items()}
    names = list(models)
    configs = [(c, b) for c in args.contexts for b in args.batches]
    if args.long:
        configs += [(8192, b) for b in args.long_batches if (8192, b) not in configs]
    max_pos = getattr(models["dense"].model.config, "max_position_embeddings", None)
    rows = []
    for ctx in sorted({c for c, _ in configs}):
        prompt_len = ctx if max_pos is None or ctx + args.new_tokens <= max_pos else max_pos - args.new_tokens
        ids = prompt_ids(models["dense"].tokenizer, prompt_len)
        batches = [b for c, b in configs if c == ctx]
        n_pre = args.prefill_repeats if ctx <= 2048 else 1
        print(f"context {prompt_len}: prefill ×{n_pre}, decode {args.new_tokens} tokens × batches {batches} "
              f"× {args.repeats} repeats, models {names}", flush=True)
        pre = {n: [] for n in names}
        state = {}
        for r in range(n_pre):
            _, outs = time_interleaved({n: (lambda x, n=n: prefill(models[n].model, x, factories.get(n))) for n in names}, ids,
                                       flip=r % 2 == 1)
            for n, (logits, cache, dt) in outs.items():  # dt: the forward alone, timed inside prefill
                pre[n].append(dt / prompt_len)
                state[n] = (logits, cache)
        kbytes = {n: cache_bytes(state[n][1], float_bytes=None)["k"] for n in names}
        # every cache as a bf16 model holds it (codes keep their packed bytes; scales 2 bytes): keys, and K + V
        kv_bf16 = {n: cache_bytes(state[n][1], float_bytes=2) for n in names}
        bf16 = {n: kv_bf16[n]["k"] for n in names}
        row = {"context": prompt_len, "prefill_s_per_token": {n: {"min": min(v), "median": statistics.median(v), "runs": v}
                                                               for n, v in pre.items()},
               "prefill_ratio_median": {n: statistics.median([a / b for a, b in zip(pre[n], pre["dense"])])
                                        for n in names if n != "dense"},
               "key_bytes_batch1": kbytes,
               "key_bytes_ratio": {n: kbytes[n] / kbytes["dense"] for n in names if n != "dense"},
               "key_bytes_bf16": bf16,
               "key_bytes_vs_bf16_dense": {n: bf16[n] / bf16["dense"] for n in names},
               "kv_bytes_vs_bf16_dense": {n: kv_bf16[n]["total"] / kv_bf16["dense"]["total"] for n in names},
               "key_bytes_ratio_predicted": {n: predicted_key_ratio(models[n], prompt_len) for n in names if n != "dense"},
               "decode": {}}
        for b in batches:
            caches = {}
            for n in names:
                logits, cache = state[n]
                if b > 1 and n not in factories:
                    cache = copy.deepcopy(cache)
                    cache.batch_repeat_interleave(b)
                    logits = logits.repeat_interleave(b, dim=0)
                caches[n] = (logits, cache)

            def fresh(n, b=b):  # a cache to decode from: a copy, or for a peer (its tensors do not deep-copy) a prefill
                if n in factories:
                    return prefill(models[n].model, ids.repeat(b, 1), factories[n])[:2]
                return caches[n][0], copy.deepcopy(caches[n][1])

            kb = {n: cache_bytes(caches[n][1], float_bytes=None)["k"] * (b if n in factories else 1) for n in names}
            tps = {n: [] for n in names}
            decode_lockstep(models, {n: fresh(n) for n in names}, 2, False)  # warm-up
            for r in range(args.repeats):
                work = {n: fresh(n) for n in names}
                spent = decode_lockstep(models, work, args.new_tokens, flip=r % 2 == 1)
                del work
                for n in names:
                    tps[n].append(b * args.new_tokens / spent[n])
            entry = {"key_bytes": kb, "tokens_per_s": {n: {"min": min(v), "median": statistics.median(v), "runs": v}
                                                       for n, v in tps.items()},
                     "speed_ratio_median": {n: statistics.median([a / d for a, d in zip(tps[n], tps["dense"])])
                                            for n in names if n != "dense"}}
            row["decode"][str(b)] = entry
            print(f"  B={b}: tokens/s " + ", ".join(f"{n} {statistics.median(v):.1f}" for n, v in tps.items())
                  + " | ratio " + ", ".join(f"{n} {v:.3f}" for n, v in entry["speed_ratio_median"].items()), flush=True)
            del caches
        print(f"  prefill s/token " + ", ".join(f"{n} {statistics.median(v) * 1e3:.2f} ms" for n, v in pre.items())
              + " | K bytes ratio " + ", ".join(f"{n} {v:.4f}" for n, v in row["key_bytes_ratio"].items()), flush=True)
        if args.bf16_bytes:
            print("  K bytes vs a bf16 dense cache " + ", ".join(f"{n} {v:.4f}" for n, v in
                                                               row["key_bytes_vs_bf16_dense"].items()), flush=True)
            print("  K+V bytes vs a bf16 dense cache " + ", ".join(f"{n} {v:.4f}" for n, v in
                                                                 row["kv_bytes_vs_bf16_dense"].items()), flush=True)
        rows.append(row)
        del state
    result["rows"] = rows
    result["crossover_context"] = {}
    for n in names[1:]:
        for b in args.batches:
            pts = [(r["context"], r["decode"][str(b)]["speed_ratio_median"][n]) for r in rows if str(b) in r["decode"]]
            if pts:
                result["crossover_context"][f"{n}/B{b}"] = crossover(*zip(*pts))
    result["host_end"] = host_info()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print()
    print("| context | batch | model | decode tok/s (min / median) | vs dense | prefill ms/token | K bytes vs dense "
          "(predicted) | K+V vs bf16 dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for b, e in r["decode"].items():
            for n in names:
                t = e["tokens_per_s"][n]
                ratio = "" if n == "dense" else f"{e['speed_ratio_median'][n]:.3f}"
                pred = r["key_bytes_ratio_predicted"].get(n)
                kb = "1" if n == "dense" else f"{r['key_bytes_ratio'][n]:.4f}" + ("" if pred is None else f" ({pred:.4f})")
                print(f"| {r['context']} | {b} | {n} | {t['min']:.1f} / {t['median']:.1f} | {ratio} | "
                      f"{r['prefill_s_per_token'][n]['median'] * 1e3:.2f} | {kb} | {r['kv_bytes_vs_bf16_dense'][n]:.4f} |")
    print(f"\ncrossover (context where compressed decode reaches dense speed): {result['crossover_context']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
