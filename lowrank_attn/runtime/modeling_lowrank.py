"""transformers classes of a lowrank-attn checkpoint: ``model_type: lowrank_attn``.

A checkpoint's ``config.json`` is this package's own type, with the base model's config nested::

    {"model_type": "lowrank_attn", "base_config": {"model_type": "llama", ...}, "lowrank_attn": {...},
     "auto_map": {"AutoConfig": "modeling_lowrank.LowRankAttnConfig",
                  "AutoModelForCausalLM": "modeling_lowrank.LowRankAttnForCausalLM"}}

so stock transformers cannot mistake it for the dense model: without ``trust_remote_code=True``
``AutoModelForCausalLM.from_pretrained(DIR)`` fails instead of loading the base class and silently
dropping the ``lowrank_*`` tensors. With it, transformers imports this file from the checkpoint
(which carries the runtime files verbatim, this one included) and
``LowRankAttnForCausalLM.from_pretrained`` returns the base architecture's causal-LM class with the
compressed attention installed. ``lowrank_attn.load_compressed(DIR)`` uses the installed package's
copy of this module instead, and runs nothing from DIR.

Imports only torch, transformers and sibling modules (relative, one ``from .x import`` line per
sibling, the form transformers' remote-code loader follows when it copies a checkpoint's files).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import transformers

from .errors import LowrankAttnError

# transformers versions this runtime is written against: [min, max). Tested: 5.23.0.
TRANSFORMERS_RANGE = ((5, 23), (6, 0))


class UnsupportedTransformersError(LowrankAttnError, ImportError):
    """The installed transformers is outside the range this runtime supports."""


def check_transformers_version(version: str | None = None) -> None:
    version = version or transformers.__version__
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = TRANSFORMERS_RANGE
    if m is None or not lo <= (int(m[1]), int(m[2])) < hi:
        raise UnsupportedTransformersError(
            f"lowrank-attn checkpoints need transformers >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} (tested 5.23.0); "
            f"this is transformers {version}")


check_transformers_version()  # before the imports below, which other versions may lack

from huggingface_hub.dataclasses import strict  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel  # noqa: E402

from .adapters import attention_modules, head_layout  # noqa: E402
from .kcache import LowRankKeyLayer  # noqa: E402,F401  (every sibling named, so that the loader copies it)
from .plan import LayerPlan  # noqa: E402
from .surgery import install_plans, plans_config, plans_from_config, swap_class  # noqa: E402

MODEL_TYPE = "lowrank_attn"
DELTA_MODEL_TYPE = "lowrank_attn_delta"  # a delta checkpoint: no weights of the base, loadable by lowrank_attn only
MODELING_FILE = "modeling_lowrank.py"
ATTN_IMPLEMENTATION = "sdpa"  # the mask format the compressed forward reads (eager's additive mask works too)
FALLBACK_ATTN_IMPLEMENTATION = "eager"  # for classes that refuse sdpa (Gemma-2: its attention-logit soft cap)


@strict(accept_kwargs=True)
class LowRankAttnConfig(PreTrainedConfig):
    """The base model's config (``base_config``, a dict with its own ``model_type``) + the compression
    settings (``lowrank_attn``, ``surgery.plans_config``: mode, ranks, planes, window, sink, k_bits, k_group,
    k_clip, and with compressed values v_ranks, v_bits, v_group, v_window, v_rotation, v_clip)."""

    model_type = MODEL_TYPE
    base_config: dict | None = None
    lowrank_attn: dict | None = None

    def base(self) -> PreTrainedConfig:
        """The base architecture's config object, carrying ``lowrank_attn``."""
        if not isinstance(self.base_config, dict) or "model_type" not in self.base_config:
            raise LowrankAttnError("config.json of a lowrank-attn checkpoint has no base_config with a model_type")
        if not isinstance(self.lowrank_attn, dict):
            raise LowrankAttnError("config.json of a lowrank-attn checkpoint has no lowrank_attn settings")
        d = dict(self.base_config)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        cfg.lowrank_attn = self.lowrank_attn
        return cfg


def wrap_config(base: PreTrainedConfig, lowrank: dict, dtype: str | None = None, *, delta: bool = False) -> dict:
    """The config.json dict of a checkpoint of ``base`` compressed as ``lowrank``. A delta checkpoint's
    type is ``lowrank_attn_delta``, without ``auto_map``: transformers names it and stops."""
    base_dict = base.to_dict()
    for k in ("auto_map", "lowrank_attn", "transformers_version", "_name_or_path"):
        base_dict.pop(k, None)
    if dtype is not None:
        base_dict["dtype"] = dtype
    out = {
        "model_type": MODEL_TYPE, "architectures": ["LowRankAttnForCausalLM"],
        "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.LowRankAttnConfig",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.LowRankAttnForCausalLM"},
        "base_config": base_dict, "lowrank_attn": lowrank, "dtype": base_dict.get("dtype"),
        "transformers_version": transformers.__version__,
    }
    if delta:
        out.update(model_type=DELTA_MODEL_TYPE, architectures=None)
        del out["auto_map"]
    return out


