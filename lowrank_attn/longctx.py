"""Long-context evaluation, offline: passkey (needle) retrieval and the checks behind long windows.

Passkey prompts are synthetic and seeded: an instruction, filler text (neutral sentences repeated, or
the words of a text file), a needle sentence holding a random 5-digit key at a chosen depth, more
filler, then the question; the answer is `` <key>``.  A prompt's length is counted in the model's own
tokens, BOS included where the tokenizer adds one, context + answer together (what the model reads
plus the last answer token), and lands within one filler word of the target (never above it).

Scoring is teacher-forced exact match, exactly lm-eval's ``loglikelihood`` ``acc`` (``is_greedy``):
context and answer are encoded as lm-eval's ``_encode_pair`` does (the answer's tokens are those of
context + answer after the context's), the model reads ``(context + answer)[:-1]`` in one forward, and
the key counts as retrieved when every answer token is the argmax of the logits before it.  Only the
last ``len(answer)`` positions' logits are computed (``logits_to_keep``), so an 8192-token prompt costs
one forward and no 8192 × vocab logits.  ``tests/test_longctx.py`` checks the agreement with lm-eval's
own ``is_greedy`` through the ``lowrank_passkey`` task (``eval/tasks/lowrank_passkey.yaml``, documents
from a JSONL written by :func:`write_passkey_jsonl`).

:func:`watch_forward` records what a model was really given (the longest input of any forward) and,
for a compressed model, how many attention calls took the fused SDPA prefill
(``runtime.attention._prefill_fused``) and how many fell back to the blocked path.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import TextError
from .runtime import placement

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
DEFAULT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MIN_DEPTHS = 1
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


class PasskeyError(TextError):
    """A passkey request that cannot be met: bad depth, length, count or filler."""


@dataclass
class PasskeyDoc:
    """One prompt. ``context`` + ``answer`` is the whole text; ``n_tokens`` counts it in the model's tokens
    (BOS included); ``needle_token`` is the token index where the needle sentence starts; ``depth_actual``
    the needle's place in the filler, in filler tokens before it over all filler tokens."""
    context: str
    answer: str
    key: str
    depth: float
    length: int
    n_tokens: int
    needle_token: int
    depth_actual: float
    sample: int = 0
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- arguments


def parse_depths(spec: int | str | Sequence[float]) -> list[float]:
    """Depths in [0, 1]: a count N (N evenly spaced depths from 0 to 1, N >= 1) or a comma-separated list
    of fractions (or a sequence of numbers). Raises PasskeyError (one line) otherwise."""
    if isinstance(spec, str):
        s = spec.strip()
        if re.fullmatch(r"[+-]?\d+", s):
            spec = int(s)
        else:
            try:
                spec = [float(x) for x in s.split(",") if x.strip()]
            except ValueError:
                raise PasskeyError(f"--depths: expected a count or comma-separated fractions in [0, 1], got {s!r}") from None
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < MIN_DEPTHS:
            raise PasskeyError(f"--depths: need at least {MIN_DEPTHS} depth, got {spec}")
        return [0.5] if spec == 1 else [round(i / (spec - 1), 6) for i in range(spec)]
    depths = [float(d) for d in spec]
    if not depths:
        raise PasskeyError("--depths: no depth given")
    bad = [d for d in depths if not 0.0 <= d <= 1.0 or d != d]
    if bad:
        raise PasskeyError(f"--depths: depths are fractions of the filler in [0, 1], got {bad[0]:g}")
    return depths


