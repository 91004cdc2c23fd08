"""Loading a checkpoint written by ``save_compressed``: verified, and running nothing from the directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models import LoadedModel
from ..runtime import adapters, modeling_lowrank, placement
from ..runtime.surgery import plans_follow_buffers
from .format import (
    DTYPES, SIDECAR, dtype_name, file_sha256, finite, is_map, qk_fingerprint, read_sidecar, weights_sha256,
)


def _read_config(path: Path, side: dict) -> modeling_lowrank.LowRankAttnConfig:
    f = path / "config.json"
    try:
        d = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {f}: {str(e).splitlines()[0]}") from e
    want = modeling_lowrank.DELTA_MODEL_TYPE if side.get("delta") else modeling_lowrank.MODEL_TYPE
    if not isinstance(d, dict) or d.get("model_type") != want:
        raise CheckpointError(f"{f} is not a lowrank-attn config: model_type "
                              f"{d.get('model_type') if isinstance(d, dict) else None!r}, expected {want!r}")
    if d.get("lowrank_attn") != side["lowrank"]:
        raise CheckpointError(f"config.json and {SIDECAR} disagree about the compression settings")
    d = {k: v for k, v in d.items() if k not in ("auto_map", "model_type", "architectures", "transformers_version")}
    try:
        return modeling_lowrank.LowRankAttnConfig(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f} is not a valid lowrank-attn config: {str(e).splitlines()[0]}") from e


def _load_tensors(path: Path, names) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for name in names:
        try:
            state.update(load_file(str(path / name)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {path / name}: {e}") from e
    return state


def _base_for_delta(path: Path, side: dict, base: str | LoadedModel | None, **placed) -> LoadedModel:
    """The dense base model of a delta checkpoint (loaded with ``placed``: device_map, max_memory,
    offload_folder), refused (one line) unless it is the one recorded."""
    from ..models import load_model

    ident = side.get("base") or {}
    if not ident.get("weights_sha256"):
        raise CheckpointError(f"{path}/{SIDECAR} is a delta but records no base model identity")
    if base is None:
        base = ident.get("name")
    base_lm = base if isinstance(base, LoadedModel) else load_model(base, **placed)
    name = base_lm.name
    if qk_fingerprint(base_lm.model) != ident.get("qk_fingerprint") or weights_sha256(base_lm.model) != ident["weights_sha256"]:
        raise CheckpointError(f"delta checkpoint {path} was made from {ident.get('name')!r} (weights sha256 "
                              f"{ident['weights_sha256'][:12]}…); {name!r} is a different model")
    return base_lm


def _delta_onto_base(path: Path, side: dict, base_lm: LoadedModel, hashes: dict) -> LoadedModel:
    """A delta of a mode that only adds maps (post-rope) installed on its (verified) base in place: the maps are all such a delta holds, so
    the base's weights — offloaded or spread by a device_map — are never copied."""
    from ..runtime.modeling_lowrank import apply_lowrank
    from ..runtime.surgery import plans_from_config

    from ..runtime.modes import MODES

    low = side["lowrank"]
    mode = MODES.get(low.get("mode"))
    if mode is None or mode.folds_weights:
        raise CheckpointError(f"{path}: a {low.get('mode')} delta changes the q/k weights; load it onto a base that "
                              "is not offloaded (without device_map/max_memory/offload_folder)")
    layout = adapters.head_layout(base_lm.model)
    if len(low["ranks"]) != layout.num_layers:
        raise CheckpointError(f"{SIDECAR} ranks do not fit a model of {layout.num_layers} layers")
    tensors = _load_tensors(path, hashes)
    plans = plans_from_config(low, layout)
    names = {id(m): n for n, m in base_lm.model.named_modules()}
    for mod, plan in zip(adapters.attention_modules(base_lm.model), plans):
        prefix = names[id(mod)] + ".lowrank_"
        fields = [("q_map", plan.q_map.shape), ("k_map", plan.k_map.shape),
                  ("k_mean", (layout.num_kv_heads, layout.head_dim))]
        if plan.v_enc is not None:  # value maps: low-rank or rotated values
            fields += [("v_enc", plan.v_enc.shape), ("v_dec", plan.v_dec.shape)]
        for field, want in fields:
            t = tensors.pop(prefix + field, None)
            if t is None or tuple(t.shape) != tuple(want) or not finite(t):
                raise CheckpointError(f"{path}: {prefix + field} is missing, not finite or not of shape {tuple(want)}")
            setattr(plan, field, t.float())
    if tensors:
        raise CheckpointError(f"{path}: the delta holds tensors besides the maps ({sorted(tensors)[:3]}); load it onto "
                              "a base that is not offloaded")
    apply_lowrank(base_lm.model, plans)
    return LoadedModel(model=base_lm.model, tokenizer=base_lm.tokenizer, name=str(path), source=str(path),
                       placed=base_lm.placed)


