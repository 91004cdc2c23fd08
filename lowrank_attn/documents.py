"""The documents of the local lm-eval tasks (``eval/tasks``): a text file cut by the "wikitext" rule (as lm-eval's
stock ``wikitext`` task gets WikiText-2) or the "paragraphs" rule (see ``evaluate``), and the task's
``custom_dataset`` (:func:`load_documents`)."""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import TextError
from .texts import resolve_text_file

DEFAULT_MIN_CHARS = 10000
_SPLIT_RULES = ("wikitext", "paragraphs")


def split_wikitext(text: str) -> list[str]:
    """Documents of a WikiText raw file, cut as ``EleutherAI/wikitext_document_level`` does
    (the dataset behind lm-eval's stock ``wikitext`` task): a top-level heading line
    `` = Title = `` starts a new document; the heading belongs to the document it starts."""
    docs: list[str] = []
    cur: list[str] = []
    for line in text.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(cur)
            if page.strip():
                docs.append(page)
            cur = []
        cur.append(line)
    last = "\n".join(cur)
    if last.strip():  # the dataset also yields a whitespace-only tail; an empty document scores nothing
        docs.append(last)
    return docs


_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")


def split_paragraphs(text: str, min_chars: int = DEFAULT_MIN_CHARS) -> list[str]:
    """Cut ``text`` at blank lines only, packing consecutive paragraphs into documents of at
    least ``min_chars`` characters; a shorter remainder joins the last document. Documents are
    stripped slices of ``text`` (inner blank lines kept as they are); blank ones are dropped."""
    if min_chars < 0:
        raise TextError(f"min_chars must be >= 0, got {min_chars}")
    bounds: list[list[int]] = []
    start = 0
    for m in _BLANK.finditer(text):
        if len(text[start:m.end()].strip()) >= max(1, min_chars):
            bounds.append([start, m.end()])
            start = m.end()
    if text[start:].strip():
        if bounds and len(text[start:].strip()) < min_chars:
            bounds[-1][1] = len(text)
        else:
            bounds.append([start, len(text)])
    return [text[a:b].strip() for a, b in bounds]


def read_documents(text_file: str | os.PathLike, *, split: str = "paragraphs",
                   min_chars: int = DEFAULT_MIN_CHARS) -> list[str]:
    """Read ``text_file`` and cut it into documents by rule ``split`` ("wikitext" | "paragraphs")."""
    path = resolve_text_file(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TextError(f"cannot read text file {path}: {e}") from e
    if not text.strip():
        raise TextError(f"text file {path} is empty")
    if split == "wikitext":
        docs = split_wikitext(text)
    elif split == "paragraphs":
        docs = split_paragraphs(text, int(min_chars))
    else:
        raise TextError(f"unknown document split rule {split!r}; choose from {', '.join(_SPLIT_RULES)}")
    if not docs:
        raise TextError(f"text file {path} has no non-blank document")
    return docs


def load_documents(text_file: str | None = None, split: str = "paragraphs", min_chars: int = DEFAULT_MIN_CHARS,
                   **_ignored: Any):
    """lm-eval ``custom_dataset`` of the local tasks: ``{"test": Dataset({"page": [...]})}``.

    lm-eval calls it with the task's metadata (YAML ``metadata:`` merged with the run's
    ``--metadata`` / ``TaskManager(metadata=...)``, plus model args on the CLI); only
    ``text_file``, ``split`` and ``min_chars`` are used. Built in memory: no hub, no cache."""
    import datasets

    if not text_file:
        raise TextError("no text file given to the lm-eval task: pass --metadata '{\"text_file\": \"PATH\"}'")
    docs = read_documents(text_file, split=split, min_chars=min_chars)
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": docs})})
