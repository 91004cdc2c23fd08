"""Perplexity of an in-memory causal LM through lm-eval's own harness.

Nothing here computes a perplexity: :func:`perplexity` wraps the model in lm-eval's
``HFLM(pretrained=model, tokenizer=tokenizer, ...)`` and runs ``lm_eval.simple_evaluate``
on a task whose metrics are lm-eval's own ``word_perplexity``, ``byte_perplexity`` and
``bits_per_byte`` over ``loglikelihood_rolling`` requests (the same machinery, and the same
``process_results``, as lm-eval's stock ``wikitext`` task).

Tasks (YAMLs in ``eval/tasks/`` at the repository root, see its README.md):

``wikitext2-local``
    WikiText-2 raw test read from a local file (default ``../shared/data/wikitext2-test.raw``,
    relative to the current directory or else to the repository root).  Documents are cut
    exactly as lm-eval's stock ``wikitext`` task gets them from
    ``EleutherAI/wikitext_document_level``: a new document starts at every top-level heading
    line `` = Title = `` (not `` = = Section = = ``), and the stock
    ``wikitext_detokenizer`` / ``process_results`` are used, so the numbers are the stock
    task's numbers, offline.
``lowrank_textppl``
    Any local UTF-8 text file.  Documents rule ("paragraphs"): the file is cut only at blank
    lines; consecutive paragraphs are packed in order into one document until it holds at
    least ``min_chars`` characters (default 10000); a final remainder shorter than that joins
    the previous document; each document is stripped of surrounding whitespace and scored
    as is (no detokenizer).  ``min_chars=0`` makes every paragraph a document; a huge value
    makes the whole file one document.
``wikitext``
    lm-eval's stock task (downloads from the Hugging Face hub; for online users).

The text file reaches the task through lm-eval's task *metadata*: ``TaskManager(include_path=
eval/tasks, metadata={"text_file": PATH, ...})`` here, ``--metadata '{"text_file": "PATH"}'``
on lm-eval's command line.  The task's ``custom_dataset`` (``documents.load_documents``) reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from .documents import (  # noqa: F401  (the tasks' custom_dataset is evaluate.load_documents)
    DEFAULT_MIN_CHARS, load_documents, read_documents, split_paragraphs, split_wikitext,
)
from .errors import LowrankAttnError, TextError
from .texts import resolve_text_file

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO_ROOT / "eval" / "tasks"
TEXTPPL_TASK = "lowrank_textppl"
WIKITEXT_LOCAL_TASK = "wikitext2-local"
WIKITEXT_DEFAULT_FILE = "../shared/data/wikitext2-test.raw"
LOCAL_TASKS = (WIKITEXT_LOCAL_TASK, TEXTPPL_TASK)
STOCK_TASKS = ("wikitext",)


def looks_like_text_path(name: str) -> bool:
    """Whether a task name is meant as a text file: it exists, has a directory part or a text suffix."""
    return Path(name).exists() or os.sep in name or "/" in name or Path(name).suffix.lower() in (
        ".txt", ".raw", ".md", ".text")


# ----------------------------------------------------------------------------- running lm-eval


def task_spec(task: str, text_file: str | os.PathLike | None, min_chars: int | None) -> tuple[str, dict | None]:
    """(lm-eval task name, metadata) for a task name or a text-file path; validates the file first
    so that bad input fails here with one line rather than deep inside lm-eval."""
    if not isinstance(task, (str, os.PathLike)) or not str(task).strip():
        raise TextError(f"task must be a task name or a text file path, got {task!r}")
    name = str(task)
    if name in STOCK_TASKS:
        if text_file is not None:
            raise TextError(f"task '{name}' is lm-eval's stock (online) task and takes no text_file; "
                            f"use '{WIKITEXT_LOCAL_TASK}' for a local WikiText file")
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")]
        if offline:
            raise TextError(f"task '{name}' downloads its data from the Hugging Face hub, but {offline[0]} is set; "
                            f"use '{WIKITEXT_LOCAL_TASK}' (offline) or unset {offline[0]}")
        return name, None
    if name == WIKITEXT_LOCAL_TASK:
        path = resolve_text_file(text_file if text_file is not None else WIKITEXT_DEFAULT_FILE)
        read_documents(path, split="wikitext")
        return name, {"text_file": str(path)}
    if name == TEXTPPL_TASK:
        if text_file is None:
            raise TextError(f"task '{TEXTPPL_TASK}' needs text_file=PATH (or pass the path as the task)")
        file = text_file
    elif text_file is None and looks_like_text_path(name):
        file = name
    else:
        known = ", ".join((*LOCAL_TASKS, *STOCK_TASKS))
        raise TextError(f"unknown evaluation task '{name}': choose from {known}, or give a path to a text file")
    mc = DEFAULT_MIN_CHARS if min_chars is None else int(min_chars)
    path = resolve_text_file(file)
    read_documents(path, split="paragraphs", min_chars=mc)
    return TEXTPPL_TASK, {"text_file": str(path), "split": "paragraphs", "min_chars": mc}


def task_manager(metadata: dict | None = None, *, include_defaults: bool = False):
    """lm-eval TaskManager that knows this repository's local tasks (``eval/tasks``)."""
    from lm_eval.tasks import TaskManager

    if not TASKS_DIR.is_dir():
        raise LowrankAttnError(f"lm-eval task directory not found: {TASKS_DIR} (eval/tasks ships with the repository)")
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=metadata)


