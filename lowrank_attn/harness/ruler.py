"""RULER (lm-eval's own tasks, offline) as eval/ruler.py and eval/kvpress/run_ruler.py both run it: the tasks,
their arguments, the seeded prompts, lm-eval's scoring, and the rows. Nothing here imports torch or lm-eval at
module level: eval/kvpress/run_ruler.py imports it from its own venv (kvpress pins an older transformers).

Rows: one JSON line per (model, method, task, length) in ``eval/results/ruler/<model>.jsonl``
(:func:`rows_store`); a key is done when its last row has at least ``--limit`` samples (:func:`is_done`); a row
with fewer, run with the same settings, is extended by the docs it lacks rather than run again (:func:`extendable`,
:func:`extended_row`: the first n seeded docs are the same at any ``--limit``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from ..errors import LowrankAttnError
from .provenance import REPO
from .store import ResultsStore, latest_of

RESULTS = REPO / "eval" / "results" / "ruler"
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
DOWNLOAD_TASKS = {
    "niah_single_2": "Paul Graham essays", "niah_single_3": "Paul Graham essays",
    "niah_multikey_1": "Paul Graham essays", "niah_multiquery": "Paul Graham essays",
    "niah_multivalue": "Paul Graham essays", "ruler_qa_squad": "SQuAD", "ruler_qa_hotpot": "HotpotQA",
    "ruler": "Paul Graham essays, SQuAD and HotpotQA (the whole group)",
}
DEFAULT_LENGTHS = (4096, 8192)
DEFAULT_LIMIT = 10
MIN_LENGTH = 1024
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
ROW_KEY = ("model", "method", "task", "length")


class RulerError(LowrankAttnError):
    """A bad argument or an unusable setting: printed as one line."""


# ---------------------------------------------------------------- arguments


def parse_tasks(tasks: list[str] | str | None) -> list[str]:
    if tasks is None:
        return list(OFFLINE_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out = []
    for t in (x.strip() for x in tasks):
        if not t:
            continue
        if t in DOWNLOAD_TASKS:
            raise RulerError(f"RULER task {t} needs a download ({DOWNLOAD_TASKS[t]}) and this runs offline; "
                             f"the offline tasks are {', '.join(OFFLINE_TASKS)}")
        if t not in OFFLINE_TASKS:
            raise RulerError(f"unknown RULER task {t!r}; the offline tasks are {', '.join(OFFLINE_TASKS)}")
        if t not in out:
            out.append(t)
    if not out:
        raise RulerError("no RULER task given")
    return out


def parse_lengths(spec: str | list | tuple) -> list[int]:
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for p in parts:
        try:
            n = int(str(p).strip())
        except ValueError:
            raise RulerError(f"RULER length {p!r} is not a whole number of tokens") from None
        if n < MIN_LENGTH:
            raise RulerError(f"RULER length {n} is too short (at least {MIN_LENGTH} tokens; lm-eval's "
                             "variable-tracking generator does not finish at 512)")
        out.append(n)
    if not out:
        raise RulerError("no RULER length given")
    return out


TASK_PACKAGES = ("wonderwords", "nltk")  # what lm-eval's RULER data builders import (the ``ruler`` extra)


def check_task_packages() -> None:
    """One line, before lm-eval is asked to build a task's data, where its RULER data builders cannot import."""
    import importlib.util

    missing = [m for m in TASK_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise RulerError(f"RULER's offline tasks need {' and '.join(missing)}: pip install -c constraints.txt -e "
                         "'.[ruler]' (or pip install wonderwords nltk)")


def check_limit(limit: int) -> int:
    if limit < 1:
        raise RulerError(f"--limit must be at least 1 sample per task, got {limit}")
    return limit


def default_dtype(device: str) -> str:
    return "float32" if str(device) == "cpu" else "bfloat16"


# ---------------------------------------------------------------- rows


def safe_name(model: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(str(model).rstrip("/")).name or "model")


def rows_path(model: str, results: Path = RESULTS) -> Path:
    return Path(results) / f"{safe_name(model)}.jsonl"


def rows_store(path: Path) -> ResultsStore:
    """The RULER rows of one file (a torn line from a killed run is skipped)."""
    return ResultsStore(path, ROW_KEY, what="RULER row")


def latest_rows(rows: list[dict]) -> dict[tuple, dict]:
    """The last row of each (model, method, task, length) among ``rows`` (of one file or several)."""
    return latest_of(rows, ROW_KEY)


# what a row ran with beyond its key: a rerun that differs in one of them measures again (the last row wins)
SETTINGS = ("checkpoint", "source", "dtype", "max_gen_toks")


def is_done(latest: dict[tuple, dict], key: tuple, limit: int, settings: dict | None = None) -> bool:
    """Whether ``key`` has a row with at least ``limit`` samples (a smoke row is rerun with more) run with
    ``settings`` (``SETTINGS`` fields; one a row does not record — rows from before it was recorded — matches)."""
    row = latest.get(tuple(key))
    if row is None or int(row.get("n", 0)) < limit:
        return False
    return _ran_with(row, settings)


def _ran_with(row: dict, settings: dict | None) -> bool:
    """Whether ``row`` ran with ``settings`` (a field the row does not record matches)."""
    return all(row.get(k, v) == v for k, v in (settings or {}).items())


def extendable(latest: dict[tuple, dict], key: tuple, limit: int, settings: dict | None = None) -> dict | None:
    """The row of ``key`` a run of ``limit`` samples extends (runs only docs n…limit-1 and merges), or None:
    one with 0 < n < limit samples, a score, its responses and per-doc prompt hashes, run with ``settings``."""
    row = latest.get(tuple(key))
    if row is None or row.get("score") is None:
        return None
    n = int(row.get("n", 0))
    if not 0 < n < limit or len(row.get("prompt_shas") or ()) != n or len(row.get("responses") or ()) != n:
        return None
    return row if _ran_with(row, settings) else None


def extends_prompts(old: dict, prompts: list[str]) -> bool:
    """Whether ``old``'s docs are the first of ``prompts`` (every prompt of the extended row, in doc order)."""
    return prompt_shas(prompts[: int(old["n"])]) == list(old["prompt_shas"])


def extended_row(old: dict, new: dict, prompts: list[str]) -> dict:
    """One row over ``old``'s docs and ``new``'s (the docs after them): scores weighted by their doc counts (a
    task's score is the mean over its docs), responses and hashes concatenated, ``extends`` naming what ran
    before (its commit and n). ``prompts``: every prompt of the merged row, in doc order."""
    n0, n1 = int(old["n"]), int(new["n"])
    if len(prompts) != n0 + n1:
        raise RulerError(f"extending {old.get('method')} {old.get('task')}: {len(prompts)} prompts for {n0 + n1} docs")
    score = None if new["score"] is None else (float(old["score"]) * n0 + float(new["score"]) * n1) / (n0 + n1)
    return {**new, "score": score, "n": n0 + n1,
            "prompts_sha": prompts_sha(prompts), "prompt_shas": prompt_shas(prompts),
            "responses": list(old["responses"]) + list(new["responses"]),
            "wall_s": round(float(old.get("wall_s", 0)) + float(new.get("wall_s", 0)), 1),
            "extends": [*old.get("extends", []), {"commit": old.get("commit"), "n": n0}]}


def mixed_settings(rows: list[dict]) -> list[str]:
    """The ``SETTINGS`` fields in which the rows of one table line (a method at a length) differ (a checkpoint's
    ``source`` is its path as typed, which may be spelled two ways: its ``checkpoint`` hash names it)."""
    ours = any(str(r.get("method", "")).startswith("ours") for r in rows)
    return [k for k in SETTINGS if not (ours and k == "source")
            and len({json.dumps(r.get(k), sort_keys=True) for r in rows if k in r}) > 1]


def _as_config(cfg):
    """A config object from a config or a dict of one (an object with its fields where transformers does not know
    its model_type)."""
    if not isinstance(cfg, dict):
        return cfg
    d = dict(cfg)
    if "model_type" in d:
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(d.pop("model_type"), **d)
        except (KeyError, ValueError):
            pass
    return SimpleNamespace(**d)


def _sliding_windows(cfg) -> list:
    """Per layer, its sliding window or None: the family adapter's rule, or (a config it does not know) the
    config's ``layer_types``."""
    from ..errors import LowrankAttnError
    from ..runtime.adapters import adapter_for_config

    n = cfg.num_hidden_layers
    try:
        family = adapter_for_config(cfg)
        return [family.sliding_window(i) for i in range(n)]
    except LowrankAttnError:
        types = getattr(cfg, "layer_types", None) or [None] * n
        return [getattr(cfg, "sliding_window", None) if t == "sliding_attention" else None for t in types]


def checkpoint_identity(path) -> str:
    """A short hash naming a compressed checkpoint by its weights (the sidecar's sha256 of each weights file)."""
    from ..checkpoint import read_sidecar

    weights = read_sidecar(Path(path)).get("weights_sha256") or {}
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:16]


