"""``lowrank-attn eval``: perplexity through lm-eval, through the KV cache (cache-ppl), passkey retrieval, or RULER's
offline tasks through lm-eval; with ``--dense``, the dense model beside it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer

from ..errors import LowrankAttnError
from .app import DEVICE_MAP_HELP, DTYPE_HELP, MAX_MEMORY_HELP, MODEL_HELP, OFFLOAD_HELP, app, run_command, write_json


def _is_checkpoint(path) -> bool:
    from ..checkpoint import is_checkpoint

    return is_checkpoint(path)


def _load_any(model: str, device: str, dtype: Optional[str] = None, device_map: Optional[str] = None, **placed):
    """A compressed checkpoint directory (has lowrank_attn.json; default dtype: its own; a delta's base placed by
    ``device_map``/``placed``) or anything load_model accepts (default dtype: float32)."""
    from ..checkpoint import load_compressed
    from ..models import load_model

    if _is_checkpoint(model):
        return load_compressed(model, device=device, dtype=dtype, device_map=device_map, **placed)
    return load_model(model, device=device, dtype=dtype or "float32", device_map=device_map, **placed)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="A compressed checkpoint directory, or " + MODEL_HELP),
    task: str = typer.Option("wikitext2-local", help="wikitext2-local (offline, ../shared/data), textppl (perplexity of "
                             "--text FILE), a path to any text file, wikitext (lm-eval's stock task, online), passkey "
                             "(key retrieval from synthetic prompts of --max-length tokens at --depths), or cache-ppl "
                             "(token perplexity through the KV cache: windows of --max-length tokens of --text fed in "
                             "--chunk-token chunks, so later tokens attend to what the cache stored; K+V bytes measured), "
                             "or ruler (lm-eval's RULER, its offline tasks at --max-length tokens, --limit samples "
                             "each, default 10; needs wonderwords and nltk, the package's ruler extra)."),
    text_file: Optional[str] = typer.Option(None, "--text-file", "--text", show_default='../shared/data/wikitext2-test.raw for wikitext2-local', help="Text file for wikitext2-local (default "
                                            "../shared/data/wikitext2-test.raw) or textppl."),
    max_length: int = typer.Option(2048, help="Context length of lm-eval's rolling windows; for passkey and ruler, the "
                                   "prompt length in tokens (ruler: at least 1024)."),
    limit: Optional[int] = typer.Option(None, show_default='none: every document', help="Only the first N documents."),
    depths: str = typer.Option("8", help="passkey: a number of evenly spaced depths in [0, 1], or comma-separated fractions."),
    samples: int = typer.Option(1, help="passkey: prompts (keys) per depth."),
    seed: int = typer.Option(0, help="passkey: seed of the keys (and of the filler offset in --filler)."),
    filler: Optional[str] = typer.Option(None, show_default='neutral sentences repeated', help="passkey: filler text file (default: neutral sentences repeated)."),
    dense: Optional[str] = typer.Option(None, show_default='none: no comparison', help="Dense model to compare with: adds its perplexity, and on one window "
                                        "of the text (at most 2048 tokens) the next-token KL vs dense and the attention "
                                        "KL per row (the certificate's quantity, measured on this text)."),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = typer.Option(None, show_default="auto: a checkpoint's own dtype, float32 otherwise", help=DTYPE_HELP + " Default: a checkpoint's own dtype, float32 otherwise."),
    device_map: Optional[str] = typer.Option(None, "--device-map", show_default='none: --device', help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", show_default='none: no cap', help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", show_default='none: no offloading', help=OFFLOAD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", show_default='none: print only', help="Write the results JSON here."),
    chunk: int = typer.Option(512, help="cache-ppl: tokens per forward through the cache."),
    ruler_tasks: Optional[str] = typer.Option(None, "--ruler-tasks", show_default="the six offline tasks",
                                              help="ruler: comma-separated, among niah_single_1, niah_multikey_2, "
                                              "niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", show_default="none: the model's own cache",
                                           help="cache-ppl and ruler: evaluate a peer cache on MODEL instead (quanto-4bit, "
                                           "quanto-2bit, hqq-4bit, hqq-2bit: transformers' QuantizedCache at its "
                                           "defaults; quanto-4bit-kivi, quanto-2bit-kivi: keys per channel, "
                                           "axis_key=-1, cache-ppl only)."),
    peers: Optional[str] = typer.Option(None, "--peers", show_default="none",
                                        help="cache-ppl and ruler, with a checkpoint and --dense: also run these peer "
                                        "caches (comma-separated, names as --kv-cache) on the dense model, on the same "
                                        "windows or prompts: quality and K+V bytes of each beside the checkpoint's."),
    prefill: Optional[str] = typer.Option(None, show_default="compressed for perplexity and passkey, the checkpoint's "
                                          "own (exact, post-rope) for cache-ppl and ruler",
                                          help="How a compressed checkpoint's forwards attend their own tokens: "
                                          "compressed (over what the cache stores) or exact (densely, the cached ones "
                                          "as stored, as QuantizedCache runs; the cache is the same). Perplexity and "
                                          "passkey score a text in one forward, so only compressed measures the "
                                          "compression there (exact gives the dense score); cache-ppl measures both."),
):
    """Perplexity through lm-eval's own harness (HFLM over the model object), or through the KV cache (cache-ppl)."""

    opts = SimpleNamespace(**locals())
    run_command(lambda: _eval(opts))