def runtime_files() -> list[Path]:
    """The runtime modules a checkpoint carries verbatim (this directory's ``*.py`` but ``__init__``)."""
    return sorted(p for p in Path(__file__).parent.glob("*.py") if p.name != "__init__.py")


def write_checkpoint_files(directory: str | Path, base: PreTrainedConfig, lowrank: dict,
                           dtype: str | None = None) -> None:
    """Turn a ``save_pretrained`` directory of the base class into a lowrank-attn checkpoint: the wrapped
    config.json and the runtime files (the code ``trust_remote_code=True`` imports)."""
    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(wrap_config(base, lowrank, dtype), indent=2, sort_keys=True) + "\n")
    for f in runtime_files():
        shutil.copyfile(f, directory / f.name)


_CLASSES: dict[type, type] = {}


def compressed_class(base_cls: type) -> type:
    """``base_cls`` (e.g. LlamaForCausalLM) whose __init__ installs the compressed attention described by
    ``config.lowrank_attn`` and whose save_pretrained writes a lowrank-attn checkpoint (never one that
    loads as the dense model)."""
    if getattr(base_cls, "_lowrank_model", False):
        return base_cls
    if base_cls in _CLASSES:
        return _CLASSES[base_cls]

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        install_plans(self, plans_from_config(config.lowrank_attn, head_layout(self)))

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = base_cls.save_pretrained(self, save_directory, *args, **kwargs)
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        lowrank = getattr(self.config, "lowrank_attn", None)  # set when loaded; compressed in place: the plans
        lowrank = lowrank or plans_config([m.lowrank_plan for m in attention_modules(self)])
        write_checkpoint_files(save_directory, self.config, lowrank, dtype)
        return out

    cls = type(f"LowRank{base_cls.__name__}", (base_cls,), {
        "__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__, "_lowrank_model": True,
        "__doc__": f"{base_cls.__name__} with lowrank-attn compressed attention (config.lowrank_attn)."})
    _CLASSES[base_cls] = cls
    return cls


def apply_lowrank(model, plans: list[LayerPlan]):
    """Install the plans in place (``surgery.install_plans``: each layer's mode adds its buffers or folds its
    maps into the q/k weights); a transformers model's class becomes its compressed class, whose
    save_pretrained writes the plans."""
    install_plans(model, plans)
    if isinstance(model, PreTrainedModel):
        swap_class(model, compressed_class(type(model)))
    return model


def _base_class(base: PreTrainedConfig) -> type:
    try:
        return AutoModelForCausalLM._model_mapping[type(base)]
    except KeyError as e:
        raise LowrankAttnError(f"transformers has no causal-LM class for model type {base.model_type!r}") from e


def attention_implementation(base_cls: type) -> str:
    """The attention implementation a compressed ``base_cls`` is built with: SDPA where the class takes it,
    else eager (Gemma-2, whose attention-logit soft cap SDPA cannot apply and transformers refuses). Either
    way the compressed forward reads a 4-D mask (bool or additive) and applies the family's soft cap itself."""
    return ATTN_IMPLEMENTATION if getattr(base_cls, "_supports_sdpa", False) else FALLBACK_ATTN_IMPLEMENTATION


def _force_attention(kwargs: dict, base_cls: type) -> dict:
    """The compressed forward reads SDPA/eager-format masks: whatever the caller asked for, build with SDPA
    (eager for a class without SDPA; flash / flex masks would be misread, and flash-attn need not be installed)."""
    kwargs = dict(kwargs)
    kwargs["attn_implementation"] = attention_implementation(base_cls)
    return kwargs


def build_model(base: PreTrainedConfig):
    """A freshly initialised compressed model of the base architecture (``base.lowrank_attn`` set); the
    caller loads its weights."""
    check_transformers_version()
    base_cls = _base_class(base)
    return compressed_class(base_cls)._from_config(base, attn_implementation=attention_implementation(base_cls))


class LowRankAttnForCausalLM(PreTrainedModel):
    """Entry point for ``AutoModelForCausalLM``: builds the base architecture's causal-LM class (from
    ``config.base_config``) with compressed attention. Instances are of ``compressed_class(base)``."""

    config_class = LowRankAttnConfig

    def __init__(self, *args, **kwargs):  # never instantiated: from_pretrained / from_config dispatch
        raise TypeError("use LowRankAttnForCausalLM.from_pretrained(DIR) or AutoModelForCausalLM.from_config(config)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        check_transformers_version()
        kwargs.pop("trust_remote_code", None)
        if not isinstance(config, LowRankAttnConfig):
            config = LowRankAttnConfig.from_pretrained(pretrained_model_name_or_path,
                                                       **{k: kwargs[k] for k in ("local_files_only", "revision",
                                                                                 "cache_dir") if k in kwargs})
        base = config.base()
        base_cls = _base_class(base)
        return compressed_class(base_cls).from_pretrained(pretrained_model_name_or_path, *model_args, config=base,
                                                          **_force_attention(kwargs, base_cls))

    @classmethod
    def _from_config(cls, config, **kwargs):
        check_transformers_version()
        base = config.base() if isinstance(config, LowRankAttnConfig) else config
        base_cls = _base_class(base)
        return compressed_class(base_cls)._from_config(base, **_force_attention(kwargs, base_cls))

    from_config = _from_config