def _set_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to ``dtype`` (tied ones stay tied); buffers stay as built — the lowrank_* maps float32, and
    RoPE's inv_freq float32 as from_pretrained keeps it (``model.to(dtype)`` would round it, and the reloaded
    model would no longer give the logits of the one that was saved)."""
    from ..models import cast_parameters

    cast_parameters(model, dtype)
    return model


def load_compressed(path: str | Path, *, device: str = "cpu", verify: bool = True,
                    dtype: str | torch.dtype | None = None, base: str | LoadedModel | None = None,
                    **placed) -> LoadedModel:
    """Load a checkpoint written by ``save_compressed``; verifies hashes, shapes and finiteness, and runs
    the installed package's runtime (nothing from ``path``). ``dtype``: default the checkpoint's own.
    A delta checkpoint needs its base: ``base`` (a name/path or a LoadedModel), default the one recorded; a base
    whose weights differ from the recorded ones is refused. A LoadedModel base in the load dtype shares its weight
    tensors with the result (no second copy in memory): changing one in place changes the other. ``placed``
    (``device_map``, ``max_memory``, ``offload_folder``: delta checkpoints only) loads the base as ``load_model``
    would, for a base bigger than RAM; a post-rope delta is then installed on it in place (its maps are all it
    holds)."""
    from ..models import check_device

    check_device(device)
    path = Path(path)
    side = read_sidecar(path)
    hashes = _checked_hashes(path, side, verify)
    target = DTYPES[dtype_name(dtype if dtype is not None else side.get("dtype", "float32"))]
    placed = {k: v for k, v in placed.items() if v is not None}
    if placed and not side.get("delta"):
        raise CheckpointError(f"{path} is a full checkpoint; device_map/max_memory/offload_folder place a delta "
                              "checkpoint's base (save with --delta to load onto an offloaded base)")
    if side.get("delta") and (placed or isinstance(base, LoadedModel) and placement.is_offloaded(base.model)):
        if dtype is not None and target != torch.float32:
            raise CheckpointError(f"dtype: a delta installed on a placed base runs in float32 (the base is loaded as "
                                  f"its identity was recorded, in float32), not {dtype_name(dtype)}; drop dtype")
        return _delta_onto_base(path, side, _base_for_delta(path, side, base, **placed), hashes)
    model, base_cfg = _empty_model(path, side)
    state = _load_tensors(path, hashes)
    tokenizer = None
    if side.get("delta"):
        base_lm = _base_for_delta(path, side, base)
        state = {**base_lm.model.state_dict(), **state}
        tokenizer = base_lm.tokenizer
    elif base is not None:
        raise CheckpointError(f"{path} is a full checkpoint; base= is only for delta checkpoints")
    _fill(model, base_cfg, state, target)
    model = model.to(device).eval()
    plans_follow_buffers(model)  # the plans (zero maps until now) read the maps the model computes with
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, config=base_cfg)  # not config.json
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(path), source=str(path))


def _checked_hashes(path: Path, side: dict, verify: bool) -> dict:
    """The sidecar's weights files and their sha256, each file present (and, ``verify``, matching its hash, as
    the other files the sidecar hashes must)."""
    hashes = side.get("weights_sha256") or {}
    if not hashes:
        raise CheckpointError(f"{path}/{SIDECAR} lists no weights files")
    for name, digest in hashes.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing its weights file {name}")
        if verify and file_sha256(f) != digest:
            raise CheckpointError(f"weights file {f} does not match the hash in {SIDECAR} (corrupt or modified)")
    # the other files the sidecar hashes (absent in older checkpoints: nothing to check)
    for name, digest in (side.get("files_sha256") or {}).items() if verify else ():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file_sha256(f) != digest:
            raise CheckpointError(f"{f} does not match the hash in {SIDECAR} (corrupt or modified; "
                                  "load_compressed(..., verify=False) loads it anyway)")
    return hashes


def _empty_model(path: Path, side: dict):
    """(the compressed model built from config.json with its parameters on the meta device, the base config);
    the sidecar's ranks checked against its shape."""
    config = _read_config(path, side)
    try:
        base_cfg = config.base()
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: base_config is not a valid config: {str(e).splitlines()[0]}") from e
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on the meta device: the weights are read once
        model = modeling_lowrank.build_model(base_cfg)
    layout = adapters.head_layout(model)
    ranks = side["lowrank"]["ranks"]
    if len(ranks) != layout.num_layers or any(
        len(r) != layout.num_kv_heads or min(r) < 1 or max(r) > layout.head_dim for r in ranks
    ):
        raise CheckpointError(f"{SIDECAR} ranks do not fit a model of {layout.num_layers} layers × "
                              f"{layout.num_kv_heads} KV heads of dim {layout.head_dim}")
    return model, base_cfg


def _fill(model, base_cfg, state: dict, target: torch.dtype) -> None:
    """Check ``state`` against the model (names, shapes, finite) and make its tensors the model's, in ``target``
    (the maps float32)."""
    expected = model.state_dict()
    tied = {k for k in expected if k not in state and "lm_head" in k and getattr(base_cfg, "tie_word_embeddings", False)}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, but the ranks in {SIDECAR} need "
                                  f"{tuple(expected[k].shape)}")
    _set_dtype(model, target)
    state = {k: t.to(target) if t.is_floating_point() and not is_map(k) else t for k, t in state.items()}
    for k, t in state.items():  # after the cast: a weight beyond the range of a narrower dtype becomes inf
        if t.is_floating_point() and not finite(t):
            raise CheckpointError(f"tensor {k} is not finite in {t.dtype} (NaN/inf, or beyond its range): "
                                  "load it in a wider dtype")
    model.load_state_dict(state, strict=False, assign=True)  # the read tensors become the parameters: no copy
    if getattr(base_cfg, "tie_word_embeddings", False):  # assign broke the tie (a checkpoint may hold both copies)
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise CheckpointError(f"weights do not match the model: missing {empty[:3]}")
