"""Recipes: every knob of a compression run, in one flat, validated record.

A recipe is a YAML mapping whose keys are the fields below; each field is also
a CLI flag of the same name (``rank_ratio`` <-> ``--rank-ratio``). Unset fields
take the defaults shown. Anything unknown, mistyped or out of range is a
:class:`~lowrank_attn.errors.RecipeError`, so a ``Recipe`` is always valid.

Model and placement
  model: str = "smollm2-135m"   model name or path
  mode: str = "auto"            auto | post-rope | rope-pairs | bilinear
                                (auto = post-rope, for models without RoPE too)
Rank allocation
  policy: str = "budget"        budget | energy | bound | uniform | fidelity
  rank_ratio: float = 0.75      mean kept rank / head_dim, in (0, 1] (budget, uniform)
  tau: float = 0.9              energy fraction kept per head, in (0, 1] (energy)
  epsilon: float = 0.05         max certificate (attention TV bound), in (0, 1] (bound)
  max_kl: float | None = None   fidelity: the fewest total K+V cache bytes (key budget, value width) whose
                                next-token KL to the dense model on the held-out tokens is <= max_kl (> 0;
                                needed by policy fidelity unless max_kv_fraction is set; lowrank_attn/policy_fidelity.py)
  max_kv_fraction: float | None = None  fidelity, the other target: the lowest next-token KL on the held-out tokens
                                among the points (key budget, value width) whose total K+V cache bytes at the
                                serving length are <= max_kv_fraction of a bf16 cache, in (0, 1] (not with max_kl).
                                Either target skips points that lose long-range copying (10+ points under dense)
  min_rank: int | None = None   >= 1 (None: 1, and for budget allocation half the budget's mean rank)
  max_rank: int | None = None   >= min_rank when set
  granularity: int = 1          ranks are multiples of it: 1, 2, 4, 8 or 16
  signal: str = "output"        budget allocation driven by: output (measured attention-output
                                error on held-out tokens) | e2e (output, each layer rescaled by the
                                measured next-token KL of compressing it alone; post-rope) |
                                fisher (output change weighted by the next-token loss gradient at
                                that output, one forward+backward: Σ_rows (g·Δo)²) | fisher-diag
                                (Σ_rows Σ_D g²Δo²) | energy (logit energy of the fit)
                                (see lowrank_attn/policies.py)
Fit
  fit: str = "closed-form"      closed-form (ours) | weight-svd | key-pca | think | palu (baselines;
                                lowrank_attn/fits.py)
  ridge: float = 1e-4           ridge on the key covariance, relative to its trace, in [0, 1) (Qwen2.5 and
                                Gemma-3 key covariances have condition numbers of 1e7-1e8; on SmolLM2 1e-4
                                and 1e-6 give the same perplexity to 3 decimals, eval/results/targets)
  weighting: str = "attention"  none | attention (weight keys/queries by attention)
K cache
  exact_window: int | None = None  most recent keys kept exact, >= 0 (None = 256 — k_bits/16 of it with
                                quantised keys, at most seq_len/8 — where the mode keeps full keys, post-rope,
                                else 0); a sliding-window layer keeps at most 1/8 of its window (Gemma-3's
                                512: 64), a full-rank unquantised layer none
  exact_sink: int | None = None first keys kept exact (attention sinks; not on sliding layers), >= 0
                                (None = 1 in post-rope, else 0)
  k_bits: int | None = 4        quantise projected keys: 2, 3, 4 or 8 bits; 16 or None = not quantised
  k_group: int = 32             tokens per quantisation group, a multiple of 8
  k_clip: str = "minmax"        each key quantisation group's range: minmax (KIVI's: the group's min and max) |
                                mse (min/max shrunk about their midpoint by the factor, 1 down to 0.7, of least
                                squared error; the same bytes)
V cache
  v_rank_ratio: float = 1.0     mean kept value rank / head_dim, in (0, 1]: a closed-form map per KV head that
                                keeps what o_proj sees of the attention output (lowrank_attn/vfit.py), one rank
                                per layer from a global budget, multiples of 8; 1.0 = values not projected
  v_bits: int | list[int] | None = 4
                                quantise cached values KIVI-style (per token, groups of v_group channels):
                                2, 3, 4 or 8 bits; 16 or None = not quantised; a list: the fidelity policy
                                picks the width giving the fewest total K+V bytes within max_kl (or the
                                lowest KL within max_kv_fraction; the other policies take the widest)
  v_group: int = 32             channels per value quantisation group: 8, 16, 32, 64 or 128 (smaller where the
                                value rank is not a multiple)
  v_window: int | None = None   most recent values kept unquantised, >= 0 (None = 256·v_bits/16, at most
                                seq_len/8, as the exact keys' default; a sliding-window layer at most 1/8 of
                                its window)
  v_clip: str = "minmax"        each value quantisation group's range: minmax | mse (as k_clip)
  v_rotation: str = "output"    the basis values are quantised in (with v_bits; lowrank_attn/vrotation.py):
                                output (the value fit's output basis, what o_proj sees, then a Hadamard
                                rotation) | hadamard (a Hadamard rotation alone) | none (values as they are)
Calibration data
  text: list[str] = []          text files/globs/dirs, builtin:gutenberg or sampled (empty = builtin:gutenberg)
  seq_len: int | None = None    calibration window length, >= 2 when set (None = 2048 or the model's maximum)
  serve_len: int | None = None  longest context served, >= 2 when set (None = the model's maximum
                                positions): RoPE models see their calibration windows spread over
                                positions [0, serve_len), so the maps hold where the cache is long
  max_tokens: int | None = 32768  calibration (fit) tokens, >= 1 when set
  heldout_tokens: int = 4096    tokens held out for the allocation signal and the certificate, >= 0
                                (32768 + 4096 vs 16384 + 2048 at 50%: SmolLM2 +2.4% -> +1.8%, Gemma-3
                                +8.3% -> +4.0% held-out token ppl, eval/results/targets; 2x the time)
Runtime
  seed: int = 0                 in [0, 2**32)
  device: str = "cpu"
  dtype: str = "float32"        float32 | float16 | bfloat16

``text`` is stored as a tuple (so a Recipe is immutable and hashable); a list
or a single string is accepted on input and ``to_dict`` gives a list.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

_CHOICES = {  # mode, policy, signal and fit: from their registries (``choices``)
    "weighting": ("none", "attention"),
    "dtype": ("float32", "float16", "bfloat16"),
    "granularity": (1, 2, 4, 8, 16),
    "k_bits": (2, 3, 4, 8, 16),
    "v_bits": (2, 3, 4, 8, 16),
    "v_group": (8, 16, 32, 64, 128),
    "k_clip": ("minmax", "mse"),
    "v_clip": ("minmax", "mse"),
}


def choices(name: str) -> tuple | None:
    """The values field ``name`` takes, or None for a field without a fixed set. Modes, allocation policies and
    signals, and fits are read from their registries (``runtime.modes.MODES``, ``policies.POLICIES``/``SIGNALS``,
    ``fits.FITS``), so a new one is registered in one place; imported here on first use (they need torch)."""
    if name == "mode":
        from .runtime.modes import MODES

        return ("auto", *MODES)
    if name in ("policy", "signal"):
        from .policies import POLICIES, SIGNALS

        return tuple(POLICIES if name == "policy" else SIGNALS)
    if name == "fit":
        from .fits import fit_names

        return fit_names()
    if name == "v_rotation":
        from .vrotation import ROTATIONS

        return tuple(ROTATIONS)
    return _CHOICES.get(name)


# field -> (predicate, description of the allowed range)
_RANGES = {
    "rank_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "epsilon": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "max_kl": (lambda v: v > 0, "> 0"),
    "max_kv_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "ridge": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "min_rank": (lambda v: v >= 1, ">= 1"),
    "exact_window": (lambda v: v >= 0, ">= 0"),
    "exact_sink": (lambda v: v >= 0, ">= 0"),
    "k_group": (lambda v: v >= 8 and v % 8 == 0, "a multiple of 8 (codes are packed in bytes)"),
    "v_rank_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "v_window": (lambda v: v >= 0, ">= 0"),
    "seq_len": (lambda v: v >= 2, ">= 2"),
    "serve_len": (lambda v: v >= 2, ">= 2"),
    "max_tokens": (lambda v: v >= 1, ">= 1"),
    "heldout_tokens": (lambda v: v >= 0, ">= 0"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "model": (bool, "a non-empty string"),
    "device": (bool, "a non-empty string"),
    "text": (lambda v: all(v), "a list of non-empty strings"),
}
# field -> (expected type name, None allowed)
_TYPES = {
    "model": ("str", False), "mode": ("str", False), "policy": ("str", False),
    "rank_ratio": ("float", False), "tau": ("float", False), "epsilon": ("float", False), "max_kl": ("float", True),
    "max_kv_fraction": ("float", True),
    "min_rank": ("int", True), "max_rank": ("int", True), "granularity": ("int", False),
    "ridge": ("float", False), "weighting": ("str", False), "fit": ("str", False), "signal": ("str", False), "exact_window": ("int", True),
    "exact_sink": ("int", True),
    "k_bits": ("int", True), "k_group": ("int", False), "k_clip": ("str", False), "text": ("list[str]", False),
    "v_rank_ratio": ("float", False), "v_bits": ("int|list[int]", True), "v_group": ("int", False), "v_window": ("int", True),
    "v_rotation": ("str", False), "v_clip": ("str", False),
    "seq_len": ("int", True), "serve_len": ("int", True), "max_tokens": ("int", True), "heldout_tokens": ("int", False),
    "seed": ("int", False), "device": ("str", False), "dtype": ("str", False),
}


def _show(value: Any) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(name: str, value: Any) -> Any:
    """Check the type of one field's value; return it in canonical form."""
    kind, nullable = _TYPES[name]
    if value is None and nullable:
        return None
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise RecipeError(f"{name}: number too large, got {_show(value)}") from None
        if not math.isfinite(value):
            raise RecipeError(f"{name}: must be a finite number, got {value!r}")
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int|list[int]" and isinstance(value, (list, tuple)) and value \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        widths = tuple(sorted(set(int(v) for v in value)))
        return widths[0] if len(widths) == 1 else widths
    if kind == "int|list[int]" and isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if kind == "list[str]":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    kind = {"int|list[int]": "an int or a list of ints"}.get(kind, kind)
    expected = f"{kind} or null" if nullable else kind
    raise RecipeError(f"{name}: expected {expected}, got {_show(value)} ({type(value).__name__})")


