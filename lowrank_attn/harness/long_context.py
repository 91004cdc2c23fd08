"""The long-context run behind ``eval/long_context.py``: perplexity change vs dense against context length, and
passkey retrieval at the longest (:mod:`.long_report` writes the report).

Methods (:func:`parse_method`): ``dense``; a name of the sweep's (``sweep.METHODS``, ``sweep.QUANT_ONLY``,
``sweep.BOUND``: ``ours`` = the recipe itself, ``ours+4bit``, ``kivi-4bit`` = K-cache quantisation alone at full
rank, …); or ``LABEL:SPEC`` where SPEC is comma-separated parts, each a recipe YAML (the base instead of the
recipe given) or ``field=value`` overrides (values read as YAML), applied after a known LABEL's own overrides.

:func:`run_long` compresses every method once (methods with the same calibration fields share one calibration:
``compression.prepare_calibration``) and saves it under ``ckpt_dir`` (default ``runs/long/<model>``), so a resumed
run loads it instead of compressing again; all the methods' models are then held in memory together (one copy of
the weights each) and measured point by point across methods -- every method at one length before the next
length, then passkey prompt by prompt -- so a run stopped early compares them on the same points. Measured:

* perplexity at each length L: lm-eval's rolling loglikelihood (``evaluate.perplexity``, HFLM with
  ``max_length=L``) on ONE held-out document: ``eval_tokens`` (default the longest length, less a few) tokens of
  ``text`` (default a Gutenberg novel) starting ``skip_tokens`` in (default the recipe's calibration tokens,
  max_tokens + heldout_tokens: beyond anything calibration reads from one text). The same tokens are scored at
  every L, in L-token windows; change vs dense in token perplexity. Each point records the longest input the model
  was given and the compressed runtime's fused-SDPA prefills (``longctx.watch_forward``);
* passkey at the longest length (``passkey_length``), depths × samples prompts, teacher-forced exact match
  (``longctx``);
* the K bytes per token of each method's cache after a forward over the document (floats counted at 2 bytes).

Points are appended to ``long.jsonl`` (atomically, one per perplexity length or passkey prompt:
:func:`point_store`), so a killed run resumes where it stopped; ``max_minutes`` stops starting new points after
that long (run again to continue).

Stdlib at module level; torch, transformers and lm-eval are imported where they are used.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from ..errors import LowrankAttnError, RecipeError
from .provenance import REPO
from .store import ResultsStore

DEFAULT_TEXT = "../shared/data/gutenberg-moby-dick.txt"
CAL_FIELDS = ("model", "text", "seq_len", "serve_len", "max_tokens", "heldout_tokens", "seed", "device", "dtype")
DEFAULT_METHODS = ("dense", "ours", "ours+4bit", "kivi-4bit")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)


def default_out(model: str) -> Path:
    """Where a model's report goes: ``eval/results/<model>/long`` in the checkout."""
    return REPO / "eval" / "results" / model / "long"


def base_recipe(model: str, recipe: str | None = None):
    """``recipe`` (a YAML path), else ``recipes/<model>.yaml`` where it exists, else the defaults; for ``model``."""
    from ..recipe import Recipe

    rpath = recipe or (REPO / "recipes" / f"{model}.yaml")
    base = Recipe.from_yaml(rpath) if recipe or Path(rpath).is_file() else Recipe()
    return base.replace(model=model)


# ----------------------------------------------------------------------------- methods


def parse_method(item: str, base) -> tuple[str, object | None]:
    """(label, recipe or None for dense) from ``NAME`` or ``LABEL:SPEC`` (see the module docstring)."""
    import yaml

    from ..recipe import Recipe
    from ..sweep import BOUND, METHODS, QUANT_ONLY

    label, _, spec = item.partition(":")
    label = label.strip()
    known = dict(METHODS, **QUANT_ONLY, **BOUND)
    if not label:
        raise RecipeError(f"--methods: empty method name in {item!r}")
    if label == "dense" and not spec:
        return label, None
    if label not in known and not spec:
        raise RecipeError(f"--methods: unknown method {label!r}; choose from dense, {', '.join(known)}, "
                          "or give LABEL:recipe.yaml / LABEL:field=value,…")
    recipe = base
    overrides: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.endswith((".yaml", ".yml")) and "=" not in part:
            recipe = Recipe.from_yaml(part).replace(model=base.model, device=base.device)
        elif "=" in part:
            k, _, v = part.partition("=")
            overrides[k.strip()] = yaml.safe_load(v)
        else:
            raise RecipeError(f"--methods: {part!r} in {item!r} is neither a recipe .yaml nor field=value")
    if label in known:
        recipe = recipe.replace(**known[label], **({"rank_ratio": 1.0} if label in QUANT_ONLY else {}))
    return label, recipe.replace(**overrides) if overrides else recipe