# --task names (any other value is a path to a text file)
CLI_TASKS = ("wikitext2-local", "textppl", "wikitext", "passkey", "cache-ppl", "ruler")


def _check_args(a: SimpleNamespace) -> None:
    """Refuse an unknown task, an unusable --out and bad passkey arguments before loading anything."""
    from ..evaluate import LOCAL_TASKS, looks_like_text_path
    from ..fsutil import check_writable_target

    if a.task not in CLI_TASKS and a.task not in LOCAL_TASKS and not looks_like_text_path(a.task):
        raise LowrankAttnError(f"unknown --task {a.task!r}: choose from {', '.join(CLI_TASKS)}, or give a path to a "
                               "text file")

    if a.out is not None:  # refuse an unusable --out before evaluating, not after
        if a.out.is_dir():
            raise LowrankAttnError(f"--out {a.out} is a directory; give a file name for the results JSON")
        check_writable_target(a.out, overwrite=True)  # its parent must be, or can become, a directory
    from ..runtime.surgery import PREFILL

    if a.prefill is not None and a.prefill not in PREFILL:
        raise LowrankAttnError(f"--prefill must be one of {', '.join(PREFILL)}, got {a.prefill!r}")
    if a.task == "ruler":
        from ..harness.ruler import check_limit, check_task_packages, parse_lengths, parse_tasks

        parse_tasks(a.ruler_tasks)
        parse_lengths([a.max_length])
        if a.limit is not None:
            check_limit(a.limit)
        check_task_packages()
        if a.dense and not _is_checkpoint(a.model) and not a.kv_cache:
            raise LowrankAttnError(f"--dense beside the dense model {a.model}: give a compressed checkpoint or "
                                   "--kv-cache PEER to compare with it")
        if a.kv_cache and _is_checkpoint(a.model):
            raise LowrankAttnError("--kv-cache runs a peer cache on a dense model, not on a compressed checkpoint")
    if a.kv_cache:
        from ..peers import check_peer

        check_peer(a.kv_cache, any_length=a.task == "ruler")  # before loading anything
    if a.peers is not None:
        a.peers = _peer_list(a)
    if a.task == "passkey":
        from ..longctx import parse_depths

        parse_depths(a.depths)  # refuse bad depths before loading anything
        if a.max_length < 2:
            raise LowrankAttnError(f"--max-length must be at least 2 tokens, got {a.max_length}")
        if a.samples < 1:
            raise LowrankAttnError(f"--samples: need at least 1 prompt per depth, got {a.samples}")


def _peer_list(a: SimpleNamespace) -> list[str]:
    """--peers as a list of known peers whose backends are installed, checked before anything loads."""
    from ..peers import PEERS, check_peer

    if a.task not in ("cache-ppl", "ruler"):
        raise LowrankAttnError(f"--peers runs with --task cache-ppl or ruler, not {a.task}")
    if not (_is_checkpoint(a.model) and a.dense):
        raise LowrankAttnError("--peers runs the peer caches on the dense model beside a compressed checkpoint: give "
                               "a checkpoint and --dense MODEL (a dense model alone: --kv-cache PEER)")
    names = list(dict.fromkeys(p.strip() for p in a.peers.split(",") if p.strip()))
    if not names:
        raise LowrankAttnError(f"--peers: name at least one peer cache ({', '.join(PEERS)})")
    for name in names:
        check_peer(name, any_length=a.task == "ruler")
    return names