@contextlib.contextmanager
def _quiet(verbose: bool, progress: bool = False):
    """Unless ``verbose``: lm-eval's loggers at ERROR and, unless ``progress``, its progress bars off.
    Display only -- the bars are lm-eval modules' ``tqdm`` names, swapped for a wrapper forcing
    ``disable=True`` and restored afterwards."""
    if verbose:
        yield
        return
    import sys

    import tqdm as _tqdm

    names = ("lm_eval", "datasets")
    saved_levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    real = _tqdm.tqdm

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return real(*args, **kwargs)

    swapped = [] if progress else [m for name, m in list(sys.modules.items())
                                   if name.startswith("lm_eval") and m is not None and getattr(m, "tqdm", None) is real]
    for m in swapped:
        m.tqdm = silent
    try:
        yield
    finally:
        for m in swapped:
            m.tqdm = real
        for n, lvl in saved_levels.items():
            logging.getLogger(n).setLevel(lvl)


def _labelled_progress(lm, label: str) -> None:
    """One labelled progress bar over the rolling windows of ``lm.loglikelihood_rolling`` (lm-eval's own bars,
    one unlabelled "Running loglikelihood requests" bar per window, are off): the instance's methods are wrapped."""
    from lm_eval import utils
    from tqdm import tqdm

    rolling, score = lm.loglikelihood_rolling, lm._loglikelihood_tokens
    state: dict = {}

    def loglikelihood_rolling(requests, disable_tqdm: bool = False):
        total = sum(len(list(utils.get_rolling_token_windows(
            token_list=lm.tok_encode(req.args[0]), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length,
            context_len=1))) for req in requests)
        with tqdm(total=total, desc=label, unit="window", disable=disable_tqdm) as bar:
            state["bar"] = bar
            try:
                return rolling(requests, disable_tqdm=True)
            finally:
                state.pop("bar", None)

    def _loglikelihood_tokens(requests, *args, **kwargs):
        out = score(requests, *args, **kwargs)
        if "bar" in state:
            state["bar"].update(len(requests))
        return out

    lm.loglikelihood_rolling = loglikelihood_rolling
    lm._loglikelihood_tokens = _loglikelihood_tokens


