"""Long-range copy through the cache: does a compressed cache still let the model find what it stored?

    python eval/copy_probe.py --model gemma3-270m --methods default=runs/gemma-default kv0185=runs/gemma-kv0185
    python eval/copy_probe.py --table          # eval/results/copy/README.md from the committed rows

Each held-out text (``lowrank_attn.harness.HELD_TEXTS``: WikiText-2 test, Dracula from token 60000) gives ``--tokens``
tokens A; BOS + A + A is fed through the method's cache in two chunks (``cachepath.copy_logprobs``), so the second
copy of A can be predicted only by attending to the first as the cache stored it. Reported on the second copy:
next-token KL to dense and top-1 accuracy (``cachepath.copy_check``, what ``compress`` reports), and NLL. Natural
text's next token mostly needs nearby tokens, so held-out perplexity and KL barely see a cache that loses what lies
a chunk back; retrieval (RULER's needles) is exactly that. Rows: ``eval/results/copy/<model>.jsonl`` (one per method and text, resumable).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowrank_attn.harness import HELD_TEXTS, REPO, ResultsStore, held_ids, stamp

OUT = REPO / "eval" / "results" / "copy"


def measure(model: str, methods: list[str], tokens: int, out: Path) -> None:
    import torch

    from lowrank_attn import load_compressed
    from lowrank_attn.cachepath import copy_check, copy_logprobs
    from lowrank_attn.models import load_model

    specs = [("dense", model)] + [_method(m) for m in methods]  # a bad spec fails before any model loads
    torch.set_num_threads(1)
    store = ResultsStore(out / f"{model}.jsonl", key=("method", "text", "tokens"))
    dense = load_model(model)
    tok = dense.tokenizer
    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    texts = {name: held_ids(tok, name, tokens) for name in HELD_TEXTS}
    ref = {name: copy_logprobs(dense.model, prefix, a) for name, a in texts.items()}
    for label, source in specs:
        if all(store.done((label, name, tokens)) for name in texts):
            continue
        lm, t0 = dense if label == "dense" else load_compressed(source), time.time()
        for name, a in texts.items():
            logp = ref[name] if label == "dense" else copy_logprobs(lm.model, prefix, a)
            check = copy_check(ref[name], logp, a)  # the KL and accuracies compress reports
            target = torch.tensor(a[1:], device=logp.device)
            store.append({"model": model, "method": label, "source": source, "text": name, "tokens": tokens,
                          "copy_kl": check["kl"], "copy_nll": float(-logp.gather(-1, target[:, None]).mean()),
                          "copy_acc": check["accuracy"], "wall_s": round(time.time() - t0, 1), **stamp()})
        print(f"[copy] {model} {label}: done in {time.time() - t0:.0f}s", flush=True)


def _method(spec: str) -> tuple[str, str]:
    """LABEL=CHECKPOINT_DIR -> (label, dir)."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"copy_probe: a method is LABEL=CHECKPOINT_DIR, got {spec!r}")
    return label, path


def table(out: Path) -> Path:
    lines = ["# Long-range copy through the cache", "", "Written by `python eval/copy_probe.py --table` (see its "
             "docstring). BOS + A + A through the cache in two chunks; on the second copy of A: next-token KL to "
             "dense, NLL, top-1 accuracy (%). Per text: wiki / dracula.", ""]
    for f in sorted(out.glob("*.jsonl")):
        rows = list(ResultsStore(f, key=("method", "text", "tokens")).latest().values())
        lines += [f"## {f.stem}", "", "| method | tokens | copy KL | copy NLL | copy accuracy | checkpoint | commit |",
                  "|---|---|---|---|---|---|---|"]
        by: dict[tuple, dict] = {}
        for r in rows:
            by.setdefault((r["method"], r["tokens"]), {})[r["text"]] = r
        for (method, n), rs in sorted(by.items(), key=lambda kv: (kv[0][0] != "dense", kv[0])):
            cell = lambda key, fmt: " / ".join(fmt(rs[t][key]) for t in HELD_TEXTS if t in rs)  # noqa: E731
            any_r = next(iter(rs.values()))
            lines.append(f"| {method} | {n} | {cell('copy_kl', lambda v: f'{v:.4f}')} | "
                         f"{cell('copy_nll', lambda v: f'{v:.3f}')} | {cell('copy_acc', lambda v: f'{100 * v:.1f}')} | "
                         f"{any_r.get('source', '-')} | {any_r.get('commit')} |")
        lines.append("")
    md = out / "README.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the dense model (a short name); its checkpoints in --methods")
    ap.add_argument("--methods", nargs="*", default=[], help="LABEL=CHECKPOINT_DIR, compressed from --model")
    ap.add_argument("--tokens", type=int, default=960, help="tokens of each text A (the cache holds 2×)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true", help="only tabulate the rows in --out")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.table:
        if not a.model:
            raise SystemExit("copy_probe: --model is required (or --table)")
        measure(a.model, a.methods, a.tokens, a.out)
    print(table(a.out))


if __name__ == "__main__":
    main()