def dense_cache_bytes(config, length: int) -> dict:
    """The dense bf16 cache of a model of ``config``'s attention shape (a compressed model's ``base_config``; a
    dict or a config object) after ``length`` tokens, as a ``DynamicCache`` holds it: 2 bytes × kv heads ×
    head_dim × the tokens each layer keeps (``length``; a sliding-window layer of window W its last W - 1), for K
    and for V."""
    cfg = _as_config(getattr(config, "base_config", None) or config)
    cfg = _as_config(getattr(cfg, "text_config", None) or cfg)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    windows = _sliding_windows(cfg)
    tokens = sum(min(length, w - 1) if w else length for w in windows)
    each = 2 * heads * head_dim * tokens
    return {"k": each, "v": each, "total": 2 * each}


# ---------------------------------------------------------------- data and scoring


def seed_all(seeds: dict = SEEDS) -> None:
    """What ``lm_eval.simple_evaluate`` sets before it builds tasks."""
    import random

    import numpy as np
    import torch

    random.seed(seeds["random_seed"])
    np.random.seed(seeds["numpy_random_seed"])
    torch.manual_seed(seeds["torch_random_seed"])


def load_task(task: str, length: int, tokenizer_dir: str):
    """lm-eval's Task object for one RULER task at one length, its data built from ``tokenizer_dir`` with the
    seeds fixed first (the same prompts in every process and venv with the same lm-eval)."""
    from lm_eval.tasks import TaskManager

    parse_tasks([task])
    check_task_packages()
    _same_docs_in_any_process()
    seed_all()
    try:
        loaded = TaskManager(metadata={"max_seq_lengths": [int(length)], "tokenizer": str(tokenizer_dir)}).load([task])
    except (OSError, ConnectionError) as e:
        raise RulerError(f"RULER task {task}: building its data failed ({str(e).splitlines()[0]})") from e
    return loaded["tasks"][task]