def _load_pair(a: SimpleNamespace):
    """(the model, the dense reference or None); a reference that is a checkpoint, or another model's, is refused."""
    lm = _load_any(a.model, a.device, a.dtype, a.device_map, max_memory=a.max_memory, offload_folder=a.offload_folder)
    if not a.dense:
        return lm, None
    from ..checkpoint import check_same_source, read_sidecar, source_fingerprint

    if _is_checkpoint(a.dense):
        raise LowrankAttnError(f"--dense {a.dense} is a compressed checkpoint; pass the dense model it was made from")
    dtype = a.dtype or str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    ref = _load_any(a.dense, a.device, dtype, a.device_map, max_memory=a.max_memory,
                    offload_folder=a.offload_folder / "dense" if a.offload_folder else None)  # its own offload
    # compress fingerprinted the source in the dtype it ran in: a float32 compress saved in half precision is checked
    # against the dense model read in float32 (once, on the CPU), not in the half precision it is compared in
    seen = (read_sidecar(a.model).get("recipe") or {}).get("dtype") if _is_checkpoint(a.model) else None
    if seen and seen != dtype and source_fingerprint(ref) != source_fingerprint(lm):
        check_same_source(lm, _load_any(a.dense, "cpu", seen))
    else:
        check_same_source(lm, ref)
    return lm, ref


def _eval(a: SimpleNamespace) -> None:
    _check_args(a)
    lm, ref = _load_pair(a)  # a mismatched pair is refused before any evaluation
    if a.kv_cache or a.peers:  # a model QuantizedCache cannot take (sliding-window layers): refused before any run
        from ..peers import check_model

        for peer in [a.kv_cache] if a.kv_cache else a.peers:
            check_model(peer, (ref or lm).model)
    if a.prefill is not None:  # cache-ppl runs the model as set; the single-forward tasks are told (compressed)
        from ..runtime.surgery import set_prefill

        try:
            set_prefill(lm.model, a.prefill)
        except ValueError as e:
            raise LowrankAttnError(f"--prefill {a.prefill}: {a.model}: {e}") from None
    if a.task == "passkey":
        return _passkey_eval(a.model, lm, ref, a.max_length, a.depths, a.samples, a.seed, a.filler, a.out,
                             a.prefill or "compressed")
    if a.task == "cache-ppl":
        return _cache_ppl_eval(a.model, lm, ref, a.text_file, a.max_length, a.limit, a.chunk, a.kv_cache, a.peers,
                               a.out)
    if a.task == "ruler":
        return _ruler_eval(a, lm, ref)
    if a.task == "textppl":
        if not a.text_file:
            raise LowrankAttnError("--task textppl needs --text FILE")
        from ..evaluate import TEXTPPL_TASK

        task_name = TEXTPPL_TASK
    else:
        task_name = a.task
    _ppl_eval(a, lm, ref, task_name)


