"""Bits by energy inside the K and V caches (transform coding): does giving a cached channel more or fewer bits by
the energy it carries beat one width for all, at the same code bits per token?

    python eval/bit_allocation.py --model smollm2-135m            # measure (resumable), then
    python eval/bit_allocation.py --table                         # write eval/results/allocation/BITS.md

Keys are cached in the fit's basis, whose channels are ordered by the logit energy each keeps (``fit.HeadFit``:
λ descending, 2-11 components hold 90% of E~), so reverse water-filling says: more bits to the first channels,
fewer to the rest, and a longer rank at the same bytes. Values are quantised in the value fit's output basis
after a Hadamard over all channels that evens them (``vrotation``); without it, the top half of the output basis
holds ~90% of the output energy in the median head, so 4 bits on it and 2 on the rest (a Hadamard within each
half) should beat 3 bits everywhere.

Mixed widths are emulated exactly inside the 8-bit quantiser: a channel (keys) or channel group (values) of b bits
is quantised to 2**b - 1 levels over its group's [min, max] and stored as code·255/(2**b - 1) with step
(max - min)/255 — the same reconstruction as b-bit codes (b in 1, 2, 4, 8). So the quality is that of the mixed
widths; the bytes the emulation holds are not (``code_bits`` gives the code bits per token and KV head the
mixed widths would store). Held-out text, windows and cache path of eval/kv_total.py (2×2048 tokens of
WikiText-2 and of Dracula, 512-token chunks, prompts exact); keys quantised per 64 tokens with 64 exact, values
3-bit-equivalent per 32 channels with 48 exact. Rows: eval/results/allocation/bits-MODEL.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np

from lowrank_attn.harness import HELD_TEXTS, REPO, ResultsStore, held_windows, stamp

OUT = REPO / "eval" / "results" / "allocation"
BASE = dict(k_group=64, exact_window=64, prefill="exact")
# id: (what it is, recipe overrides, side, widths: keys (channels, bits) from the first channel / values bits per
# channel group, the Hadamard block of the values' output basis or None for the default (all channels))
_K = dict(k_bits=8, v_bits=3, v_group=64)  # keys emulated; values 3-bit, real codes
_V = dict(rank_ratio=0.5, k_bits=4, v_group=32, v_window=48)  # keys 50%, 4-bit real codes; values vary
POINTS = {
    "k50-4-real": ("keys 50%, 4 bits (real codes)", dict(rank_ratio=0.5, k_bits=4, v_bits=3, v_group=64), None, None,
                   None),
    "k50-4": ("keys 50%, 4 bits (emulated: checks the emulation)", dict(_K, rank_ratio=0.5), "k", [(64, 4)], None),
    "k75-4x16-2x32": ("keys 75%: first 16 channels 4 bits, next 32 2 bits", dict(_K, rank_ratio=0.75), "k",
                      [(16, 4), (64, 2)], None),
    "k50-8x8-4x8-2x16": ("keys 50%: 8 channels 8 bits, 8 4 bits, 16 2 bits", dict(_K, rank_ratio=0.5), "k",
                         [(8, 8), (8, 4), (64, 2)], None),
    "k62-8x8-2x32": ("keys 62.5%: 8 channels 8 bits, 32 2 bits", dict(_K, rank_ratio=0.625), "k", [(8, 8), (64, 2)],
                     None),
    "k100-4x8-2x40-1x16": ("keys 100%: 8 channels 4 bits, 40 2 bits, 16 1 bit", dict(_K, rank_ratio=1.0), "k",
                           [(8, 4), (40, 2), (64, 1)], None),
    "v3-real": ("values 3 bits, Hadamard over all 64 (real codes; the default basis)", dict(_V, v_bits=3), None, None,
                None),
    "v3-b32": ("values 3 bits, Hadamard per 32", dict(_V, v_bits=8), "v", [3, 3], 32),
    "v4-2-b32": ("values: top 32 of the output basis 4 bits, the rest 2 (Hadamard per 32)", dict(_V, v_bits=8), "v",
                 [4, 2], 32),
    "v4-b32": ("values 4 bits, Hadamard per 32", dict(_V, v_bits=8), "v", [4, 4], 32),
}
KEY = ("method",)


def code_bits(over: dict, widths, side, head_dim: int) -> tuple[float, float]:
    """(key, value) code bits per token and KV head the widths would store at the mean key rank (scales and exact
    windows aside)."""
    kept = int(over["rank_ratio"] * head_dim)
    if side == "k":
        per = [b for n, b in widths for _ in range(n)]
        k = float(sum((per + [widths[-1][1]] * kept)[:kept]))
    else:
        k = float(kept * over["k_bits"])
    v = float(np.mean(widths) * head_dim) if side == "v" else float(over["v_bits"] * head_dim)
    return k, v


def emulated(x, group_view, levels):
    """Codes of ``levels`` (broadcast over the grouped view) stored as 8-bit codes with the 8-bit step."""
    import torch

    from lowrank_attn.runtime import coded

    axis, g = group_view
    lo, hi = g.amin(dim=axis, keepdim=True), g.amax(dim=axis, keepdim=True)
    step = (hi - lo).float() / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.minimum(torch.round((g.float() - lo.float()) / step).clamp_(min=0), levels)
    step8 = (hi - lo) / 255
    return (coded.pack_codes((codes * (255 / levels)).round().to(torch.uint8), 8, axis), lo,
            torch.where(step8 > 0, step8, torch.ones_like(step8)))


@contextlib.contextmanager
def mixed_widths(side, widths, block):
    """Patch the 8-bit quantiser (keys: per channel, values: per channel group) and the values' Hadamard block;
    undone on exit."""
    import torch

    from lowrank_attn import vrotation
    from lowrank_attn.runtime import coded

    quantize, spreading = coded.GroupQuantizer.quantize, vrotation.spreading

    def patched(self, x):
        if self.bits != 8 or side is None:
            return quantize(self, x)
        g = x.unflatten(self.axis, (-1, self.group))  # keys (B,H,n,G,r); values transposed (B,H,r/g,g,T)
        if side == "k":
            per = [b for n, b in widths for _ in range(n)]
            bits = (per + [widths[-1][1]] * g.shape[-1])[: g.shape[-1]]
            levels = torch.tensor([2.0**b - 1 for b in bits])  # (r,) along the last dim
        else:
            levels = torch.tensor([2.0**b - 1 for b in widths], dtype=torch.float32).view(-1, 1, 1)  # (r/g, 1, 1)
        return emulated(x, (self.axis, g), levels)

    coded.GroupQuantizer.quantize = patched
    if block:
        vrotation.spreading = lambda n: np.kron(np.eye(n // block), vrotation.hadamard(block))
    try:
        yield
    finally:
        coded.GroupQuantizer.quantize, vrotation.spreading = quantize, spreading


def measure(model_name: str, names: list[str]) -> None:
    from kv_total import CHUNK, LENGTH, WINDOWS, evaluate_point  # noqa: F401  (the same windows and cache path)

    from lowrank_attn import Recipe, compress, load_model, prepare_calibration, set_prefill
    from lowrank_attn.models import restorable

    store = ResultsStore(OUT / f"bits-{model_name}.jsonl", KEY)
    done = store.latest()
    lm = load_model(model_name)
    windows = {t: held_windows(lm.tokenizer, t, LENGTH, WINDOWS) for t in HELD_TEXTS}
    head_dim = lm.model.config.get_text_config().head_dim
    cal = None
    for name in names:
        if store.done((name,), latest=done):
            continue
        what, over, side, widths, block = POINTS[name]
        rec = Recipe(model=model_name).replace(**{k: v for k, v in {**BASE, **over}.items() if k != "prefill"})
        t0 = time.time()
        cal = cal or prepare_calibration(lm, rec, progress=False)
        with restorable(lm.model), mixed_widths(side, widths, block):
            lm2, _ = compress(lm, rec, calibration=cal, progress=False)
            set_prefill(lm2.model, BASE["prefill"])
            row = evaluate_point(lm2.model, windows)
        k, v = code_bits(over, widths, side, head_dim)
        if side:  # what the emulation holds (8-bit codes), not what the widths would
            del row["bytes_per_token"]
        row.update(method=name, what=what, model=model_name, recipe={**BASE, **over}, widths=widths, block=block,
                   code_bits={"k": k, "v": v}, seconds=round(time.time() - t0, 1), **stamp())
        store.append(row)
        print(name, json.dumps(row["ppl_cache"]), f"{row['seconds']:.0f}s", flush=True)


def table() -> str:
    out = ["# Bits by energy in the K and V caches", "", "Written by `python eval/bit_allocation.py --table`; "
           "method and emulation: the script's docstring. Δppl: token perplexity through the cache vs dense "
           "(eval/results/kv), mean of WikiText-2 and Dracula; code bits per token and KV head (scales and exact "
           "windows aside).", ""]
    for f in sorted(OUT.glob("bits-*.jsonl")):
        model = f.stem.removeprefix("bits-")
        dense = ResultsStore(REPO / "eval" / "results" / "kv" / f"{model}.jsonl", ("method", "dtype")).latest()
        ref = dense[("dense", "float32")]["ppl_cache"]
        out += [f"## {model}", "", "| point | what | K code bits | V code bits | Δppl | wiki | dracula | commit |",
                "|---|---|---|---|---|---|---|---|"]
        for r in ResultsStore(f, KEY).latest().values():
            d = {t: 100 * (r["ppl_cache"][t] / ref[t] - 1) for t in ref}
            out.append(f"| {r['method']} | {r['what']} | {r['code_bits']['k']:g} | {r['code_bits']['v']:g} | "
                       f"{sum(d.values()) / len(d):+.2f}% | {d['wiki']:+.2f}% | {d['dracula']:+.2f}% | {r['commit']} |")
        out.append("")
    (OUT / "BITS.md").write_text("\n".join(out))
    return str(OUT / "BITS.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--points", help=f"comma-separated (default: all): {', '.join(POINTS)}", default=None)
    ap.add_argument("--table", action="store_true", help="only tabulate the committed rows")
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    measure(args.model, args.points.split(",") if args.points else list(POINTS))


if __name__ == "__main__":
    main()
