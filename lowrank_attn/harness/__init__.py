"""The measurement harness: what every eval/ script and ``lowrank-attn sweep`` share, so that a number quoted in
the README is measured by code a user runs.

* ``provenance``: :func:`stamp` (commit, machine, threads: on every row), :func:`git_commit`, :func:`machine`,
  :func:`host_info` (benchmarks: the load on the machine);
* ``store``: :class:`ResultsStore`, resumable JSONL results (atomic appends, rows keyed by a tuple of fields, a
  rerun skips what is done), :func:`append_atomic`;
* ``timing``: :func:`time_interleaved`, :func:`sync`;
* ``memory``: :class:`PeakRSS`, :class:`AnonPeak`, :func:`run_child` (a measurement in a fresh process),
  :func:`script_cmd`, :func:`status_mib`, :func:`process_peak_mib`, :class:`ChildFailed`;
* ``heldtext``: the held-out texts (``HELD_TEXTS``: WikiText-2 test, Dracula from token 60000) and their windows;
* ``ruler``: the RULER tasks, prompts, scoring and rows (eval/ruler.py and eval/kvpress/run_ruler.py);
  ``ruler_run``: eval/ruler.py's run (methods, the loop through lm-eval, KV bytes, one row per key);
  ``ruler_report``: its table and plot;
* ``long_context``: eval/long_context.py's run (``run_long``: methods compressed once, perplexity per length and
  passkey points, resumable); ``long_report``: its report (``long.md``/``long.json``/plot).

The measures themselves are the package's: token perplexity ``cachepath.token_perplexity`` (one forward per
window, or fed through a cache in chunks: ``cachepath.cache_perplexity``), lm-eval perplexity
``evaluate.perplexity``, next-token KL ``heldout.logprob_kl`` / ``heldout.output_kl``.

Nothing here imports torch at module level.
"""

from __future__ import annotations

from .heldtext import HELD_TEXTS, data_dir, held_ids, held_windows, windows_of
from .memory import (
    AnonPeak, ChildFailed, PeakRSS, process_peak_mib, reset_peak_rss, run_child, script_cmd, status_kib, status_mib,
)
from .provenance import REPO, git_commit, host_info, machine, stamp
from .store import ResultsStore, append_atomic, latest_of
from .timing import sync, time_interleaved

__all__ = ["HELD_TEXTS", "REPO", "AnonPeak", "ChildFailed", "PeakRSS", "ResultsStore", "append_atomic", "data_dir",
           "git_commit", "held_ids", "held_windows", "host_info", "latest_of", "machine", "process_peak_mib", "reset_peak_rss",
           "run_child", "script_cmd", "stamp", "status_kib", "status_mib", "sync", "time_interleaved", "windows_of"]
