"""The long-context report (``eval/long_context.py``): from the points of :func:`.long_context.run_long`, one row
per method (:func:`summarize`), and ``long.json``, ``long.md`` and ``ppl_vs_length.png`` in the run's directory
(:func:`write_report`; :func:`rewrite_report` redoes them from ``long.jsonl`` and ``long.json``, no model loaded).

Stdlib at module level; matplotlib is imported by :func:`plot`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowrankAttnError
from .long_context import load_points
from .provenance import git_commit


def summarize(points: list[dict], meta: dict) -> list[dict]:
    """One row per method: token ppl and change vs dense per length, passkey retrieved/total (and per depth)."""
    from ..longctx import summarize_passkey

    methods = list(dict.fromkeys([*meta["methods"], *(p["method"] for p in points)]))
    ppl = {(p["method"], p["length"]): p for p in points if p["kind"] == "ppl"}
    kbytes = {p["method"]: p for p in points if p["kind"] == "kbytes" and "k_bytes_per_token_bf16" in p}
    rows = []
    for m in methods:
        row = {"method": m, "ppl": {}, "ppl_vs_dense_pct": {}}
        for n in meta["lengths"]:
            p, d = ppl.get((m, n)), ppl.get(("dense", n))
            if p:
                row["ppl"][str(n)] = p["token_perplexity"]
                if d:
                    row["ppl_vs_dense_pct"][str(n)] = 100 * (p["token_perplexity"] / d["token_perplexity"] - 1)
        pk = [p for p in points if p["kind"] == "passkey" and p["method"] == m and p["length"] == meta["passkey_length"]]
        row["passkey"] = summarize_passkey(pk) if pk else None
        kb, dense_kb = kbytes.get(m), kbytes.get("dense")
        if kb and dense_kb:  # against a bf16 dense cache (what people serve), on the longest window
            row["k_bytes_per_token_bf16"] = kb["k_bytes_per_token_bf16"]
            row["k_bytes_vs_bf16_dense"] = kb["k_bytes_per_token_bf16"] / dense_kb["k_bytes_per_token_bf16"]
        rows.append(row)
    return rows


def pair(exact: list[int], digits: list[int]) -> str:
    """'k/n · k/n' (exact match · key digits); one prompt: '1 · 1'."""
    return f"{exact[0]} · {digits[0]}" if exact[1] == 1 else f"{exact[0]}/{exact[1]} · {digits[0]}/{digits[1]}"


def markdown(rows: list[dict], meta: dict) -> str:
    ls = meta["lengths"]
    lines = [f"# {meta['model']}: long context", "",
             f"Token perplexity on one held-out document ({meta['eval_tokens']} tokens of `{Path(meta['text']).name}` "
             f"after the first {meta['skip_tokens']}), lm-eval rolling windows of L tokens; change vs dense. "
             f"Passkey: teacher-forced exact match of a 5-digit key at {len(meta['depths'])} depths × "
             f"{meta['samples']} at {meta['passkey_length']} tokens. K bytes: the cache measured after a forward over "
             f"the {meta.get('k_bytes_probe_tokens', 1024)}-token document, floats counted at 2 bytes (what a bf16 model "
             "holds; packed codes at their size, scales and exact keys included), against the dense bf16 cache.", "",
             "Passkey cells: exact match · key digits right (the digits of the greedy answer are the key's, "
             "whatever word the model puts before the number: `longctx.key_digits_retrieved`).", "",
             "| method | K bytes vs bf16 dense | " + " | ".join(f"ppl @ {n}" for n in ls) + f" | passkey @ {meta['passkey_length']} |",
             "|---|---|" + "---|" * len(ls) + "---|"]
    for r in rows:
        cells = []
        for n in ls:
            v, d = r["ppl"].get(str(n)), r["ppl_vs_dense_pct"].get(str(n))
            cells.append("" if v is None else f"{v:.3f}" if r["method"] == "dense" else f"{v:.3f} ({d:+.1f}%)" if d is not None else f"{v:.3f}")
        pk = r["passkey"]
        kb = r.get("k_bytes_vs_bf16_dense")
        pk_cell = "" if not pk else pair([pk["retrieved"], pk["total"]], [pk["key_digits"], pk["total"]])
        kb_cell = "" if kb is None else f"{kb:.3f}"
        lines.append(f"| {r['method']} | {kb_cell} | " + " | ".join(cells) + f" | {pk_cell} |")
    lines += passkey_by_depth(rows, meta)
    if not meta.get("complete", True):
        lines += ["", "**Incomplete**: some points are missing (run again to resume)."]
    return "\n".join(lines) + "\n"


def passkey_by_depth(rows: list[dict], meta: dict) -> list[str]:
    """The per-depth passkey table (no lines without passkey rows)."""
    pk_rows = [r for r in rows if r["passkey"]]
    if not pk_rows:
        return []
    depths = list(pk_rows[0]["passkey"]["by_depth"])
    lines = ["", f"Passkey at {meta['passkey_length']} tokens, retrieved per depth (0 = just after the instruction, "
             "1 = just before the question), exact match · key digits (retrieved, of the prompts at that depth):", "",
             "| method | " + " | ".join(f"{float(d):.2f}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for r in pk_rows:
        bd, dd = r["passkey"]["by_depth"], r["passkey"]["by_depth_digits"]
        lines.append(f"| {r['method']} | " + " | ".join(pair(bd[d], dd[d]) if d in bd else "" for d in depths) + " |")
    return lines


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        if r["method"] == "dense" or not r["ppl_vs_dense_pct"]:
            continue
        xs = [int(n) for n in r["ppl_vs_dense_pct"]]
        ax.plot(xs, list(r["ppl_vs_dense_pct"].values()), marker="o", label=r["method"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(meta["lengths"], [str(n) for n in meta["lengths"]])
    ax.set_xlabel("context length (tokens, lm-eval window)")
    ax.set_ylabel("token perplexity vs dense (%)")
    vals = [v for r in rows if r["method"] != "dense" for v in r["ppl_vs_dense_pct"].values()]
    if vals and max(abs(v) for v in vals) > 50:  # a collapse next to small changes: both readable
        ax.set_yscale("symlog", linthresh=10)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g}%"))
    ax.set_title(f"{meta['model']}: perplexity change vs context length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(points: list[dict], meta: dict, out: Path) -> list[str]:
    """``long.json`` (meta, the commit writing it, rows, points), ``long.md`` and the plot in ``out``; returns the
    names of the report's files."""
    rows = summarize(points, meta)
    commit = git_commit()
    (out / "long.json").write_text(json.dumps({**meta, "commit": commit, "rows": rows, "points": points}, indent=1,
                                              default=str) + "\n")
    (out / "long.md").write_text(markdown(rows, meta))
    files = ["long.jsonl", "long.json", "long.md"]
    if points and plot(rows, meta, out / "ppl_vs_length.png"):
        files.append("ppl_vs_length.png")
    return files


def rewrite_report(out: Path) -> list[str]:
    """:func:`write_report` again from ``out``'s ``long.jsonl`` and the meta in its ``long.json`` (no model loaded)."""
    out = Path(out)
    if not (out / "long.json").is_file():
        raise LowrankAttnError(f"{out / 'long.json'} not found: run the report first")
    meta = {k: v for k, v in json.loads((out / "long.json").read_text()).items() if k not in ("rows", "points", "commit")}
    return write_report(list(load_points(out / "long.jsonl").values()), meta, out)