def _offline_env(local: bool) -> None:
    if local:  # nothing remote is meant: fail fast instead of ~46 s of hub retries (DESIGN §8)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _jsonable(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def make_hflm(model, tokenizer, *, max_length: int = 2048, batch_size: int = 1, add_bos_token: bool | None = None):
    """lm-eval's own HFLM around an in-memory model. ``add_bos_token=None`` follows the tokenizer
    (``texts.bos_prefix``: True for Gemma-3, False for SmolLM2), which is also what a plain
    ``HFLM(pretrained=model, tokenizer=tokenizer)`` does."""
    from lm_eval.models.huggingface import HFLM

    from .texts import bos_prefix

    if add_bos_token is None:
        add_bos_token = bool(bos_prefix(tokenizer))
    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=int(max_length), batch_size=int(batch_size),
                add_bos_token=add_bos_token)


def perplexity(model, tokenizer, *, task: str | os.PathLike = WIKITEXT_LOCAL_TASK,
               text_file: str | os.PathLike | None = None, max_length: int = 2048, batch_size: int = 1,
               limit: int | None = None, device: str | None = None, min_chars: int | None = None,
               add_bos_token: bool | None = None, verbose: bool = False, progress: bool = False,
               desc: str | None = None, prefill: str = "compressed") -> dict:
    """Word/byte perplexity and bits per byte of ``model`` through lm-eval's harness.

    ``task``: ``"wikitext2-local"`` (``text_file`` overrides its default file), a path to a text file (task
    ``lowrank_textppl``, documents cut by the "paragraphs" rule with ``min_chars``), ``"lowrank_textppl"`` with
    ``text_file``, or ``"wikitext"`` (stock, online). ``limit`` caps the number of documents (first N, in file
    order). ``device`` moves the model there first (in place); by default it stays where it is.
    ``add_bos_token=None`` follows the tokenizer (see :func:`make_hflm`). For the local tasks, HF_HUB_OFFLINE and
    HF_DATASETS_OFFLINE are set to 1 in ``os.environ`` unless already set (no hub call is made for a local file
    either way). lm-eval's logging and progress bars are off unless ``verbose``; ``progress`` shows one bar of our
    own instead, over the rolling windows, labelled ``desc`` (e.g. "dense", "compressed") and the task (long
    windows on a CPU take minutes). ``max_length`` beyond the model's positions is refused (one line) rather than
    silently cut. ``prefill`` (``runtime.surgery.prefill_as``): ``compressed`` scores every token over what the
    cache stores (the compression); ``exact``, the dense score.

    Returns ``{"task", "text_file", "word_perplexity", "byte_perplexity", "bits_per_byte", "documents", "tokens",
    "words", "bytes", "max_length", "add_bos_token", "loglikelihood", "token_perplexity", "forward", "prefill",
    "lm_eval_version", "lm_eval"}``: the three metrics are lm-eval's aggregated numbers as it reports them;
    ``loglikelihood`` is the sum of lm-eval's per-document rolling loglikelihoods and ``token_perplexity`` =
    exp(-loglikelihood / tokens); ``forward`` records what the model was really given (``longctx.watch_forward``:
    longest input, fused / blocked prefills of the compressed runtime); documents/tokens/words/bytes describe what
    was scored (tokens: lm-eval's own tokenization of each document, i.e. the number of predicted tokens);
    ``lm_eval`` is lm-eval's result dict (JSON-able, per-document samples removed).
    """
    _check_args(model, max_length, batch_size, limit)
    name, metadata = task_spec(task, text_file, min_chars)
    _offline_env(metadata is not None)
    import lm_eval

    if device is not None:
        model.to(device)
    out, lm, watched, prefill = _evaluate(model, tokenizer, name, metadata, max_length=max_length,
                                          batch_size=batch_size, limit=limit, add_bos_token=add_bos_token,
                                          verbose=verbose, progress=progress, desc=desc, prefill=prefill)
    res = out["results"][name]
    samples = out.pop("samples", {}).get(name, [])
    loglik, n_tokens, n_words, n_bytes = _scored(samples, lm)
    return {
        "task": name,
        "text_file": (metadata or {}).get("text_file"),
        "word_perplexity": float(res["word_perplexity,none"]),
        "byte_perplexity": float(res["byte_perplexity,none"]),
        "bits_per_byte": float(res["bits_per_byte,none"]),
        "documents": len(samples),
        "tokens": n_tokens,
        "words": n_words,
        "bytes": n_bytes,
        "max_length": int(max_length),
        "add_bos_token": bool(lm.add_bos_token),
        "loglikelihood": loglik,
        "token_perplexity": math.exp(-loglik / n_tokens) if n_tokens else float("nan"),
        "forward": watched.to_json(),
        "prefill": prefill,
        "lm_eval_version": lm_eval.__version__,
        "lm_eval": _jsonable(out),
    }


