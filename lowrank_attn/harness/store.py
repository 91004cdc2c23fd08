"""Resumable results: one JSON object per line, written atomically, keyed by a tuple of its fields.

Every measuring loop (``lowrank-attn sweep``, the eval/ scripts) keeps its rows in a :class:`ResultsStore`:

* ``append(row)`` rewrites the file with one more line through a temporary file and a rename, so a crash, a
  kill or a full disk leaves the old file whole (a torn last line written by an older, appending writer is
  closed first); the row gets the checkout's ``commit`` (:func:`~lowrank_attn.harness.provenance.git_commit`) unless it
  carries one;
* ``rows()`` reads the file back; a line that is not a JSON object with the ``required`` fields is an error
  naming the file and line (``strict``) or is skipped (a torn line from a killed run);
* ``latest()`` maps each key (the row's ``key`` fields, None where absent) to its last row, ``done(key)`` says
  whether a key has a row (and, given ``when``, whether that row satisfies it): a rerun skips what is done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import LowrankAttnError

_UNSET = object()


def append_atomic(path: str | os.PathLike, row: dict) -> None:
    """Rewrite ``path`` with one more JSON line via a temp file and a rename: a crash, a kill or a full disk
    leaves the old file whole (LowrankAttnError naming the file on an OSError)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"  # a line torn by a killed writer stays alone on its line
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(old + json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LowrankAttnError(f"cannot write {path}: {e.strerror or e}; the rows already in it are kept, "
                               "free some space and rerun to resume") from e
    except BaseException:  # Ctrl-C: the old file is whole, and no temp file is left
        tmp.unlink(missing_ok=True)
        raise


def latest_of(rows: Iterable[dict], key: Sequence[str]) -> dict[tuple, dict]:
    """The last of ``rows`` for each key (the rows' ``key`` fields, None where absent)."""
    return {tuple(r.get(k) for k in key): r for r in rows}


class ResultsStore:
    """The rows of one JSONL file, keyed by ``key`` (field names); see the module docstring.

    ``required``: the fields a row must have (default: the key's); ``what``: how errors name a row;
    ``stamp``: add ``commit`` to appended rows that lack it; ``commit``: the value (default: the checkout's,
    read once)."""

    def __init__(self, path: str | os.PathLike, key: Sequence[str], *, required: Sequence[str] | None = None,
                 strict: bool = False, what: str = "row", stamp: bool = True, commit=_UNSET):
        self.path, self.key = Path(path), tuple(key)
        self.required = tuple(self.key if required is None else required)
        self.strict, self.what, self.stamp, self._commit = strict, what, stamp, commit

    @property
    def commit(self) -> str | None:
        if self._commit is _UNSET:
            from .provenance import git_commit

            self._commit = git_commit()
        return self._commit

    def _bad(self, n: int, why: str) -> None:
        if self.strict:
            raise LowrankAttnError(f"{self.path}:{n} {why}; delete the line or the file to restart")

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                self._bad(n, "is not valid JSON")
                continue
            if not isinstance(row, dict) or any(k not in row for k in self.required):
                self._bad(n, f"is not a {self.what} (no {', '.join(repr(k) for k in self.required)})")
                continue
            rows.append(row)
        return rows

    def latest(self) -> dict[tuple, dict]:
        """The last row of each key (a rerun's row supersedes an earlier one)."""
        return latest_of(self.rows(), self.key)

    def done(self, key: Iterable, when: Callable[[dict], bool] | None = None, latest: dict | None = None) -> bool:
        row = (self.latest() if latest is None else latest).get(tuple(key))
        return row is not None and (when is None or bool(when(row)))

    def append(self, row: dict) -> dict:
        """Append ``row`` atomically (stamped with the commit); returns the row as written."""
        if self.stamp and "commit" not in row:
            row = {**row, "commit": self.commit}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_atomic(self.path, row)
        return row
