"""Write an analysis report: spectra.json, summary.csv / summary.md and PNG plots.

Files go to a temporary directory next to ``out`` and are renamed into place at
the end, so an interrupted run leaves nothing half-written under ``out``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from .fsutil import atomic_dir


def _fmt_range(r: dict, digits: int = 0) -> str:
    if r["min"] is None:
        return "n/a"
    f = (lambda x: f"{x:.{digits}f}") if digits else (lambda x: f"{x:g}")
    return f"{f(r['min'])}–{f(r['max'])} (median {r['median']:.{max(digits, 1)}f})"


def summary_markdown(report: dict) -> str:
    m = report["model"]
    lay = m["layout"]
    lines = [
        f"# Attention spectra: {m['name']}",
        "",
        f"{lay['num_layers']} layers × {lay['num_kv_heads']} KV heads ({lay['num_heads']} query heads), "
        f"head dim {lay['head_dim']}; {report['tokens']} tokens in windows of {report['seq_len']}.",
        "",
        "r90 = components holding 90% of the energy, range over KV heads (GQA groups pooled).",
        "",
        "| text | tokens | r90 of E~ (logit field) | r90 of W_Q^T W_K | gap W/E~ | heads with E~ < W |",
        "|---|---|---|---|---|---|",
    ]
    tokens = {t["name"]: t["tokens"] for t in report["texts"]}
    for row in report["summary"]:
        n = tokens.get(row["text"], report["tokens"])
        lines.append(f"| {row['text']} | {n} | {_fmt_range(row['r90_logit_field'])} | {_fmt_range(row['r90_weights'])} "
                     f"| {_fmt_range(row['gap'], 2)} | {row['heads_below_weights']}/{row['kv_heads']} |")
    pooled = report["summary"][-1]
    if "r90_value_output" in pooled:
        lines += ["", f"Value side (pooled): r90 of the head's output field (what o_proj sees of the attention output, "
                  f"per value dimension; the spectrum the value map keeps) {_fmt_range(pooled['r90_value_output'])} "
                  f"of {lay['head_dim']}."]
    if report.get("sampled_text"):
        lines += ["", "Calibrated on text sampled from the model itself (--text sampled). "
                  "Real text in the serving domain gives more faithful spectra: pass --text."]
    return "\n".join(lines) + "\n"


def summary_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "text", "kv_heads", "r90_E_min", "r90_E_median", "r90_E_max",
                "r90_W_min", "r90_W_median", "r90_W_max", "gap_min", "gap_median", "gap_max", "heads_E_below_W"])
    for row in report["summary"]:
        e, wt, g = row["r90_logit_field"], row["r90_weights"], row["gap"]
        w.writerow([report["model"]["name"], row["text"], row["kv_heads"], e["min"], e["median"], e["max"],
                    wt["min"], wt["median"], wt["max"],
                    *(round(x, 4) if x is not None else "" for x in (g["min"], g["median"], g["max"])),
                    row["heads_below_weights"]])
    return buf.getvalue()


def plot_analysis(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    n_layers, n_kv = len(layers), len(layers[0]["kv_heads"])
    name = report["model"]["name"]
    files = []

    # 1. cumulative energy, E~ vs W_Q^T W_K, for a few heads (first, middle, last layer; KV head 0)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, l in enumerate(sorted({0, n_layers // 2, n_layers - 1})):
        h = layers[l]["kv_heads"][0]
        c = f"C{i}"
        ax.plot(np.arange(1, len(h["logit_field"]["energy"]) + 1), np.cumsum(h["logit_field"]["energy"]), c, label=f"E~  L{l} kv0")
        ax.plot(np.arange(1, len(h["weights"]["energy"]) + 1), np.cumsum(h["weights"]["energy"]), c + "--", label=f"W_Q^T W_K  L{l} kv0")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="components", ylabel="cumulative energy", title=f"{name}: logit field vs weights", ylim=(0, 1.01))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "energy_curves.png", dpi=120)
    plt.close(fig)
    files.append("energy_curves.png")

    # 2. heat maps of r90, layer × KV head
    e90 = np.array([[h["logit_field"]["r90"] for h in layer["kv_heads"]] for layer in layers])
    w90 = np.array([[h["weights"]["r90"] for h in layer["kv_heads"]] for layer in layers])
    vmax = max(e90.max(), w90.max())
    fig, axes = plt.subplots(1, 2, figsize=(6 + 0.3 * n_kv, 0.18 * n_layers + 2.2), sharey=True)
    for ax, data, title in ((axes[0], e90, "r90 of E~"), (axes[1], w90, "r90 of W_Q^T W_K")):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, origin="upper")
        ax.set(title=title, xlabel="KV head")
        ax.set_xticks(range(n_kv))
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(out / "r90_heatmap.png", dpi=120)
    plt.close(fig)
    files.append("r90_heatmap.png")

    # 3. r90(E~) per text (each dot a KV head)
    texts = [t["name"] for t in report["texts"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(texts) + 2), 4))
    data = [[h["per_text"][t]["r90"] for layer in layers for h in layer["kv_heads"]] for t in texts]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(texts) + 1), [t.replace("gutenberg-", "") for t in texts], rotation=30, ha="right", fontsize=8)
    ax.axhline(np.median(w90), color="C3", ls="--", lw=1, label="median r90 of W_Q^T W_K")
    ax.set(ylabel="r90 of E~ (per KV head)", title=f"{name}: logit-field rank per text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "r90_per_text.png", dpi=120)
    plt.close(fig)
    files.append("r90_per_text.png")
    return files


def write_analysis(report: dict, out: str | os.PathLike, *, overwrite: bool = False, plots: bool = True) -> Path:
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "spectra.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        (tmp / "summary.csv").write_text(summary_csv(report))
        (tmp / "summary.md").write_text(summary_markdown(report))
        if plots:
            plot_analysis(report, tmp)
    return Path(out)