def encode_pair(tokenizer, context: str, continuation: str, bos: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's ``HFLM._encode_pair``: trailing spaces of the context move
    to the continuation; the continuation's ids are those of the joined text after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = list(bos) + tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = list(bos) + tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def _filler_words(filler: str | Path | None, rng: random.Random, need: int) -> list[str]:
    """At least ``need`` words of filler: the default sentences cycled, or a text file's words from a seeded
    offset, wrapping around."""
    if filler is None:
        words = DEFAULT_FILLER.split()
        start = 0
    else:
        from .texts import resolve_text_file

        path = resolve_text_file(filler)
        try:
            words = path.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as e:
            raise TextError(f"cannot read filler file {path}: {e}") from e
        if len(words) < 16:
            raise PasskeyError(f"filler file {path} has {len(words)} words; at least 16 are needed")
        start = rng.randrange(len(words))
    reps = -(-(start + need) // len(words)) + 1
    return (words * reps)[start : start + need]


def _needle_cut(words: list[str], n: int, depth: float) -> int:
    """Where the needle goes among the first n filler words: at round(depth·n), moved to the nearest sentence end
    within 24 words (so the needle is its own sentence) where there is one."""
    k = round(depth * n)
    if k in (0, n):
        return k
    for step in range(25):
        for j in (k - step, k + step):
            if 0 < j < n and _SENTENCE_END.search(words[j - 1]):
                return j
    return k


def _assemble(words: list[str], n: int, k: int, key: str) -> tuple[str, str, str]:
    """(text before the needle, context, answer) with ``n`` filler words, the needle before word ``k``."""
    before = " ".join([INTRO, *words[:k]])
    context = " ".join([before, NEEDLE.format(key=key), *words[k:n], QUESTION])
    return before, context, f" {key}"


def make_passkey_doc(tokenizer, length: int, depth: float, *, seed: int = 0, sample: int = 0,
                     filler: str | Path | None = None) -> PasskeyDoc:
    """One seeded prompt of ``length`` tokens (context + answer, BOS included) with the key at ``depth``."""
    from .texts import bos_prefix

    depth = parse_depths([depth])[0]
    if int(length) != length or length < 1:
        raise PasskeyError(f"passkey length must be a positive number of tokens, got {length}")
    length = int(length)
    rng = random.Random(f"passkey:{seed}:{length}:{depth!r}:{sample}")
    key = str(rng.randint(10000, 99999))
    bos = bos_prefix(tokenizer)
    words = _filler_words(filler, random.Random(f"filler:{seed}"), 2 * length + 16)  # more words than tokens

    def total(n: int) -> int:
        _, ctx, ans = _assemble(words, n, _needle_cut(words, n, depth), key)
        c, a = encode_pair(tokenizer, ctx, ans, bos)
        return len(c) + len(a)

    floor = total(0)
    if floor > length:
        raise PasskeyError(f"passkey length {length} is too short: the instruction, needle and question alone take "
                           f"{floor} tokens")
    lo, hi = 0, len(words)  # largest n with total(n) <= length (every filler word is at least one token)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= length:
            lo = mid
        else:
            hi = mid - 1
    n = lo
    k = _needle_cut(words, n, depth)
    before, ctx, ans = _assemble(words, n, k, key)
    c, a = encode_pair(tokenizer, ctx, ans, bos)
    intro_tokens = len(bos) + len(tokenizer(INTRO, add_special_tokens=False).input_ids)
    needle_token = len(bos) + len(tokenizer(before, add_special_tokens=False).input_ids)
    needle_len = len(tokenizer(" " + NEEDLE.format(key=key), add_special_tokens=False).input_ids)
    question_len = len(tokenizer(" " + QUESTION, add_special_tokens=False).input_ids) + len(a)
    filler_tokens = max(1, len(c) + len(a) - intro_tokens - needle_len - question_len)
    return PasskeyDoc(context=ctx, answer=ans, key=key, depth=depth, length=length, n_tokens=len(c) + len(a),
                      needle_token=needle_token, depth_actual=min(1.0, max(0.0, (needle_token - intro_tokens) / filler_tokens)),
                      sample=sample, seed=seed)


def passkey_docs(tokenizer, length: int, depths, *, samples: int = 1, seed: int = 0,
                 filler: str | Path | None = None) -> list[PasskeyDoc]:
    """``samples`` prompts per depth (``depths``: see :func:`parse_depths`), each with its own key."""
    if int(samples) < 1:
        raise PasskeyError(f"--samples: need at least 1 prompt per depth, got {samples}")
    return [make_passkey_doc(tokenizer, length, d, seed=seed, sample=i, filler=filler)
            for d in parse_depths(depths) for i in range(int(samples))]


def write_passkey_jsonl(docs: Iterable[PasskeyDoc], path: str | Path) -> Path:
    """The documents as JSONL (one object per line), for the ``lowrank_passkey`` lm-eval task."""
    path = Path(path)
    path.write_text("".join(json.dumps(d.to_json()) + "\n" for d in docs))
    return path


def load_passkey_documents(docs_file: str | None = None, **_ignored):
    """lm-eval ``custom_dataset`` of ``lowrank_passkey``: the JSONL of :func:`write_passkey_jsonl`."""
    import datasets

    if not docs_file:
        raise PasskeyError("no passkey documents given to the lm-eval task: pass --metadata '{\"docs_file\": \"PATH\"}'")
    rows = [json.loads(line) for line in Path(docs_file).read_text().splitlines() if line.strip()]
    if not rows:
        raise PasskeyError(f"{docs_file} holds no passkey document")
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(cols)})


