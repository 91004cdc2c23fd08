"""Bits by energy in the K and V caches (transform coding): more bits where a channel carries more energy, at the
same code bits per token, against one width for all. ``--table`` writes eval/results/allocation/BITS.md.

Keys are cached in the fit's basis, channels ordered by the logit energy each keeps, so reverse water-filling says:
more bits first, fewer after, a longer rank at the same bytes. Values: the top half of the output basis holds ~90%
of the output energy in the median head, so 4 bits there and 2 on the rest (a Hadamard per half) should beat 3 bits
after a Hadamard over all (the default). Mixed widths are emulated exactly in the 8-bit quantiser: b bits (1, 2, 4,
8) are 2**b - 1 levels over the group's [min, max], stored as code·255/(2**b - 1) with step (max - min)/255 — the
b-bit reconstruction (3 bits: within half an 8-bit step of it); the bytes are not (``code_bits``: the widths').
eval/kv_total.py's held-out windows and cache path (2×2048 tokens of WikiText-2 and Dracula, 512-token chunks,
prompts exact); keys per 64 tokens, 64 exact; values per 32 or 64 channels, 48 exact. Rows: allocation/bits-MODEL.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from lowrank_attn.harness import HELD_TEXTS, REPO, ResultsStore, held_windows, stamp

OUT = REPO / "eval" / "results" / "allocation"
BASE = dict(k_group=64, exact_window=64)  # prompts exact (set_prefill), as checkpoints serve
# id: (what, recipe, side emulated, widths: keys [(channels, bits)...] from channel 0; values bits per 32 channels)
_K = dict(k_bits=8, v_bits=3, v_group=64)  # keys emulated (8 bits); values 3-bit, real codes
_V = dict(rank_ratio=0.5, k_bits=4, v_group=32, v_window=48)  # keys 50%, 4-bit real codes; values vary
POINTS = {
    "k50-4-real": ("keys 50%, 4 bits (real codes)", dict(_K, k_bits=4, rank_ratio=0.5), None, None),
    "k50-4": ("keys 50%, 4 bits (emulated: checks the emulation)", dict(_K, rank_ratio=0.5), "k", [(64, 4)]),
    "k75-4x16-2x32": ("keys 75%: 16 ch 4 bits, 32 2", dict(_K, rank_ratio=0.75), "k", [(16, 4), (64, 2)]),
    "k50-8x8-4x8-2x16": ("keys 50%: 8 ch 8 bits, 8 4, 16 2", dict(_K, rank_ratio=0.5), "k", [(8, 8), (8, 4), (64, 2)]),
    "k62-8x8-2x32": ("keys 62.5%: 8 ch 8 bits, 32 2", dict(_K, rank_ratio=0.625), "k", [(8, 8), (64, 2)]),
    "k100-4x8-2x40-1x16": ("keys 100%: 8 ch 4, 40 2, 16 1", dict(_K, rank_ratio=1.0), "k", [(8, 4), (40, 2), (64, 1)]),
    "v3-real": ("values 3 bits, Hadamard over all 64 (real codes: the default)", dict(_V, v_bits=3), None, None),
    "v3-b32": ("values 3 bits, Hadamard per 32", dict(_V, v_bits=8), "v", [3, 3]),
    "v4-2-b32": ("values: output basis' top 32 4 bits, the rest 2", dict(_V, v_bits=8), "v", [4, 2]),
    "v4-b32": ("values 4 bits, Hadamard per 32", dict(_V, v_bits=8), "v", [4, 4]),
}
KEY = ("method",)


def channel_bits(widths, r: int) -> list[int]:
    per = [b for n, b in widths for _ in range(n)]
    return (per + [widths[-1][1]] * r)[:r]


def code_bits(over: dict, widths, side, head_dim: int) -> tuple[float, float]:
    """(key, value) code bits per token and KV head the widths would store at the mean key rank (scales and exact
    windows aside)."""
    kept = int(over["rank_ratio"] * head_dim)
    k = sum(channel_bits(widths, kept)) if side == "k" else kept * over["k_bits"]
    return float(k), float(np.mean(widths) * head_dim if side == "v" else over["v_bits"] * head_dim)


@contextlib.contextmanager
def mixed_widths(side, widths):
    """Patch the 8-bit quantiser (keys: per channel, values: per channel group; values: a Hadamard per 32)."""
    import torch

    from lowrank_attn import vrotation
    from lowrank_attn.runtime import coded

    quantize, spreading = coded.GroupQuantizer.quantize, vrotation.spreading

    def patched(self, x):
        if self.bits != 8 or side is None:
            return quantize(self, x)
        g = x.unflatten(self.axis, (-1, self.group))  # keys (B,H,n,G,r); values transposed (B,H,r/g,g,T)
        if side == "k":
            levels = torch.tensor([2.0**b - 1 for b in channel_bits(widths, g.shape[-1])])  # (r,) per channel
        else:
            levels = torch.tensor([2.0**b - 1 for b in widths]).view(-1, 1, 1)  # (r/g, 1, 1): per channel group
        lo, hi = g.amin(dim=self.axis, keepdim=True), g.amax(dim=self.axis, keepdim=True)
        step = (hi - lo).float() / levels
        codes = torch.round((g.float() - lo.float()) / torch.where(step > 0, step, 1.0)).clamp_(min=0)
        codes = (torch.minimum(codes, levels) * (255 / levels)).round().to(torch.uint8)
        step8 = (hi - lo) / 255
        return coded.pack_codes(codes, 8, self.axis), lo, torch.where(step8 > 0, step8, torch.ones_like(step8))

    coded.GroupQuantizer.quantize = patched
    if side == "v":
        vrotation.spreading = lambda n: np.kron(np.eye(n // 32), vrotation.hadamard(32))
    try:
        yield
    finally:
        coded.GroupQuantizer.quantize, vrotation.spreading = quantize, spreading


def measure(model_name: str, names: list[str]) -> None:
    from lowrank_attn import Recipe, compress, load_model, prepare_calibration, set_prefill
    from lowrank_attn.cachepath import cache_perplexity
    from lowrank_attn.models import restorable

    store = ResultsStore(OUT / f"bits-{model_name}.jsonl", KEY)
    lm = load_model(model_name)
    windows = {t: held_windows(lm.tokenizer, t, 2048, 2) for t in HELD_TEXTS}  # eval/kv_total.py's
    head_dim = lm.model.config.get_text_config().head_dim
    cal = None
    for name in names:
        if store.done((name,)):
            continue
        what, over, side, widths = POINTS[name]
        rec = Recipe(model=model_name).replace(**BASE, **over)
        t0 = time.time()
        cal = cal or prepare_calibration(lm, rec, progress=False)
        with restorable(lm.model), mixed_widths(side, widths):
            lm2, _ = compress(lm, rec, calibration=cal, progress=False)
            set_prefill(lm2.model, "exact")
            res = {t: cache_perplexity(lm2.model, w, chunk=512) for t, w in windows.items()}
        row = {"ppl_cache": {t: r["token_perplexity"] for t, r in res.items()}}
        if not side:  # the emulation holds 8-bit codes, not what the widths would
            row["bytes_per_token"] = next(iter(res.values()))["bytes_per_token"]
        k, v = code_bits(over, widths, side, head_dim)
        row.update(method=name, what=what, model=model_name, recipe={**BASE, **over}, widths=widths,
                   code_bits={"k": k, "v": v}, seconds=round(time.time() - t0, 1), **stamp())
        store.append(row)
        print(name, row["ppl_cache"], f"{row['seconds']:.0f}s", flush=True)


def table() -> str:
    out = ["# Bits by energy in the K and V caches", "", "`python eval/bit_allocation.py --table`; method: its "
           "docstring. Δppl: token perplexity through the cache vs dense (eval/results/kv), mean of WikiText-2 and "
           "Dracula; code bits per token and KV head (scales and exact windows aside).", ""]
    for f in sorted(OUT.glob("bits-*.jsonl")):
        model = f.stem.removeprefix("bits-")
        dense = ResultsStore(REPO / "eval" / "results" / "kv" / f"{model}.jsonl", ("method", "dtype")).latest()
        ref = dense[("dense", "float32")]["ppl_cache"]
        head = "| point | what | K code bits | V code bits | Δppl | wiki | dracula | commit |"
        out += [f"## {model}", "", head, "|---" * 8 + "|"]
        for r in ResultsStore(f, KEY).latest().values():
            d = {t: 100 * (r["ppl_cache"][t] / ref[t] - 1) for t in ref}
            out.append(f"| {r['method']} | {r['what']} | {r['code_bits']['k']:g} | {r['code_bits']['v']:g} | "
                       f"{sum(d.values()) / len(d):+.2f}% | {d['wiki']:+.2f}% | {d['dracula']:+.2f}% | {r['commit']} |")
        out.append("")
    (OUT / "BITS.md").write_text("\n".join(out))
    return str(OUT / "BITS.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a model short name (default: smollm2-135m)")
    ap.add_argument("--points", help=f"comma-separated (default: all): {', '.join(POINTS)}", default=",".join(POINTS))
    ap.add_argument("--table", action="store_true", help="only tabulate the committed rows")
    args = ap.parse_args()
    print(table()) if args.table else measure(args.model, args.points.split(","))


if __name__ == "__main__":
    main()
