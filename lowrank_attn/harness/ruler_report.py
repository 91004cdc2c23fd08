"""The RULER table and plot (``python eval/ruler.py --table``): ``README.md`` and ``ruler_vs_kv_bytes.png`` in the
results directory, from every ``<model>.jsonl`` there (the last row of each key: :func:`.ruler.latest_rows`).

Stdlib at module level; matplotlib is imported by :func:`plot`.
"""

from __future__ import annotations

import math
from pathlib import Path

from .ruler import OFFLINE_TASKS, RESULTS, latest_rows, mixed_settings, rows_store

SMOKE_BELOW = 10  # rows with fewer samples per task are labelled smoke runs in the table
INTRO = ("Written by `python eval/ruler.py --table` from `eval/results/ruler/<model>.jsonl`; one row per "
         "(model, method, task, length). Score: lm-eval's string match for the task at that length, in %, "
         "greedy decoding, the first n seeded docs of each task. Mean: over the tasks the row has. KV bytes: "
         "the method's K+V cache after one prefill of `length` tokens, floats counted at 2 bytes, and its "
         "fraction of the dense bf16 cache (`QuantizedCache` right after the prompt is quantised, its residual "
         "empty: while it generates, up to 127 more tokens stay in full precision, +3.1% of dense at 4096); `≈` "
         "marks a nominal (1 − ratio) figure (kvpress presses, not measured). `ours-exact:` rows attend the "
         "prompt densely and store it compressed (`prefill=exact`, how a checkpoint serves by default), as "
         "`QuantizedCache` (quanto/hqq rows) runs: there only the generated tokens read the compressed cache; "
         "`ours:` rows attend the prompt over what the cache stores (`prefill=compressed`; rows from commits "
         "before 2f08b80 read every prompt value but the prompt's last v_window quantised, where each prompt row "
         "now reads its own last v_window exact, as a decode step does).")


def fmt_bytes(b) -> str:
    if b is None:
        return "–"
    return f"{b / 2**20:.1f} MiB"


def method_order(label: str) -> int:
    """dense, ours, peers, kvpress presses: the order of a length's rows."""
    return 0 if label == "dense" else 1 if label.startswith("ours") else 3 if label.startswith("kvpress") else 2


def render_table(rows: list[dict], model: str | None = None) -> str:
    """Markdown: per method and length, score per task (%), mean over the tasks it has, n, KV bytes."""
    latest = list(latest_rows(rows).values())
    if model is not None:
        latest = [r for r in latest if r["model"] == model]
    if not latest:
        return "# RULER\n\nNo rows yet.\n"
    tasks = [t for t in OFFLINE_TASKS if any(r["task"] == t for r in latest)]
    lines = ["# RULER (lm-eval 0.4.13, offline tasks)", "", INTRO, ""]
    smoke = [r for r in latest if int(r.get("n", 0)) < SMOKE_BELOW]
    if smoke:
        ns = sorted({int(r["n"]) for r in smoke})
        lines += [f"**Smoke run (n={'/'.join(map(str, ns))} samples per task): rows marked *smoke* show the "
                  f"pipeline works; they are not measurements (a binomial standard error of up to "
                  f"{50 / math.sqrt(max(ns)):.0f} points per task at that n).**", ""]
    for mo in sorted({r["model"] for r in latest}):
        lines += model_section(mo, [r for r in latest if r["model"] == mo], tasks)
    return "\n".join(lines) + "\n"


