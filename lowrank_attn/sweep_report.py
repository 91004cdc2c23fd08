"""Tables and plots of a sweep: sweep.csv, sweep.md, sweep.json and PNGs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

COLUMNS = ["method", "ratio", "mean_rank_ratio", "padded_rank_ratio", "word_perplexity", "ppl_vs_dense_pct",
           "k_bytes_per_token", "k_bytes_vs_dense", "kv_bytes_vs_dense", "output_kl", "kl_mean", "kl_max", "tv_mean"]


def _rows(points: list[dict]) -> list[dict]:
    dense = next((p for p in points if p["method"] == "dense"), None)
    rows = []
    for p in sorted(points, key=lambda p: (p["method"] != "dense", p["method"], -(p.get("ratio") or 1))):
        row = {c: p.get(c) for c in COLUMNS}
        if dense:
            row["ppl_vs_dense_pct"] = 100 * (p["word_perplexity"] / dense["word_perplexity"] - 1)
            row["k_bytes_vs_dense"] = p["k_bytes_per_token"] / dense["k_bytes_per_token"]
            if p.get("kv_bytes_per_token_bf16") and dense.get("kv_bytes_per_token_bf16"):  # K+V, bf16 (older: K only)
                row["kv_bytes_vs_dense"] = p["kv_bytes_per_token_bf16"] / dense["kv_bytes_per_token_bf16"]
        rows.append(row)
    return rows


def sweep_csv(points: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in _rows(points):
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _kv(row: dict) -> str:
    return "-" if row.get("kv_bytes_vs_dense") is None else f"{row['kv_bytes_vs_dense']:.3f}"


def _grid(rows: list[dict], methods: list[str], ratios: list[float], cell) -> list[str]:
    """Markdown table, a row per method and a column per ratio, ``cell(row)`` in each (blank if absent)."""
    lines = ["| method | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for m in methods:
        found = [next((x for x in rows if x["method"] == m and x["ratio"] == ratio), None) for ratio in ratios]
        lines.append(f"| {m} | " + " | ".join("" if r is None else cell(r) for r in found) + " |")
    return lines


def sweep_markdown(points: list[dict], title: str = "") -> str:
    rows = _rows(points)
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None and not r["method"].startswith("kivi")}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense" and r["ratio"] is not None
                                 and not r["method"].startswith("kivi")))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    out = [f"# {title}: perplexity vs rank" if title else "", ""]
    if dense:
        ml = next((p.get("eval", {}).get("max_length") for p in points if p.get("eval")), None)
        out.append(f"Dense word perplexity {dense['word_perplexity']:.3f}"
                   + (f" (lm-eval windows of {ml} tokens; K-cache bytes measured after {max(2048, ml)})" if ml else "")
                   + "; cells: word perplexity (change vs dense) / K-cache bytes vs dense / K+V bytes vs the bf16 "
                   "dense cache.\n")
    out += _grid(rows, methods, ratios, lambda r: f"{r['word_perplexity']:.2f} ({r['ppl_vs_dense_pct']:+.1f}%) / "
                 f"{r['k_bytes_vs_dense']:.3f} / {_kv(r)}" if r.get("ppl_vs_dense_pct") is not None
                 else f"{r['word_perplexity']:.2f}")
    if any(r.get("output_kl") is not None for r in rows):
        out += ["", "Next-token KL(dense ‖ method), nats per token on the first evaluation window:", ""]
        out += _grid(rows, methods, ratios, lambda r: f"{r['output_kl']:.3g}" if r.get("output_kl") is not None else "")
    single = [r for r in rows if r["method"].startswith("kivi") or r["ratio"] is None and r["method"] != "dense"]
    if single:
        out += ["", "| one-point methods (K-cache quantisation alone; the bound policy) | mean rank ratio | word ppl | change "
                "| K bytes vs dense | K+V bytes vs dense | next-token KL |", "|---|---|---|---|---|---|---|"]
        for r in single:
            kl = f" | {r['output_kl']:.3g}" if r.get("output_kl") is not None else " | "
            out.append(f"| {r['method']} | {r['mean_rank_ratio']:.3f} | {r['word_perplexity']:.2f} | {r['ppl_vs_dense_pct']:+.1f}% "
                       f"| {r['k_bytes_vs_dense']:.3f} | {_kv(r)}{kl} |")
    return "\n".join(out) + "\n"


def _color(i: int):
    import matplotlib

    return matplotlib.colormaps["tab20"](2 * i % 20 + (2 * i // 20) % 2)  # distinct for up to 20 methods


def _ppl_axis(ax, dense, rows, methods) -> None:
    """Log perplexity axis from just below dense to 20× dense; methods entirely above it are named."""
    if not dense:
        return
    top = 20 * dense["word_perplexity"]
    ax.set_ylim(0.9 * dense["word_perplexity"], top)
    off = [m for m in methods if all(r["word_perplexity"] > top for r in rows if r["method"] == m)]
    if off:
        ax.text(0.99, 0.98, "off the chart (> 20× dense): " + ", ".join(off), transform=ax.transAxes,
                ha="right", va="top", fontsize=7)


def plot_sweep(points: list[dict], out: Path, title: str = "") -> list[str]:
    """The sweep's plots into ``out``: perplexity vs rank and vs K-cache size, fidelity vs rank, and the rank
    allocation of ``ours``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(points)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    files = [_plot_ppl(plt, rows, dense, methods, x, out, title) for x in ("mean_rank_ratio", "k_bytes_vs_dense")]
    files.append(_plot_kl(plt, rows, methods, out, title))
    budget = [p for p in points if p["method"] == "ours" and p.get("layer_ranks")]
    if budget:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for p in sorted(budget, key=lambda p: -p["ratio"]):
            ax.plot(range(len(p["layer_ranks"])), p["layer_ranks"], "o-", ms=3, label=f"ratio {p['ratio']:g}")
        ax.set(xlabel="layer", ylabel="rank (per KV head)", title="rank allocation of 'ours' (budget, output signal)")
        ax.legend(fontsize=8)
        files.append(_save(plt, fig, out, "rank_allocation.png"))
    return files