def _check_names(names, what: str) -> None:
    valid = [f.name for f in dataclasses.fields(Recipe)]
    for key in names:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid fields: {', '.join(valid)}"
            plain = isinstance(key, str) and key.isprintable() and key.strip() == key != ""
            name = key if plain else _show(key)  # never a newline in the message
            raise RecipeError(f"{name}: unknown {what}{hint}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: str = "smollm2-135m"
    mode: str = "auto"
    policy: str = "budget"
    signal: str = "output"
    rank_ratio: float = 0.75
    tau: float = 0.9
    epsilon: float = 0.05
    max_kl: float | None = None
    max_kv_fraction: float | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    granularity: int = 1
    fit: str = "closed-form"
    ridge: float = 1e-4
    weighting: str = "attention"
    exact_window: int | None = None
    exact_sink: int | None = None
    k_bits: int | None = 4
    k_group: int = 32
    k_clip: str = "minmax"
    v_rank_ratio: float = 1.0
    v_bits: int | tuple[int, ...] | None = 4
    v_group: int = 32
    v_window: int | None = None
    v_rotation: str = "output"
    v_clip: str = "minmax"
    text: tuple[str, ...] = ()
    seq_len: int | None = None
    serve_len: int | None = None
    max_tokens: int | None = 32768
    heldout_tokens: int = 4096
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if value is None:
                continue
            allowed_values = choices(f.name)
            values = value if f.name == "v_bits" and isinstance(value, tuple) else (value,)
            if allowed_values is not None and any(v not in allowed_values for v in values):
                allowed = ", ".join(map(str, allowed_values))
                raise RecipeError(f"{f.name}: must be one of {allowed}, got {_show(value)}")
            if f.name in _RANGES and not _RANGES[f.name][0](value):
                raise RecipeError(f"{f.name}: must be {_RANGES[f.name][1]}, got {_show(value)}")
        for name in ("k_bits", "v_bits"):  # 16 bits: kept as the model holds them (bf16), i.e. not quantised
            if getattr(self, name) == 16:
                object.__setattr__(self, name, None)
        if self.max_kl is not None and self.max_kv_fraction is not None:
            raise RecipeError("max_kv_fraction: the fidelity policy takes one target, max_kl or max_kv_fraction, "
                              "not both")
        if self.max_rank is not None and self.max_rank < (self.min_rank or 1):
            raise RecipeError(f"max_rank: must be >= min_rank ({self.min_rank or 1}), got {self.max_rank}")

    def check_targets(self) -> None:
        """A fidelity target and the fidelity policy go together (checked before any work: a target under another
        policy would be silently ignored, the policy without one cannot choose)."""
        target = "max_kl" if self.max_kl is not None else "max_kv_fraction" if self.max_kv_fraction is not None else None
        if target and self.policy != "fidelity":
            raise RecipeError(f"{target}: only the fidelity policy reads a target (policy: fidelity; --max-kl and "
                              f"--max-kv-fraction set it), not policy {self.policy}")
        if self.policy == "fidelity" and target is None:
            raise RecipeError("max_kl: policy fidelity needs a target: a next-token KL (max_kl: X, or --max-kl X) or "
                              "a share of the bf16 K+V cache (max_kv_fraction: X, or --max-kv-fraction X)")

    @property
    def value_bit_options(self) -> tuple:
        """The value widths ``v_bits`` allows, fewest bytes first (None: not quantised, 16 in a list)."""
        widths = self.v_bits if isinstance(self.v_bits, tuple) else (self.v_bits,)
        return tuple(None if w in (None, 16) else w for w in widths)

    def with_value_bits(self, bits: int | None) -> Recipe:
        """This recipe with one value width (``v_bits`` None: values not quantised)."""
        return dataclasses.replace(self, v_bits=bits)

    def one_value_width(self) -> Recipe:
        """This recipe if it has one value width, else with the widest of its list (what every policy but
        fidelity installs)."""
        return self.with_value_bits(self.value_bit_options[-1]) if isinstance(self.v_bits, tuple) else self

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError(f"recipe: expected a mapping of field: value, got {type(d).__name__}")
        _check_names(d, "recipe field")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"cannot read recipe file {path}: {e}") from None
        try:
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise RecipeError(f"invalid YAML in {path}{where}: {problem}".replace("\n", " ")) from None
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {path}: top level must be a mapping of field: value, "
                              f"got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with the non-None overrides applied (unset CLI flags are None)."""
        _check_names(overrides, "recipe override")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def yaml_value(text: str) -> Any:
    """One value read as in a recipe file (``1e-4`` is a float; plain YAML 1.1 would give a string)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads ``1e-6`` as a float (YAML 1.2); plain
    SafeLoader (YAML 1.1) would give the string '1e-6'; and refuses a key given twice (plain SafeLoader keeps the
    last). Constructs nothing else."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"field {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