def _ppl_eval(a: SimpleNamespace, lm, ref, task_name: str) -> None:
    """lm-eval perplexity of ``lm`` (and of the dense ``ref``, with the next-token and attention KL to it)."""
    from ..evaluate import perplexity

    kw = dict(task=task_name, text_file=a.text_file, max_length=a.max_length, limit=a.limit, progress=True)
    res = perplexity(lm.model, lm.tokenizer, desc="compressed" if _is_checkpoint(a.model) else a.model,
                     prefill=a.prefill or "compressed", **kw)
    summary = {"model": a.model, "task": res["task"], "word_perplexity": res["word_perplexity"],
               "byte_perplexity": res["byte_perplexity"], "bits_per_byte": res["bits_per_byte"],
               "documents": res["documents"], "tokens": res["tokens"], "token_perplexity": res["token_perplexity"],
               "max_length": a.max_length, "forward": res["forward"], "prefill": res["prefill"]}
    line = f"{a.model}: word perplexity {res['word_perplexity']:.4f} on {res['task']} ({res['documents']} documents)"
    if ref is not None:
        from ..heldout import attention_kl, next_token_kl

        dres = perplexity(ref.model, ref.tokenizer, desc="dense", **kw)
        kl_file = res.get("text_file") or a.text_file
        kl_len = min(a.max_length, 2048)
        tok_kl, kl_tokens = next_token_kl(ref, lm, text_file=kl_file, max_length=kl_len)
        att_kl = attention_kl(ref, lm, text_file=kl_file, max_length=kl_len)
        summary.update(dense_word_perplexity=dres["word_perplexity"], next_token_kl=tok_kl,
                       attention_kl_per_row=att_kl, kl_tokens=kl_tokens)
        line += (f"; dense {dres['word_perplexity']:.4f} ({100 * (res['word_perplexity'] / dres['word_perplexity'] - 1):+.2f}%)"
                 f"\non the first {kl_tokens} tokens: next-token KL vs dense {tok_kl:.5f}; attention KL per row "
                 f"vs dense {att_kl:.5f} (the certificate's quantity, which compress measured on held-out "
                 "calibration text)")
    typer.echo(line)
    write_json(a.out, {"summary": summary, "lm_eval": res["lm_eval"]})


def _cache_ppl_eval(name, lm, ref, text_file, length, limit, chunk, kv_cache, peers, out) -> None:
    """``eval --task cache-ppl``: token perplexity through the cache and its K/V bytes; with --dense, the dense
    model through its own cache on the same windows (the bytes reference), and each of ``peers`` (transformers'
    ``QuantizedCache``) on the dense model."""

    from ..cachepath import cache_perplexity
    from ..evaluate import WIKITEXT_DEFAULT_FILE, resolve_text_file
    from ..longctx import check_length
    from ..peers import make_cache
    from ..runtime.surgery import prefill_of
    from ..texts import load_texts, token_windows

    if chunk < 1:
        raise LowrankAttnError(f"--chunk must be at least 1 token, got {chunk}")
    if limit is not None and limit < 1:
        raise LowrankAttnError(f"--limit must be a positive number of windows, got {limit}")
    check_length(lm.model, length)  # a window beyond the model's positions: one line, not a long wrong run
    factory = (lambda m: make_cache(kv_cache, m)) if kv_cache else None  # the peer was checked by _check_args
    wins = [w.input_ids for w in token_windows(lm.tokenizer, load_texts([str(resolve_text_file(text_file or WIKITEXT_DEFAULT_FILE))]), seq_len=length)
            if len(w.input_ids) == length][: limit or None]
    if not wins:
        raise LowrankAttnError(f"the text holds no full window of {length} tokens; lower --max-length")
    label = kv_cache or ("compressed" if _is_checkpoint(name) else name)
    res = cache_perplexity(lm.model, wins, chunk=chunk, cache_factory=factory, progress=True, desc=f"{label} (cache)")
    doc = {"summary": {"model": name, "task": "cache-ppl", "kv_cache": kv_cache, "max_length": length,
                       "prefill": prefill_of(lm.model), **res}}
    b = res["bytes_per_token"]
    line = (f"{name}{' with ' + kv_cache if kv_cache else ''}: token perplexity through the cache "
            f"{res['token_perplexity']:.4f} ({res['windows']} windows of {length} tokens, chunks of {chunk}); "
            f"KV bytes per token (bf16 floats) K {b['k']:.0f} + V {b['v']:.0f}")
    if ref is not None:
        dres = cache_perplexity(ref.model, wins, chunk=chunk, progress=True, desc="dense (cache)")
        doc["summary"]["dense"] = dres
        line += f"\ndense {dres['token_perplexity']:.4f} ({_vs_dense(res, dres)})"
        for peer in peers or ():  # on the dense model, the same windows
            pres = cache_perplexity(ref.model, wins, chunk=chunk, cache_factory=lambda m, p=peer: make_cache(p, m),
                                    progress=True, desc=f"{peer} (cache)")
            doc["summary"].setdefault("peers", {})[peer] = pres
            line += (f"\n{peer} (QuantizedCache on the dense model): token perplexity through the cache "
                     f"{pres['token_perplexity']:.4f} ({_vs_dense(pres, dres)})")
    typer.echo(line)
    write_json(out, doc)


