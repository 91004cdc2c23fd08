"""The checkpoint format: names, the sidecar, hashes and fingerprints that saving, loading and comparing share."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError
from ..models import LoadedModel
from ..runtime import adapters, modeling_lowrank, placement
from ..runtime.surgery import CONFIG_VERSION

FORMAT = "lowrank-attn/checkpoint"
FORMAT_VERSION = CONFIG_VERSION  # 2: config.json of model_type lowrank_attn (base nested), runtime files, dtype, delta
SIDECAR = "lowrank_attn.json"
MODELING_FILE = modeling_lowrank.MODELING_FILE
WEIGHTS = "model.safetensors"
DELTA = "delta.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def qk_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the original q/k weights' shapes and a few sums: identifies the source model."""
    h = hashlib.sha256()
    for i in range(adapters.head_layout(model).num_layers):
        for w in adapters.qk_weights(model, i):
            w64 = w.detach().double().cpu()
            h.update(f"{tuple(w.shape)}:{float(w64.sum()):.6e}:{float(w64.abs().sum()):.6e};".encode())
    return h.hexdigest()[:16]


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the state dict, by name, one at a time (offloaded weights never all in memory)."""
    for name in sorted(model.state_dict()):
        with placement.materialized_tensor(model, name) as t:
            yield name, t


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every tensor of a (dense) model as float32 bytes, by name: a base model's full identity."""
    h = hashlib.sha256()
    for name, t in named_tensors(model):
        t = t.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dtype_name(dtype, field: str = "dtype") -> str:
    """'bfloat16' … for a torch dtype or a name; refused (CheckpointError, naming ``field``) outside
    float32/bfloat16/float16."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"{field}: unknown {dtype!r}; choose from {', '.join(DTYPES)}")
    return name


def default_save_dtype(lm: LoadedModel) -> str:
    """The dtype a checkpoint of ``lm`` is saved in unless asked otherwise: the dtype the model was published in
    (``lm.origin["dtype"]``: bf16 for SmolLM2, Qwen2.5, Gemma-3) when it was compressed in float32, else the dtype
    it was compressed in (never widened: a bf16/fp16 run saves in its own dtype)."""
    own = dtype_name(next(lm.model.parameters()).dtype)
    published = (lm.origin or {}).get("dtype")
    return published if own == "float32" and published in DTYPES else own


def describe_checkpoint(path: str | Path) -> str:
    """One line about a written checkpoint: its path, files, total size and weights dtype."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    try:
        side = json.loads((path / SIDECAR).read_text())
    except (OSError, json.JSONDecodeError):
        side = {}
    weights = [p for p in files if p.suffix == ".safetensors"]
    kind = "delta checkpoint" if side.get("delta") else "checkpoint"
    return (f"wrote {kind} {path}: {len(files)} files, {total / 1e6:.1f} MB "
            f"({', '.join(f'{p.name} {p.stat().st_size / 1e6:.1f} MB' for p in weights)}); weights "
            f"{side.get('dtype', '?')}, low-rank maps float32")


def finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN/inf in ``t``, checked in chunks: isfinite of a whole half-precision embedding makes float32
    temporaries the size of the tensor (measured: +1 GB of peak RAM saving Qwen2.5-1.5B in bf16)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def is_map(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("lowrank_")


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a compressed checkpoint directory (it holds the sidecar); ``read_sidecar`` checks it."""
    return (Path(path) / SIDECAR).is_file()


def read_sidecar(path: str | Path) -> dict:
    path = Path(path)
    f = path / SIDECAR
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {path}")
    if not f.is_file():
        raise CheckpointError(f"{path} is not a lowrank-attn checkpoint (no {SIDECAR})")
    try:
        side = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is unreadable or not JSON: {e}") from e
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a lowrank-attn checkpoint sidecar")
    if side.get("format_version") != FORMAT_VERSION:
        v = side.get("format_version")
        hint = ("re-run compress with this lowrank-attn" if isinstance(v, int) and v < FORMAT_VERSION
                else "upgrade lowrank-attn")
        raise CheckpointError(f"{f} has format version {v}; this lowrank-attn reads version {FORMAT_VERSION} ({hint})")
    return side


def source_fingerprint(lm: LoadedModel) -> str:
    """The q/k fingerprint of the model a checkpoint was made from (its own, for a dense model)."""
    side = Path(lm.source) / SIDECAR
    if side.is_file():
        fp = (read_sidecar(lm.source).get("source") or {}).get("qk_fingerprint")
        if fp:
            return fp
    return qk_fingerprint(lm.model)


def check_same_source(compressed: LoadedModel, dense: LoadedModel) -> None:
    """Refuse to compare a checkpoint with a dense model it was not made from."""
    a, b = source_fingerprint(compressed), source_fingerprint(dense)
    if a != b:
        raise CheckpointError(f"{compressed.name} was not made from {dense.name} (q/k weight fingerprints "
                              f"{a} vs {b}); pass the dense model it was compressed from")
