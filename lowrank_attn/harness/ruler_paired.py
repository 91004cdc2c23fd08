"""Each method against dense on the same docs (``python eval/ruler.py --paired``): ``PAIRED.md`` and ``paired.json``.

A row of the RULER table is a mean over n seeded docs per task; two rows a few points apart may differ by chance.
Every method here answered the *same* docs as dense (the first n of each task, matched by prompt hash), so the
difference can be taken doc by doc: per task the mean of (method − dense) over the docs both answered, over the
tasks the mean of those, with a standard error from the per-doc differences (normal approximation; each task's
variance over its own docs, tasks independent). The per-doc scores are lm-eval's own metric recomputed from each
row's stored responses (:func:`.ruler.score_response` on the task's rebuilt docs) and checked against the row's
stored score.

:func:`paired_delta` is the arithmetic (no lm-eval); :func:`write_paired` rebuilds the tasks (lm-eval, offline).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .ruler import (
    OFFLINE_TASKS, RESULTS, RulerError, latest_rows, load_task, prompt_shas, rows_store, score_response, task_prompts,
)
from .ruler_report import SMOKE_BELOW

Z95 = 1.96


def paired_delta(method: dict[str, list[float]], dense: dict[str, list[float]]) -> dict:
    """``method`` and ``dense``: per task, per-doc scores on the same docs in the same order. Returns per task ``{"n", "delta"}`` and over the tasks ``delta`` (mean of the per-task
    mean differences) and ``se`` (its standard error: sqrt(Σ_t var_t / n_t) / T, var_t the sample variance of task
    t's per-doc differences)."""
    tasks, var = {}, 0.0
    for t in method:
        if t not in dense:
            continue
        if len(method[t]) != len(dense[t]):
            raise ValueError(f"{t}: {len(method[t])} scores against {len(dense[t])}")
        d = [a - b for a, b in zip(method[t], dense[t])]
        if not d:
            continue
        mean = sum(d) / len(d)
        v = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
        tasks[t] = {"n": len(d), "delta": mean}
        var += v / len(d)
    if not tasks:
        return {"tasks": {}, "delta": None, "se": None}
    k = len(tasks)
    return {"tasks": tasks, "delta": sum(x["delta"] for x in tasks.values()) / k, "se": math.sqrt(var) / k}


def doc_scores(row: dict, docs: dict[str, dict], task_obj, length: int) -> dict[str, float]:
    """``row``'s score per doc, by prompt hash (``docs``: the task's docs by prompt hash), lm-eval's metric of
    each stored response; a RulerError where a doc is missing or the scores do not average to the row's score."""
    shas, responses = row.get("prompt_shas") or [], row.get("responses") or []
    if len(shas) != len(responses) or not shas:
        raise RulerError(f"{row['method']} {row['task']}@{length}: no per-doc prompts and responses stored")
    missing = [s for s in shas if s not in docs]
    if missing:
        raise RulerError(f"{row['method']} {row['task']}@{length}: {len(missing)} docs not among the task's first "
                         f"{len(docs)}")
    out = {s: score_response(task_obj, docs[s], r or "", length) for s, r in zip(shas, responses)}
    mean = sum(out.values()) / len(out)
    if row.get("score") is not None and abs(mean - float(row["score"])) > 1e-6:
        raise RulerError(f"{row['method']} {row['task']}@{length}: recomputed per-doc scores average {mean:.4f}, "
                         f"the row says {float(row['score']):.4f}")
    return out


def model_paired(rows: list[dict], tokenizer_dir: str, tasks=OFFLINE_TASKS,
                 min_n: int = SMOKE_BELOW) -> tuple[list[dict], list[str]]:
    """Every method's paired difference against dense, per length, for one model's latest rows of at least
    ``min_n`` docs (smoke rows are not measurements); and the rows left out, with why."""
    latest = [r for r in latest_rows(rows).values() if r.get("score") is not None and int(r["n"]) >= min_n]
    out, skipped = [], []
    for length in sorted({int(r["length"]) for r in latest}):
        at = [r for r in latest if int(r["length"]) == length and r["task"] in tasks]
        if not any(r["method"] == "dense" for r in at):
            continue
        scores: dict[str, dict[str, dict[str, float]]] = {}  # method -> task -> prompt hash -> score
        for t in tasks:
            mine = [r for r in at if r["task"] == t]
            if not mine:
                continue
            task_obj = load_task(t, length, tokenizer_dir)
            prompts = task_prompts(task_obj, max(int(r["n"]) for r in mine))
            docs = dict(zip(prompt_shas([p["prompt"] for p in prompts]), (p["doc"] for p in prompts)))
            for r in mine:
                try:
                    scores.setdefault(r["method"], {})[t] = doc_scores(r, docs, task_obj, length)
                except RulerError as e:
                    skipped.append(str(e))
        dense = scores.pop("dense", {})
        for method, per_task in sorted(scores.items()):
            both = {t: [h for h in got if h in dense[t]] for t, got in per_task.items() if t in dense}
            mine = [r for r in at if r["method"] == method]
            out.append({"model": rows[0]["model"], "method": method, "length": length,
                        "kv_fraction": next((r["kv_fraction"] for r in mine if r.get("kv_fraction") is not None), None),
                        "nominal": any("nominal" in str(r.get("bytes_how", "")) for r in mine),
                        **paired_delta({t: [per_task[t][h] for h in hs] for t, hs in both.items()},
                                       {t: [dense[t][h] for h in hs] for t, hs in both.items()})})
    return out, skipped


def render_paired(results: list[dict], skipped: list[str] = ()) -> str:
    tasks = [t for t in OFFLINE_TASKS if any(t in r["tasks"] for r in results)]
    lines = ["# RULER: each method minus dense, doc by doc", "",
             "Written by `python eval/ruler.py --paired` from the rows in this directory (lowrank_attn/harness/"
             "ruler_paired.py). Each method's score minus dense's on the docs both answered (the same seeded "
             "prompts), in points: per task, and the mean over the tasks with a 95% interval (±1.96 standard "
             "errors of the per-doc differences, normal approximation). n: docs paired per task.", ""]
    for model in sorted({r["model"] for r in results}):
        lines += [f"## {model}", "", "| method | length | n | Δ mean (95%) | " + " | ".join(tasks) + " |",
                  "|---|---|---|---|" + "---|" * len(tasks)]
        for r in sorted((r for r in results if r["model"] == model), key=lambda r: (r["length"], r["method"])):
            if r["delta"] is None:
                continue
            ns = "/".join(map(str, sorted({x["n"] for x in r["tasks"].values()})))
            cells = [f"{100 * r['tasks'][t]['delta']:+.1f}" if t in r["tasks"] else "–" for t in tasks]
            few = f" ({len(r['tasks'])} of {len(tasks)} tasks)" if len(r["tasks"]) < len(tasks) else ""
            lines.append(f"| {r['method']} | {r['length']} | {ns} | {100 * r['delta']:+.1f} ± "
                         f"{100 * Z95 * r['se']:.1f}{few} | " + " | ".join(cells) + " |")
        lines.append("")
    if skipped:
        lines += ["Rows left out: " + "; ".join(skipped) + ".", ""]
    return "\n".join(lines)


def write_paired(tokenizer_dir_of, results: Path = RESULTS, min_n: int = SMOKE_BELOW) -> Path:
    """``PAIRED.md`` and ``paired.json`` in ``results`` from every ``<model>.jsonl`` there; ``tokenizer_dir_of``:
    model name -> the tokenizer directory its tasks are built with (eval/ruler.py's)."""
    out, skipped = [], []
    for f in sorted(Path(results).glob("*.jsonl")):
        rows = rows_store(f).rows()
        if rows:
            got, left = model_paired(rows, tokenizer_dir_of(rows[0]["model"]), min_n=min_n)
            out, skipped = out + got, skipped + left
    (Path(results) / "paired.json").write_text(json.dumps({"paired": out, "left_out": skipped}, indent=1),
                                               encoding="utf-8")
    md = Path(results) / "PAIRED.md"
    text = render_paired(out, skipped)
    if plot_paired(out, Path(results) / "paired.png"):
        text += "\n![each method minus dense, 95% interval, against its KV bytes](paired.png)\n"
    md.write_text(text, encoding="utf-8")
    return md


FAMILY_COLOURS = {"ours": "tab:blue", "kvpress": "tab:green", "peer": "tab:orange"}


def plot_paired(results: list[dict], path: Path) -> bool:
    """A forest plot per model and length: each method's difference from dense (points) with its 95% interval,
    a line per method labelled with its KV bytes, sorted by them; ours blue, ``QuantizedCache`` orange, kvpress
    green; the ±2-point band shaded. False (nothing written) without a paired method."""
    panels: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("delta") is not None:
            panels.setdefault((r["model"], r["length"]), []).append(r)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [0.9 + 0.28 * len(rs) for rs in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, sum(heights) + 0.4), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    ntasks = max(len(r["tasks"]) for rs in panels.values() for r in rs)
    for ax, ((model, length), rs) in zip(axes[:, 0], sorted(panels.items())):
        rs = sorted(rs, key=lambda r: (-(r["kv_fraction"] or 0), r["method"]))
        for y, r in enumerate(rs):
            family = r["method"].split(":")[0].split("-")[0]
            colour = FAMILY_COLOURS.get(family, FAMILY_COLOURS["peer"])
            full = len(r["tasks"]) == ntasks
            ax.errorbar([100 * r["delta"]], [y], xerr=[100 * Z95 * r["se"]], fmt="o", color=colour, capsize=3,
                        markerfacecolor=colour if full else "white")
        ax.set_yticks(range(len(rs)), [_plot_label(r, ntasks) for r in rs], fontsize=7)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.axvspan(-2, 2, color="grey", alpha=0.15, linewidth=0)
        ax.set_ylim(-0.7, len(rs) - 0.3)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{model}, {length} tokens: RULER mean, method − dense, same docs", fontsize=9)
    axes[-1, 0].set_xlabel("difference from dense (points); shaded: ±2 points; hollow: fewer tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_label(r: dict, ntasks: int) -> str:
    frac = "?" if r["kv_fraction"] is None else f"{'≈' if r['nominal'] else ''}{100 * r['kv_fraction']:.1f}%"
    n = "/".join(map(str, sorted({x["n"] for x in r["tasks"].values()})))
    few = f", {len(r['tasks'])} of {ntasks} tasks" if len(r["tasks"]) < ntasks else ""
    return f"{r['method']} ({frac} KV, n={n}{few})"