def _vs_dense(res: dict, dres: dict) -> str:
    """A cache-ppl result against dense's on the same windows: perplexity change, K+V bytes vs the bf16 cache."""
    b, db = res["bytes_per_token"], dres["bytes_per_token"]
    return (f"{100 * (res['token_perplexity'] / dres['token_perplexity'] - 1):+.2f}%); KV bytes vs the dense bf16 "
            f"cache {b['total'] / db['total']:.1%} (K {b['k'] / db['k']:.1%}, V {b['v'] / db['v']:.1%}")


def _passkey_eval(name, lm, ref, length, depths, samples, seed, filler, out, prefill) -> None:
    """``eval --task passkey``: score ``lm`` (and the dense ``ref``) on the same seeded prompts; print, write --out."""

    from ..longctx import format_passkey, run_passkey

    kw = dict(samples=samples, seed=seed, filler=filler)
    res = run_passkey(lm.model, lm.tokenizer, length, depths, desc=f"passkey {name}", prefill=prefill, **kw)
    line = f"{name}: passkey at {length} tokens {format_passkey(res['summary'])}"
    doc = {"summary": {"model": name, "task": "passkey", "prefill": prefill, **res["summary"]}, "passkey": res}
    if ref is not None:
        dres = run_passkey(ref.model, ref.tokenizer, length, depths, desc="passkey dense", **kw)
        line += f"; dense {format_passkey(dres['summary'])}"
        doc["summary"]["dense"] = dres["summary"]
        doc["dense_passkey"] = dres
    typer.echo(line)
    write_json(out, doc)


def _ruler_eval(a: SimpleNamespace, lm, ref) -> None:
    """``eval --task ruler``: lm-eval's offline RULER tasks at --max-length for the model (a checkpoint served as
    it is set, by default prompts exact; or the dense model, with --kv-cache through a peer cache) and the dense
    ``ref``, on the same seeded prompts; a table of scores and K+V bytes (``harness.ruler_run.evaluate_rows``)."""
    from ..harness.ruler import DEFAULT_LIMIT
    from ..harness.ruler_run import Method, evaluate_rows
    from ..runtime.surgery import prefill_of

    if _is_checkpoint(a.model):
        main = Method(Path(a.model).name, "ours", path=a.model, prefill=prefill_of(lm.model))
    else:
        main = Method(a.kv_cache, "peer", peer=a.kv_cache) if a.kv_cache else Method("dense", "dense")
    methods, loaded = [main], {main.label: (lm.model, lm.tokenizer)}
    if ref is not None:  # the peers run on it
        methods = [Method("dense", "dense"), main] + [Method(p, "peer", peer=p) for p in a.peers or ()]
        loaded["dense"] = (ref.model, ref.tokenizer)
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    rows = evaluate_rows(model=a.dense or a.model, methods=methods, tasks=a.ruler_tasks, length=a.max_length,
                         limit=a.limit or DEFAULT_LIMIT, device=a.device, dtype=dtype, loaded=loaded)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [f"RULER at {a.max_length} tokens, {rows[0]['n']} samples per task (lm-eval's string match, %):",
             "| method | " + " | ".join(tasks) + " | mean | KV bytes vs bf16 dense |",
             "|---" * (len(tasks) + 3) + "|"]
    summary = {"model": a.model, "task": "ruler", "max_length": a.max_length, "prefill": main.prefill, "methods": {}}
    for m in methods:
        mine = {r["task"]: r for r in rows if r["method"] == m.label}
        scores = [float("nan") if mine[t]["score"] is None else 100 * mine[t]["score"] for t in tasks]
        mean = sum(scores) / len(scores)
        frac = mine[tasks[0]]["kv_fraction"]
        summary["methods"][m.label] = {"scores": dict(zip(tasks, scores)), "mean": mean, "kv_fraction": frac}
        lines.append(f"| {m.label} | " + " | ".join(f"{x:.1f}" for x in scores) + f" | {mean:.1f} | {frac:.1%} |")
    typer.echo("\n".join(lines))
    write_json(a.out, {"summary": summary, "rows": rows})