def _check_args(model, max_length, batch_size, limit) -> None:
    if max_length is None or int(max_length) < 2:
        raise TextError(f"max_length must be at least 2, got {max_length}")
    if int(batch_size) < 1:
        raise TextError(f"batch_size must be at least 1, got {batch_size}")
    if limit is not None and int(limit) < 1:
        raise TextError(f"limit must be a positive number of documents, got {limit}")
    from .longctx import check_length

    check_length(model, int(max_length))


def _evaluate(model, tokenizer, name: str, metadata: dict | None, *, max_length, batch_size, limit, add_bos_token,
              verbose: bool, progress: bool, desc: str | None, prefill: str):
    """``lm_eval.simple_evaluate`` of task ``name`` on the model (HFLM), quiet unless ``verbose``, the forward
    watched, a compressed model's prompts attending as ``prefill`` says: (lm-eval's output, the HFLM, the watch,
    the prefill of the model's compressed layers meanwhile, None for a model not compressed)."""
    import lm_eval
    import lm_eval.api.task  # noqa: F401  (imported before _quiet looks for their progress bars)
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401

    from .longctx import watch_forward
    from .runtime.surgery import prefill_as, prefill_of

    with _quiet(verbose, progress and verbose), watch_forward(model) as watched, prefill_as(model, prefill):
        lm = make_hflm(model, tokenizer, max_length=max_length, batch_size=batch_size, add_bos_token=add_bos_token)
        if progress and not verbose:
            _labelled_progress(lm, f"{desc + ': ' if desc else ''}{name} perplexity")
        tm = task_manager(metadata, include_defaults=metadata is None)
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=None if limit is None else min(int(limit), sys.maxsize),
                                      bootstrap_iters=0, log_samples=True)
        used = prefill_of(model)
    return out, lm, watched, used


def _scored(samples: list, lm) -> tuple[float, int, int, int]:
    """(summed rolling loglikelihood, tokens (lm-eval's tokenization), words, bytes) of the scored documents."""
    n_tokens = n_words = n_bytes = 0
    loglik = 0.0
    for s in samples:
        loglik += float(_first(s["filtered_resps"]))
        target = s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple)) else s["arguments"][0]
        n_tokens += len(lm.tok_encode(target))
        words, nbytes = _stock_counts(s["doc"])
        n_words += words
        n_bytes += nbytes
    return loglik, n_tokens, n_words, n_bytes


def _first(x):
    """The number inside lm-eval's nested response lists/tuples."""
    while isinstance(x, (list, tuple)):
        x = x[0]
    return x


def _stock_counts(doc: dict) -> tuple[int, int]:
    """(words, bytes) exactly as lm-eval's wikitext ``process_results`` counts them."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    r = process_results(doc, [0.0])
    return int(r["word_perplexity"][1]), int(r["byte_perplexity"][1])


__all__ = ["perplexity", "make_hflm", "task_manager", "load_documents", "read_documents", "split_wikitext",
           "split_paragraphs", "resolve_text_file", "TASKS_DIR", "LOCAL_TASKS"]