# ----------------------------------------------------------------------------- scoring


def max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_length(model, length: int, what: str = "--max-length") -> None:
    """One-line error unless ``length`` tokens fit the model's positions."""
    if int(length) < 2:
        raise TextError(f"{what} must be at least 2 tokens, got {length}")
    mp = max_positions(model)
    if mp is not None and int(length) > mp:
        raise TextError(f"{what} {length} exceeds the model's maximum of {mp} positions")


@torch.inference_mode()
def score_doc(model, tokenizer, doc: PasskeyDoc, *, add_bos: bool | None = None) -> dict:
    """Teacher-forced exact match of the answer (lm-eval's is_greedy), from one forward over
    ``(context + answer)[:-1]`` keeping only the answer positions' logits."""
    from .texts import bos_prefix

    bos = bos_prefix(tokenizer) if add_bos is None or add_bos else []
    ctx, ans = encode_pair(tokenizer, doc.context, doc.answer, bos)
    ids = torch.tensor(ctx + ans[:-1], dtype=torch.long, device=placement.input_device(model))[None]  # (1, T-1)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(ans)).logits[0].float()  # (A, V)
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(ans, device=logits.device)  # (A,)
    greedy = logits.argmax(-1)  # (A,)
    predicted = tokenizer.decode(greedy.tolist())
    return {"exact": bool((greedy == target).all()), "key_digits": key_digits_retrieved(predicted, doc.key),
            "loglikelihood": float(logp.gather(-1, target[:, None]).sum()),
            "tokens_correct": int((greedy == target).sum()), "answer_tokens": len(ans),
            "predicted": predicted, "input_tokens": int(ids.shape[1])}


def key_digits_retrieved(predicted: str, key: str) -> bool:
    """The digits of the teacher-forced greedy answer are the key's. Looser than ``exact``: a model that puts
    a word before the number (greedy ' the79698' for ' 79698': the first answer token is ' the', every digit
    after the true prefix is right) has retrieved the key but fails the exact match on formatting."""
    return "".join(c for c in predicted if c.isdigit()) == key


def score_passkey(model, tokenizer, docs: Sequence[PasskeyDoc], *, progress: bool = True, desc: str = "passkey",
                  prefill: str = "compressed") -> list[dict]:
    """Score every document (one forward each); returns one dict per document (document fields + score).
    ``prefill``: how a compressed model's forward attends (``runtime.surgery.prefill_as``): ``compressed``, the
    default, as if the answer read the cache; ``exact`` is the dense model's forward."""
    from tqdm.auto import tqdm

    from .runtime.surgery import prefill_as

    check_length(model, max(d.n_tokens for d in docs) - 1, "passkey length")
    out = []
    with prefill_as(model, prefill):
        for d in tqdm(docs, desc=desc, disable=not progress, unit="prompt"):
            out.append({**{k: v for k, v in d.to_json().items() if k not in ("context", "answer")},
                        **score_doc(model, tokenizer, d)})
    return out


def summarize_passkey(results: Sequence[dict]) -> dict:
    """Retrieved / total overall and per depth: by teacher-forced exact match (``retrieved``, ``by_depth``) and by
    the key's digits (``key_digits``, ``by_depth_digits``: ``key_digits_retrieved``)."""
    by_depth: dict[float, list[bool]] = {}
    digits: dict[float, list[bool]] = {}
    for r in results:
        by_depth.setdefault(float(r["depth"]), []).append(bool(r["exact"]))
        # from the greedy string, not r["key_digits"]: points scored before that field existed count alike
        digits.setdefault(float(r["depth"]), []).append(key_digits_retrieved(r["predicted"], r["key"]))
    return {"retrieved": sum(map(bool, (r["exact"] for r in results))), "total": len(results),
            "by_depth": {f"{d:g}": [sum(v), len(v)] for d, v in sorted(by_depth.items())},
            "key_digits": sum(sum(v) for v in digits.values()),
            "by_depth_digits": {f"{d:g}": [sum(v), len(v)] for d, v in sorted(digits.items())}}