def _save(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def _plot_ppl(plt, rows: list[dict], dense, methods: list[str], x: str, out: Path, title: str) -> str:
    """Word perplexity per method against ``x``: the mean rank ratio (kivi left out: full rank) or the K-cache
    bytes vs dense."""
    by_rank = x == "mean_rank_ratio"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, m in enumerate(methods):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r[x] or 0)
        xs, ys = [r[x] for r in rs], [r["word_perplexity"] for r in rs]
        if not by_rank:
            ax.plot(xs, ys, "o-" if not m.startswith("kivi") else "s", color=_color(i), label=m)
        elif not m.startswith("kivi"):
            ax.plot(xs, ys, "o-", color=_color(i), label=m)
    if dense:
        ax.axhline(dense["word_perplexity"], color="k", ls="--", lw=1, label="dense")
    what = "rank" if by_rank else "K-cache size"
    if by_rank:
        ax.set(xscale="linear", yscale="log", xlabel="mean q/k rank / head dim", ylabel="word perplexity (lm-eval)",
               title=f"{title}: perplexity vs {what}" if title else f"perplexity vs {what}")
        _ppl_axis(ax, dense, rows, methods)
    else:
        _ppl_axis(ax, dense, rows, methods)
        ax.set(yscale="log", xlabel="K-cache bytes per token / dense (measured)", ylabel="word perplexity (lm-eval)",
               title=f"{title}: perplexity vs {what}" if title else f"perplexity vs {what}")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "ppl_vs_rank.png" if by_rank else "ppl_vs_kbytes.png")


def _plot_kl(plt, rows: list[dict], methods: list[str], out: Path, title: str) -> str:
    """Mean attention KL (held-out) and next-token KL to dense against the mean rank ratio, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "kl_mean", "mean attention KL (held-out, per head)"),
                           (axes[1], "output_kl", "next-token KL to dense (eval text)")):
        for i, m in enumerate(methods):
            rs = sorted((r for r in rows if r["method"] == m and r.get(key)), key=lambda r: r["mean_rank_ratio"])
            if rs and not m.startswith("kivi"):
                ax.plot([r["mean_rank_ratio"] for r in rs], [r[key] for r in rs], "o-", color=_color(i), label=m)
        ax.set(yscale="log", xlabel="mean q/k rank / head dim", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle("fidelity vs rank" + (f" — {title}" if title else ""))
    return _save(plt, fig, out, "kl_vs_rank.png")


def write_sweep_report(points: list[dict], out: str | Path, title: str = "") -> list[str]:
    """Tables and plots into ``out``; ``title`` is the model's name."""
    out = Path(out)
    (out / "sweep.json").write_text(json.dumps(sorted(points, key=lambda p: (p["method"], -(p.get("ratio") or 1))),
                                               indent=1, sort_keys=True) + "\n")
    (out / "sweep.csv").write_text(sweep_csv(points))
    (out / "sweep.md").write_text(sweep_markdown(points, title))
    return ["sweep.json", "sweep.csv", "sweep.md"] + plot_sweep(points, out, title)
