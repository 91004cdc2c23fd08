"""Text sources -> token windows.

A source is a text file, a glob, a directory (its *.txt / *.raw / *.md / *.jsonl
files), a JSONL file with a ``text`` field, ``hf:NAME[:CONFIG[:SPLIT]]`` for a
``datasets`` spec (online users), ``builtin:gutenberg`` (public-domain excerpts of eight
novels shipped inside the package, ~260 KB: the default, so every command runs on a fresh
machine), or ``sampled`` (text sampled from the model itself, seeded, cached on disk —
data-free, but measured much worse for calibration than real text).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TextError
from .runtime import placement

TEXT_SUFFIXES = (".txt", ".raw", ".md", ".jsonl")
SAMPLED_NAME = "model-sampled"
SAMPLED_SOURCE = "sampled"  # the source name that asks for model-sampled text
BUILTIN_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]  # where relative text paths are also looked for
DEFAULT_TEXT = "builtin:gutenberg"  # the calibration text when none is given


@dataclass(frozen=True)
class Text:
    name: str
    text: str


@dataclass(frozen=True)
class Window:
    text_name: str
    input_ids: torch.Tensor  # (seq_len,) int64
    position: int = 0  # absolute position of the first token (calibration spreads windows over the serving length)


def _read_file(path: Path) -> list[Text]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TextError(f"cannot read text file {path}: {e}") from e
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TextError(f"{path}:{n}: expected a JSON object with a 'text' field") from e
            if not isinstance(text, str):  # null or a number would be read as the text "None" / "3"
                raise TextError(f"{path}:{n}: the 'text' field is {type(text).__name__}, not a string")
            parts.append(text)
        raw = "\n\n".join(parts)
    return [Text(name=path.stem, text=raw)]


def _read_hf(spec: str) -> list[Text]:
    fields = spec[3:].split(":")
    name, config, split = (fields + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split or "test")
    except Exception as e:  # datasets raises many types; the user needs one line
        raise TextError(f"cannot load dataset '{spec}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return [Text(name=f"{name}-{config or ''}-{split or 'test'}".replace("--", "-"), text="\n\n".join(ds["text"]))]


def _read_builtin(src: str) -> list[Text]:
    name = src.split(":", 1)[1]
    folder = BUILTIN_DIR / name
    files = sorted(folder.glob("*.txt")) if name and folder.is_dir() else []
    if not files:
        known = ", ".join(f"builtin:{d.name}" for d in sorted(BUILTIN_DIR.iterdir()) if d.is_dir())
        raise TextError(f"no built-in text '{src}' (available: {known})")
    return [Text(name=f"{name}/{f.stem}", text=f.read_text(encoding="utf-8")) for f in files]


def calibration_texts(sources, model, tokenizer, *, n_tokens: int = 8192, seed: int = 0) -> list[Text]:
    """The texts of ``sources`` (none: the built-in sample; ``["sampled"]``: text sampled from the model)."""
    sources = list(sources) or [DEFAULT_TEXT]
    if SAMPLED_SOURCE in sources:
        rest = [s for s in sources if s != SAMPLED_SOURCE]
        return [sampled_text(model, tokenizer, n_tokens=n_tokens, seed=seed)] + (load_texts(rest) if rest else [])
    return load_texts(sources)


def load_texts(sources: list[str] | tuple[str, ...]) -> list[Text]:
    """Read every source; each file becomes one named Text. Raises TextError on anything unusable."""
    texts: list[Text] = []
    for src in sources:
        if src.startswith("hf:"):
            texts.extend(_read_hf(src))
            continue
        if src.startswith("builtin:"):
            texts.extend(_read_builtin(src))
            continue
        if src == SAMPLED_SOURCE:
            raise TextError("text 'sampled' (model-sampled text) needs the model: use calibration_texts()")
        p = Path(src)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in TEXT_SUFFIXES and f.is_file())
            if not files:
                raise TextError(f"directory {src} has no text files ({', '.join(TEXT_SUFFIXES)})")
        elif p.is_file():
            files = [p]
        else:
            files = [Path(f) for f in sorted(glob.glob(src))]
            if not files:
                raise TextError(f"no such text file or glob: {src}")
        for f in files:
            texts.extend(_read_file(f))
    for t in texts:
        if not t.text.strip():
            raise TextError(f"text '{t.name}' is empty")
    return texts


def sampled_text(model, tokenizer, *, n_tokens: int = 4096, seed: int = 0, chunk: int = 512) -> Text:
    """Text generated by the model itself from its BOS token (data-free calibration as in
    LLM-QAT), ``n_tokens // chunk`` sequences sampled in one batch, seeded; cached on disk."""
    from .models import cache_root

    ident = f"{getattr(model.config, '_name_or_path', '')}:{model.config.model_type}:{n_tokens}:{seed}:{chunk}"
    wsum = 0.0  # of the first four weights (each brought in by its own module where offloaded)
    for name, _ in list(model.named_parameters())[:4]:
        with placement.materialized_tensor(model, name) as w:
            wsum += float(w.detach().double().sum())
    key = hashlib.sha256(f"{ident}:{wsum:.6e}".encode()).hexdigest()[:16]
    path = cache_root() / "sampled" / f"{key}.txt"
    if path.exists():
        return Text(name=SAMPLED_NAME, text=path.read_text(encoding="utf-8"))
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = placement.input_device(model)
    n_seq = max(1, n_tokens // chunk)
    ids = torch.full((n_seq, 1), start if start is not None else 0, device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, temperature=1.0,
                             max_new_tokens=chunk, min_new_tokens=chunk, pad_token_id=start)
    text = "\n\n".join(tokenizer.decode(row[1:], skip_special_tokens=True) for row in out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return Text(name=SAMPLED_NAME, text=text)


def bos_prefix(tokenizer) -> list[int]:
    """The BOS id if the tokenizer adds one to every sequence (Gemma-3 needs it; SmolLM2 does not)."""
    probe = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def token_windows(tokenizer, texts: list[Text], *, seq_len: int, max_tokens: int | None = None) -> list[Window]:
    """Cut every text into non-overlapping windows of ``seq_len`` tokens (BOS first where the
    tokenizer adds one). ``max_tokens`` caps the total, shared evenly across texts."""
    if seq_len < 2:
        raise TextError(f"--seq-len must be at least 2, got {seq_len}")
    prefix = bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    per_text = None if max_tokens is None else max(1, max_tokens // max(1, len(texts)) // seq_len)
    windows: list[Window] = []
    short: list[tuple[str, int]] = []
    for t in texts:
        ids = tokenizer(t.text, add_special_tokens=False).input_ids
        n_win = len(ids) // body
        if n_win == 0:  # a text shorter than one window still counts, as one short window
            if len(ids) + len(prefix) >= 2:
                windows.append(Window(text_name=t.name, input_ids=torch.tensor(prefix + ids, dtype=torch.long)))
            else:
                short.append((t.name, len(ids)))
            continue
        if per_text is not None:
            n_win = min(n_win, per_text)
        for w in range(n_win):
            chunk = prefix + ids[w * body : (w + 1) * body]
            windows.append(Window(text_name=t.name, input_ids=torch.tensor(chunk, dtype=torch.long)))
    if not windows:
        names = ", ".join(f"{n} ({k} tokens)" for n, k in short)
        raise TextError(f"no text is long enough to measure anything: {names}")
    return windows


def resolve_text_file(path: str | os.PathLike) -> Path:
    """An existing text file: ``path`` as given (relative to the current directory), else
    relative to the repository root. Raises TextError (one line) otherwise."""
    p = Path(os.path.expanduser(str(path)))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    for c in candidates:
        if c.exists():
            raise TextError(f"not a text file: {c}")
    where = " or ".join(str(c.resolve()) for c in candidates)
    raise TextError(f"no such text file: {path} (looked for {where})")