def format_passkey(summary: dict) -> str:
    depths = " ".join(f"{d}:{k}/{n}" for d, (k, n) in summary["by_depth"].items())
    return (f"{summary['retrieved']}/{summary['total']} retrieved (depth:retrieved {depths}); key digits right in "
            f"{summary['key_digits']}/{summary['total']}")


# ----------------------------------------------------------------------------- what really ran


@dataclass
class ForwardWatch:
    """Filled by :func:`watch_forward`: forwards seen, the longest input, and fused / fallback prefills."""
    forwards: int = 0
    max_input_tokens: int = 0
    input_tokens: list[int] = field(default_factory=list)
    fused_prefill: int = 0
    blocked_prefill: int = 0

    def to_json(self) -> dict:
        lens = sorted(set(self.input_tokens))
        return {"forwards": self.forwards, "max_input_tokens": self.max_input_tokens,
                "input_lengths": lens[:4] + (["…"] if len(lens) > 8 else []) + lens[max(4, len(lens) - 4):],
                "fused_prefill_calls": self.fused_prefill, "blocked_prefill_calls": self.blocked_prefill}


@contextlib.contextmanager
def watch_forward(model):
    """Record the input lengths of ``model``'s forwards, and count the compressed runtime's prefill attention
    calls (``runtime.attention.attend`` with S = T > 1) that went through the fused SDPA kernel
    (``_prefill_fused`` returned a result) or not. Observation only: the wrapped functions are called
    unchanged and restored on exit."""
    from .runtime import attention

    w = ForwardWatch()

    def pre_hook(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None:
            n = int(ids.shape[1])
            w.forwards += 1
            w.max_input_tokens = max(w.max_input_tokens, n)
            w.input_tokens.append(n)

    real_attend, real_fused = attention.attend, attention._prefill_fused
    fused_now: list[bool] = []

    def attend(q_low, k_low, *a, **kw):  # every attention call of the compressed runtime
        fused_now.clear()
        out = real_attend(q_low, k_low, *a, **kw)
        if q_low.shape[-2] == k_low.shape[-2] and q_low.shape[-2] > 1:  # a prefill from position 0
            if fused_now and fused_now[-1]:
                w.fused_prefill += 1
            else:
                w.blocked_prefill += 1
        return out

    def fused(*a, **kw):
        out = real_fused(*a, **kw)
        fused_now.append(out is not None)
        return out

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    attention.attend, attention._prefill_fused = attend, fused
    try:
        yield w
    finally:
        attention.attend, attention._prefill_fused = real_attend, real_fused
        handle.remove()


__all__ = ["PasskeyDoc", "PasskeyError", "run_passkey", "parse_depths", "make_passkey_doc", "passkey_docs", "encode_pair",
           "score_doc", "score_passkey", "summarize_passkey", "format_passkey", "write_passkey_jsonl",
           "load_passkey_documents", "watch_forward", "check_length", "max_positions"]


def run_passkey(model, tokenizer, length: int, depths, *, samples: int = 1, seed: int = 0,
                filler: str | Path | None = None, progress: bool = True, desc: str = "passkey",
                prefill: str = "compressed") -> dict:
    """Generate and score the prompts: ``{"length", "depths", "samples", "seed", "filler", "summary",
    "results", "forward"}`` (``forward``: :func:`watch_forward` of the scoring)."""
    depth_list = parse_depths(depths)
    check_length(model, int(length))
    docs = passkey_docs(tokenizer, int(length), depth_list, samples=samples, seed=seed, filler=filler)
    with watch_forward(model) as watched:
        results = score_passkey(model, tokenizer, docs, progress=progress, desc=desc, prefill=prefill)
    return {"length": int(length), "depths": depth_list, "samples": int(samples), "seed": int(seed),
            "filler": None if filler is None else str(filler), "summary": summarize_passkey(results),
            "results": results, "forward": watched.to_json()}