GENERATORS = ("common_utils", "niah_utils", "vt_utils", "cwe_utils", "fwe_utils")  # lm_eval.tasks.ruler's
_CWE_RNG_AFTER_IMPORT: list = []


def _same_docs_in_any_process() -> None:
    """Make a task's docs depend on its length and the seeds only, not on what the process built before: import
    lm-eval's RULER generators before seeding (their first import draws from the global RNG: a process whose first
    build was ruler_cwe got other docs than one that built a task before it), and put cwe's own module-level
    ``random.Random(42)`` back to its state after import (a second cwe build in a process, at another length, went
    on drawing from it)."""
    import importlib

    for name in GENERATORS:
        importlib.import_module(f"lm_eval.tasks.ruler.{name}")
    rng = getattr(importlib.import_module("lm_eval.tasks.ruler.cwe_utils"), "RNG", None)
    if rng is not None:
        if not _CWE_RNG_AFTER_IMPORT:
            _CWE_RNG_AFTER_IMPORT.append(rng.getstate())
        rng.setstate(_CWE_RNG_AFTER_IMPORT[0])


def task_prompts(task_obj, limit: int) -> list[dict]:
    """The first ``limit`` requests lm-eval builds for a task: doc, the exact prompt string, generation kwargs,
    and the prompt split where RULER's question starts (after the last newline of the doc's input: context |
    question, answer prefix)."""
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    out = []
    for inst in sorted(task_obj.instances, key=lambda i: i.doc_id):
        prompt, gen_kwargs = inst.args[0], dict(inst.args[1])
        doc = inst.doc
        cut = doc["input"].rfind("\n")  # split after that newline: BPE pre-tokens (".\n") stay whole
        start = prompt.find(doc["input"])
        split = start + cut + 1 if start >= 0 and cut >= 0 else len(prompt)
        out.append({"doc_id": inst.doc_id, "doc": doc, "prompt": prompt, "context": prompt[:split],
                    "question": prompt[split:], "gen_kwargs": gen_kwargs, "outputs": list(doc["outputs"])})
    return out


def prompt_shas(prompts: list[str]) -> list[str]:
    """One short hash per prompt (rows with different n can be compared doc by doc)."""
    return [hashlib.sha256(p.encode("utf-8")).hexdigest()[:12] for p in prompts]


def prompts_sha(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def score_response(task_obj, doc: dict, response: str, length: int) -> float:
    """lm-eval's own per-sample metric for the task at ``length`` (string match of the outputs)."""
    return float(task_obj.process_results(doc, [response])[str(int(length))])