def model_section(model: str, mine: list[dict], tasks: list[str]) -> list[str]:
    """One model's table (a line per method and length), its commits, machines and wall time, and a warning where
    methods saw different prompts."""
    lines = [f"## {model}", "",
             "| method | length | n | " + " | ".join(tasks) + " | mean | KV bytes | fraction of dense |",
             "|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in mine:
        groups.setdefault((r["method"], int(r["length"])), []).append(r)
    for (me, L) in sorted(groups, key=lambda k: (k[1], method_order(k[0]), k[0])):
        lines.append(table_line(me, L, {r["task"]: r for r in groups[(me, L)]}, tasks))
    commits = sorted({str(r.get("commit")) for r in mine})
    machines = sorted({f"{r['machine'].get('device', '?')}, {r['machine'].get('cpu_count', '?')} cpus, "
                       f"{r['machine'].get('torch_threads', '?')} torch threads"
                       for r in mine if isinstance(r.get("machine"), dict)})
    lines += ["", f"Commits: {', '.join(commits)}. Machines: {'; '.join(machines)}. "
                  f"Wall: {sum(float(r.get('wall_s') or 0) for r in mine) / 60:.1f} min in all.", ""]
    mixed = [f"{me}@{L} ({', '.join(fields)})" for (me, L), rs in sorted(groups.items())
             if (fields := mixed_settings(rs))]
    if mixed:
        lines += [f"Warning: rows of one line ran with different settings: {'; '.join(mixed)} — a rerun of the "
                  "differing tasks with one setting makes the line one measurement.", ""]
    shas: dict[tuple, set] = {}
    for r in mine:
        shas.setdefault((r["task"], int(r["length"]), int(r["n"])), set()).add(r.get("prompts_sha"))
    bad = [f"{t}@{L} (n={n})" for (t, L, n), s in shas.items() if len(s) > 1]
    if bad:
        lines += [f"Warning: methods saw different prompts for {', '.join(sorted(bad))} (prompts_sha differs).", ""]
    return lines


def table_line(method: str, length: int, g: dict[str, dict], tasks: list[str]) -> str:
    """The table's line for one method at one length (``g``: its rows by task)."""
    scores = [g[t]["score"] for t in tasks if t in g and g[t].get("score") is not None]
    mean = sum(scores) / len(scores) if scores else None
    ns = sorted({int(r["n"]) for r in g.values()})
    n = "/".join(map(str, ns))
    label = method + (" *smoke*" if ns and min(ns) < SMOKE_BELOW else "")
    any_r = next(iter(g.values()))
    nominal = "≈" if "nominal" in str(any_r.get("bytes_how", "")) else ""
    frac = any_r.get("kv_fraction")
    cells = [f"{100 * g[t]['score']:.1f}" if t in g and g[t].get("score") is not None else "–" for t in tasks]
    return (f"| {label} | {length} | {n} | " + " | ".join(cells)
            + f" | {'–' if mean is None else f'{100 * mean:.1f}'}"
            + (f" ({len(scores)} of {len(tasks)} tasks)" if mean is not None and len(scores) < len(tasks) else "")
            + f" | {nominal}{fmt_bytes(any_r.get('kv_bytes'))}"
            + f" | {'–' if frac is None else f'{nominal}{frac:.3f}'} |")


def plot(rows: list[dict], path: Path) -> bool:
    """Mean RULER score vs KV bytes fraction of dense, one panel per model, one point per (method, length) named in
    the panel's legend (marker: dense ●, ours ★, ``QuantizedCache`` ▲, kvpress ■); a point whose mean covers fewer
    tasks than the model's fullest row is hollow (not comparable with the others), a smoke row translucent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts: dict[tuple, list] = {}
    for r in latest_rows(rows).values():
        if r.get("score") is None or r.get("kv_fraction") is None:
            continue
        pts.setdefault((r["model"], r["method"], int(r["length"])), []).append(r)
    if not pts:
        return False
    models = sorted({mo for mo, _, _ in pts})
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 4.8 * len(models)), squeeze=False)
    markers = {"dense": "o", "ours": "*", "kvpress": "s"}
    for ax, model in zip(axes[:, 0], models):
        mine = {k: rs for k, rs in pts.items() if k[0] == model}
        ntasks = max(len(rs) for rs in mine.values())
        for i, ((_, me, L), rs) in enumerate(sorted(mine.items(), key=lambda kv: (kv[0][2], method_order(kv[0][1]),
                                                                                     kv[0][1]))):
            mean = 100 * sum(r["score"] for r in rs) / len(rs)
            kind = ("dense" if me == "dense" else "ours" if me.startswith("ours")
                    else "kvpress" if me.startswith("kvpress") else "peer")
            smoke, few = min(int(r["n"]) for r in rs) < SMOKE_BELOW, len(rs) < ntasks
            notes = (["smoke"] if smoke else []) + ([f"{len(rs)} of {ntasks} tasks"] if few else [])
            colour = plt.get_cmap("tab20")(i % 20)
            ax.scatter([rs[0]["kv_fraction"]], [mean], marker=markers.get(kind, "^"), s=80 if kind == "ours" else 55,
                       alpha=0.5 if smoke else 1.0, edgecolors=colour, facecolors="none" if few else colour,
                       label=f"{me} @{L}" + (f" ({', '.join(notes)})" if notes else ""))
        ax.set_xlabel("KV cache bytes / dense bf16 cache")
        ax.set_ylabel("mean RULER score (%)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title(f"{model}: RULER (offline tasks) vs KV bytes; hollow = fewer tasks, translucent = smoke",
                     fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_table(results: Path = RESULTS) -> Path:
    """``README.md`` (and ``ruler_vs_kv_bytes.png``) in ``results`` from every ``*.jsonl`` there; returns the README."""
    rows = []
    for f in sorted(Path(results).glob("*.jsonl")):
        rows += rows_store(f).rows()
    md = Path(results) / "README.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    text = render_table(rows)
    if plot(rows, Path(results) / "ruler_vs_kv_bytes.png"):
        text += "\n![mean RULER score vs KV bytes](ruler_vs_kv_bytes.png)\n"
    md.write_text(text, encoding="utf-8")
    return md