def recipe_hash(recipe) -> str:
    """Ten hex digits of the recipe: the name of its saved checkpoint (a changed recipe is compressed again)."""
    return hashlib.sha1(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- store


def point_key(p: dict) -> str:
    if p["kind"] == "kbytes":
        return f"{p['method']}|kbytes"
    if p["kind"] == "ppl":
        return f"{p['method']}|ppl|{p['length']}"
    return f"{p['method']}|passkey|{p['length']}|{p['depth']!r}|{p['sample']}"


def point_store(path: Path) -> ResultsStore:
    """``long.jsonl`` (``lowrank_attn.harness.ResultsStore``): a line that is not a point is an error naming it."""
    return ResultsStore(path, ("method", "kind", "length", "depth", "sample"), required=("method", "kind"), strict=True,
                        what="long-context point")


def load_points(path: Path) -> dict[str, dict]:
    try:
        return {point_key(p): p for p in point_store(path).rows()}
    except (KeyError, TypeError) as e:
        raise LowrankAttnError(f"{path}: a point lacks {e}; delete the line or the file to restart") from e


# ----------------------------------------------------------------------------- text


def heldout_text(tokenizer, text_file: str, skip: int, n_tokens: int) -> tuple[str, int]:
    """(text, tokens): ``n_tokens`` tokens of ``text_file`` after the first ``skip``, decoded, trimmed until
    its own tokenization holds at most ``n_tokens`` tokens (so lm-eval's windows tile it exactly)."""
    from ..texts import resolve_text_file

    path = resolve_text_file(text_file)
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    if len(ids) < skip + n_tokens + 16:
        raise LowrankAttnError(f"{path} has {len(ids)} tokens; --skip-tokens {skip} + --eval-tokens {n_tokens} "
                               "need more (lower them or give a longer --text)")
    seg = ids[skip : skip + n_tokens + 16]  # a little more: the document is stripped (as the task strips it)
    while True:
        text = tokenizer.decode(seg).strip()
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        if n <= n_tokens:
            return text, n
        seg = seg[: len(seg) - max(1, (n - n_tokens) // 2)]


# ----------------------------------------------------------------------------- run


def run_long(model_name: str, out: Path, *, recipe, methods: list[str], lengths: list[int], depths="8", samples=1,
             seed=0, passkey_length=None, filler=None, text=DEFAULT_TEXT, skip_tokens=None, eval_tokens=None,
             ckpt_dir=None, max_minutes=None, progress=True, log=print) -> tuple[list[dict], dict]:
    """Run (or resume) the report's points into ``out``/long.jsonl; returns (points, meta)."""
    from ..longctx import parse_depths

    lengths = sorted({int(x) for x in lengths})
    if not lengths or lengths[0] < 2:
        raise RecipeError(f"--lengths: need one or more lengths of at least 2 tokens, got {lengths}")
    depth_list = parse_depths(depths) if depths else []
    specs = dict(parse_method(m, recipe) for m in methods)
    if "dense" not in specs:
        specs = {"dense": None, **specs}
    run = LongRun(model_name, recipe, specs, lengths, depth_list, samples=samples, seed=seed,
                  passkey_length=passkey_length, filler=filler, text=text, progress=progress, log=log)
    run.open(out, skip_tokens=skip_tokens, eval_tokens=eval_tokens, max_minutes=max_minutes,
             ckpt_root=Path(ckpt_dir or REPO / "runs" / "long" / model_name.replace("/", "_")))
    tmp = Path(tempfile.mkdtemp(prefix="long-context-"))
    run.doc_file = tmp / "heldout.txt"
    run.doc_file.write_text(run.doc_text)
    try:
        run.run_all()
    finally:
        run.doc_file.unlink(missing_ok=True)
        tmp.rmdir()
    missing = sum(len(run.todo(label)) for label in specs)
    run.meta["complete"] = missing == 0
    if missing:
        log(f"{missing} point(s) left: run again to resume")
    return list(run.points.values()), run.meta


class LongRun:
    """One run of :func:`run_long`: the dense model (compressed in place, restored after), the document, the passkey
    prompts, the points done so far, and the methods' models."""

    def __init__(self, model_name: str, recipe, specs: dict, lengths: list[int], depths: list[float], *, samples=1,
                 seed=0, passkey_length=None, filler=None, text=DEFAULT_TEXT, progress=True, log=print):
        from ..longctx import check_length
        from ..models import load_model

        self.model_name, self.recipe, self.specs, self.lengths, self.depths = model_name, recipe, specs, lengths, depths
        self.samples, self.seed, self.filler, self.text = samples, seed, filler, text
        self.progress, self.log = progress, log
        self.pk_len = int(passkey_length or lengths[-1])
        self.dense = load_model(model_name, device=recipe.device, dtype=recipe.dtype)
        for n in (*lengths, self.pk_len):
            check_length(self.dense.model, n, "length")
        self.cals: dict = {}
        self.doc_file: Path | None = None

    def open(self, out: Path, *, skip_tokens=None, eval_tokens=None, max_minutes=None, ckpt_root: Path) -> None:
        """The held-out document, the passkey prompts, the points already in ``out``/long.jsonl, the deadline and
        the run's meta."""
        import torch

        from ..longctx import passkey_docs
        from ..texts import bos_prefix

        recipe, tok, lengths = self.recipe, self.dense.tokenizer, self.lengths
        skip = int(skip_tokens if skip_tokens is not None else (recipe.max_tokens or 0) + recipe.heldout_tokens)
        # one document of exactly the longest window: lm-eval's first window then reads all of it (its prefix token
        # stands in for the first); a BOS that lm-eval's own tokenization adds counts as one of them
        n_eval = int(eval_tokens or lengths[-1] - len(bos_prefix(tok)))
        self.doc_text, doc_tokens = heldout_text(tok, self.text, skip, n_eval)
        self.docs = passkey_docs(tok, self.pk_len, self.depths, samples=self.samples, seed=self.seed,
                                 filler=self.filler) if self.depths else []
        out.mkdir(parents=True, exist_ok=True)
        self.store = point_store(out / "long.jsonl")
        self.points = load_points(self.store.path)
        self.deadline = None if max_minutes is None else time.monotonic() + 60 * float(max_minutes)
        self.ckpt_root = ckpt_root
        # K bytes are counted on the held-out document itself (the longest window): the exact keys' share is its own
        self.probe = torch.tensor(tok(self.doc_text, add_special_tokens=False).input_ids[: lengths[-1]])
        self.meta = {"model": self.model_name, "recipe": recipe.to_dict(),
                     "methods": {k: (v.to_dict() if v else None) for k, v in self.specs.items()},
                     "lengths": lengths, "passkey_length": self.pk_len, "depths": self.depths,
                     "samples": int(self.samples), "seed": int(self.seed), "filler": self.filler, "text": str(self.text),
                     "skip_tokens": skip, "eval_tokens": doc_tokens, "k_bytes_probe_tokens": int(self.probe.numel())}

    # ------------------------------------------------------------------ bookkeeping

    def passkey_key(self, label: str, d) -> str:
        return point_key({"method": label, "kind": "passkey", "length": self.pk_len, "depth": d.depth,
                          "sample": d.sample})

    def todo(self, label: str) -> list[str]:
        keys = [f"{label}|kbytes"] + [f"{label}|ppl|{n}" for n in self.lengths]
        keys += [self.passkey_key(label, d) for d in self.docs]
        return [k for k in keys if k not in self.points]

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def record(self, point: dict) -> None:
        self.points[point_key(point)] = self.store.append(point)

    def schedule(self, models) -> list:
        # every method at one length before the next length, then passkey prompt by prompt across methods: a run
        # stopped early (--max-minutes) still compares the methods on what it did
        return ([("kbytes", None, m) for m in models] + [("ppl", n, m) for n in self.lengths for m in models]
                + [("passkey", d, m) for d in self.docs for m in models])

    # ------------------------------------------------------------------ models

    def extras(self, lm, report) -> dict:
        """The fields every point of a method carries: its K bytes per token (as held, and floats at 2 bytes) and
        its report's rank ratios."""
        from ..sweep import key_bytes_per_token

        summ = (report or {}).get("summary") or {}
        held, bf16 = key_bytes_per_token(lm.model, self.probe)  # as the model holds them; floats counted at 2 bytes
        return {"k_bytes_per_token": held, "k_bytes_per_token_bf16": bf16,
                "k_bytes_probe_tokens": int(self.probe.numel()),
                "mean_rank_ratio": summ.get("mean_rank_ratio", 1.0),
                "padded_rank_ratio": summ.get("padded_rank_ratio", 1.0)}

    def compressed(self, rec):
        """compress ``dense`` in place by ``rec`` (one calibration per set of calibration fields)."""
        from ..compression import compress, prepare_calibration

        ck = tuple(json.dumps(rec.to_dict().get(f), default=str) for f in CAL_FIELDS)
        if ck not in self.cals:
            self.cals[ck] = prepare_calibration(self.dense, rec, progress=self.progress)
        return compress(self.dense, rec, calibration=self.cals[ck], progress=self.progress)

    def load_models(self) -> tuple[dict, list]:
        """label -> (model, extra fields), all in memory at once (compressed and saved once, loaded from
        ``ckpt_root`` after); and the methods whose model cannot be saved (baselines), measured alone later."""
        from ..checkpoint import is_checkpoint, load_compressed, read_sidecar, save_compressed
        from ..models import restorable

        models: dict = {}
        in_place = []
        for label, rec in self.specs.items():
            if not self.todo(label) or self.out_of_time():
                continue
            if rec is None:
                models[label] = (self.dense, self.extras(self.dense, None))
                continue
            path = self.ckpt_root / f"{label.replace('/', '_')}-{recipe_hash(rec)}"
            if not is_checkpoint(path):
                with restorable(self.dense.model):
                    lm, report = self.compressed(rec)
                    try:
                        save_compressed(lm, report, path, overwrite=True)
                    except LowrankAttnError as e:
                        self.log(f"{label}: not saved ({e}); measured alone")
                        in_place.append((label, rec))
                        continue
            self.log(f"{label}: loading {path}")
            lm = load_compressed(path, device=rec.device)
            models[label] = (lm, self.extras(lm, read_sidecar(path)))
        return models, in_place

    def run_all(self) -> None:
        from ..models import restorable

        models, in_place = self.load_models()
        for kind, arg, label in self.schedule(models):
            if not self.measure(label, *models[label], kind, arg):
                break
        for label, rec in in_place:
            if self.out_of_time():
                break
            with restorable(self.dense.model):
                lm, report = self.compressed(rec)
                ex = self.extras(lm, report)
                for kind, arg, _ in self.schedule([label]):
                    if not self.measure(label, lm, ex, kind, arg):
                        break

    # ------------------------------------------------------------------ points

    def measure(self, label: str, lm, extra: dict, kind: str, arg) -> bool:
        """One point (the K bytes, perplexity at length ``arg``, or the passkey prompt ``arg``); False when out of
        time."""
        if kind == "kbytes":
            if f"{label}|kbytes" not in self.points:
                self.record({"method": label, "kind": "kbytes", **extra})
            return True
        done = f"{label}|ppl|{arg}" if kind == "ppl" else self.passkey_key(label, arg)
        if done in self.points:
            return True
        if self.out_of_time():
            return False
        (self.perplexity_point if kind == "ppl" else self.passkey_point)(label, lm, extra, arg)
        return True

    def perplexity_point(self, label: str, lm, extra: dict, length: int) -> None:
        from ..evaluate import perplexity

        t0 = time.perf_counter()
        res = perplexity(lm.model, lm.tokenizer, task=str(self.doc_file), min_chars=10 ** 12, max_length=length,
                         progress=self.progress)
        p = {"method": label, "kind": "ppl", "length": length, "token_perplexity": res["token_perplexity"],
             "word_perplexity": res["word_perplexity"], "tokens": res["tokens"], "documents": res["documents"],
             "forward": res["forward"], "seconds": round(time.perf_counter() - t0, 1), **extra}
        self.record(p)
        self.log(f"{label:>12} ppl @ {length:>5}: token ppl {p['token_perplexity']:.3f} (windows up to "
                 f"{p['forward']['max_input_tokens']} tokens, fused prefills {p['forward']['fused_prefill_calls']}, "
                 f"{p['seconds']:.0f} s)")

    def passkey_point(self, label: str, lm, extra: dict, d) -> None:
        from ..longctx import score_passkey, watch_forward

        t0 = time.perf_counter()
        with watch_forward(lm.model) as w:
            r = score_passkey(lm.model, lm.tokenizer, [d], progress=False)[0]
        p = {"method": label, "kind": "passkey", **r, "forward": w.to_json(),
             "seconds": round(time.perf_counter() - t0, 1), **extra}
        self.record(p)
        self.log(f"{label:>12} passkey @ {self.pk_len} depth {d.depth:.3f}: {'retrieved' if r['exact'] else 'missed'} "
                 f"(key {r['key']}, greedy {r['predicted']!r}, fused prefills {w.fused_prefill}, {p['seconds']:.0f} s)")
