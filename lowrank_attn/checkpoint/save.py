"""Writing a checkpoint (see the package docstring): full, or a delta against the base model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..errors import CheckpointError
from ..fsutil import atomic_dir
from ..models import LoadedModel
from ..runtime import adapters, modeling_lowrank, placement
from ..runtime.surgery import plans_config
from .card import model_card
from .format import (
    DELTA, DTYPES, FORMAT, FORMAT_VERSION, SIDECAR, default_save_dtype, dtype_name, file_sha256, finite, is_map,
    named_tensors, qk_fingerprint, weights_sha256,
)


def _state_in(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in ``dtype``; the (small) lowrank_* maps stay float32. Tensors that
    share storage (tied embedding and LM head) still share it after the cast, so save_pretrained writes them once."""
    out, cast = {}, {}
    for k, t in model.state_dict().items():
        if t.is_floating_point() and not is_map(k):
            tie = (t.data_ptr(), t.dtype, t.shape, t.stride())
            if tie not in cast:
                cast[tie] = t.detach().to(dtype).contiguous()
            out[k] = cast[tie]
        else:
            out[k] = t.detach().contiguous()
    return out


def _delta_state(lm: LoadedModel, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of the model that its base lacks or holds differently (in ``dtype``; maps float32), and
    the base's identity. The base is reloaded in float32 as the model was placed (an offloaded model's base
    offloads too, into a folder of its own), and both are compared one tensor at a time."""
    from ..models import load_model

    placed = dict(lm.placed)
    with tempfile.TemporaryDirectory(prefix=".base-", dir=placed.get("offload_folder")) as folder:
        if "offload_folder" in placed:
            placed["offload_folder"] = folder
        try:
            base = load_model(lm.name, **placed)
        except Exception as e:  # noqa: BLE001  (any load failure is the same answer to the user)
            raise CheckpointError(f"delta: cannot reload the base model {lm.name!r} to diff against: "
                                  f"{str(e).splitlines()[0]}") from e
        base_names = set(base.model.state_dict())
        keep = {}
        for k, t in named_tensors(lm.model):
            if k in base_names:
                with placement.materialized_tensor(base.model, k) as b:
                    if b.shape == t.shape and torch.equal(b.to(device=t.device, dtype=t.dtype), t.detach()):
                        continue
            keep[k] = (t if is_map(k) or not t.is_floating_point() else t.to(dtype)).detach().cpu().contiguous()
        if not keep:
            raise CheckpointError("delta: the model holds nothing its base does not (is it compressed?)")
        identity = {"name": lm.name, "source": lm.source, "qk_fingerprint": qk_fingerprint(base.model),
                    "weights_sha256": weights_sha256(base.model)}
    return keep, identity


def save_compressed(lm: LoadedModel, report: dict, out: str | Path, *, overwrite: bool = False,
                    dtype: str | torch.dtype | None = None, delta: bool = False) -> Path:
    """Write a checkpoint of a compressed model (see the module docstring). ``dtype``: of the saved weights
    (default: ``default_save_dtype(lm)``, the dtype the model was published in, e.g. bfloat16 for SmolLM2; the
    maps stay float32). ``delta``: only what compression added or changed, against the base model ``lm.name``
    (reloaded here to diff and to record its identity)."""
    model = lm.model
    plans = _compressed_plans(model)
    save_dtype = dtype_name(dtype) if dtype is not None else default_save_dtype(lm)
    _check_saveable(model, delta)
    cfg = plans_config(plans)
    base_identity = None
    if delta:
        state, base_identity = _delta_state(lm, DTYPES[save_dtype])
    else:
        state = _state_in(model, DTYPES[save_dtype])
    for name, t in state.items():  # fp16 overflows where fp32 did not
        if t.is_floating_point() and not finite(t):
            raise CheckpointError(f"refusing to save: tensor {name} overflows {save_dtype}; save in float32 or bfloat16")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_weights(lm, tmp, state, cfg, save_dtype, delta)
        sidecar = _sidecar(report, cfg, save_dtype, delta, base_identity, tmp)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, sort_keys=True) + "\n")
        layout = adapters.head_layout(model)
        (tmp / "README.md").write_text(model_card(sidecar, layout,
                                                  files={p.name: p.stat().st_size for p in tmp.iterdir()}))
    return Path(out)


def _compressed_plans(model) -> list:
    """The layer plans of a compressed model; refused (one line) for a baseline or an uncompressed model."""
    plans = [getattr(m, "lowrank_plan", None) for m in adapters.attention_modules(model)]
    if getattr(model, "lowrank_attn_baseline", None):
        raise CheckpointError(f"fit {model.lowrank_attn_baseline} is an evaluation baseline (weights truncated "
                              "before RoPE, K cache not reduced) and is not saved; use fit closed-form")
    if any(p is None for p in plans):
        raise CheckpointError("the model is not compressed (run compress first)")
    return plans


def _check_saveable(model, delta: bool) -> None:
    """Refuse a full checkpoint of an offloaded model, and a tensor that is not finite."""
    if placement.is_offloaded(model) and not delta:
        raise CheckpointError("the model's weights are offloaded (device_map with max_memory/offload_folder), so a "
                              "full checkpoint would copy the whole model: save a delta (--delta), which holds "
                              "only the maps and loads onto the base")
    for name, t in named_tensors(model):
        if t.is_floating_point() and not finite(t):
            raise CheckpointError(f"refusing to save: tensor {name} has NaN/inf values")


def _write_weights(lm: LoadedModel, tmp: Path, state: dict, cfg: dict, save_dtype: str, delta: bool) -> None:
    """The weights and config.json into ``tmp``; a full checkpoint also the runtime files and the tokenizer."""
    model = lm.model
    model.config.lowrank_attn = cfg
    try:
        if delta:
            from safetensors.torch import save_file

            save_file({k: t.cpu() for k, t in state.items()}, str(tmp / DELTA), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(
                modeling_lowrank.wrap_config(model.config, cfg, save_dtype, delta=True), indent=2, sort_keys=True)
                + "\n")
        else:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            modeling_lowrank.write_checkpoint_files(tmp, model.config, cfg, save_dtype)
            lm.tokenizer.save_pretrained(tmp)
    finally:
        del model.config.lowrank_attn


def _sidecar(report: dict, cfg: dict, save_dtype: str, delta: bool, base_identity, tmp: Path) -> dict:
    weights = sorted(p.name for p in tmp.glob("*.safetensors"))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lowrank_attn_version": __version__,
        "dtype": save_dtype, "delta": delta, "base": base_identity,
        "lowrank": cfg, "source": {**report.get("source", {}), "qk_fingerprint": report.get("qk_fingerprint")},
        "recipe": report.get("recipe"), "calibration": report.get("calibration"),
        "summary": report.get("summary"), "layers": report.get("layers"),
        "allocation": {k: v for k, v in (report.get("allocation") or {}).items() if k != "probes"} or None,
        "weights_sha256": {w: file_sha256(tmp / w) for w in weights},
        # what else decides what the model computes or reads: config.json (the base config, the compression),
        # generation and tokenizer files (the bundled runtime *.py are the package's own, never run by load_compressed)
        "files_sha256": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()
                         and p.suffix not in (".safetensors", ".py") and p.name not in (SIDECAR, "README.md")},
    }
