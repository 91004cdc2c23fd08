"""The held-out text of the eval/ measurements (never calibrated on): the first tokens of the WikiText-2 test file
(``wiki``) and a segment of Dracula from token 60000 (``dracula``: far beyond the part of the novel the built-in
calibration sample and calibration windows read), cut into windows that start with BOS where the tokenizer adds
one. The files live in the shared data directory (``$LOWRANK_ATTN_DATA``, default ``../shared/data`` next to the
checkout)."""

from __future__ import annotations

import os
from pathlib import Path

from .provenance import REPO

HELD_TEXTS = {"wiki": ("wikitext2-test.raw", 0), "dracula": ("gutenberg-dracula.txt", 60000)}


def data_dir() -> Path:
    return Path(os.environ.get("LOWRANK_ATTN_DATA") or REPO.parent / "shared" / "data")


def held_ids(tokenizer, name: str, n: int) -> list[int]:
    """``n`` token ids of the held-out text ``name`` (``HELD_TEXTS``), from its start offset, no special tokens."""
    from ..texts import load_texts

    file, start = HELD_TEXTS[name]
    ids = tokenizer(load_texts([str(data_dir() / file)])[0].text, add_special_tokens=False).input_ids
    return ids[start : start + n]


def windows_of(ids: list[int], length: int, prefix: list[int] = ()) -> list:
    """``ids`` cut into consecutive windows of ``length`` tokens, each ``prefix`` (the BOS) + ``length - len(prefix)``
    ids (the tail shorter than a window is dropped); 1-D tensors."""
    import torch

    body = length - len(prefix)
    return [torch.tensor(list(prefix) + ids[a : a + body]) for a in range(0, len(ids) - body + 1, body)]


def held_windows(tokenizer, name: str, length: int, count: int) -> list:
    """``count`` windows of ``length`` tokens of the held-out text ``name``, each starting with the BOS where the
    tokenizer adds one (``texts.bos_prefix``)."""
    from ..texts import bos_prefix

    prefix = bos_prefix(tokenizer)
    return windows_of(held_ids(tokenizer, name, count * (length - len(prefix))), length, prefix)
