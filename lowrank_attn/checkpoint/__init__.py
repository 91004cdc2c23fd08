"""Compressed checkpoints: safetensors weights + a ``model_type: lowrank_attn`` config + sidecar + card.

    save_compressed(lm, report, "ckpt/smol-k50")                  # full, in the dtype the model was published in
    save_compressed(lm, report, "ckpt/smol-k50", dtype="float32")
    save_compressed(lm, report, "ckpt/smol-k50-delta", delta=True)  # only what compression changed
    lm = load_compressed("ckpt/smol-k50")        # never executes code from the directory
    lm = load_compressed("ckpt/smol-k50-delta")  # base from the sidecar (or base="smollm2-135m"), verified

Layout of a full checkpoint directory:
  model.safetensors        weights, including the per-layer maps (buffers ``lowrank_q_map`` …, kept fp32)
  config.json              ``model_type: lowrank_attn``: the base config nested as ``base_config``, the
                           compression settings as ``lowrank_attn``, ``auto_map`` → modeling_lowrank
  modeling_lowrank.py, attention.py, kernels.py, plan.py, modes.py, kcache.py, values.py, adapters.py, surgery.py,
  placement.py, errors.py
                           the package's ``runtime/`` files verbatim, for
                           ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
  lowrank_attn.json        format version, dtype, recipe, report (ranks, certificate), source identity,
                           sha256 of every weights file (checked on load)
  README.md                model card
  tokenizer files

A delta checkpoint holds ``delta.safetensors`` (the tensors compression added or changed: maps, folded
q/k rows) instead of the weights, no tokenizer or runtime files, and the base model's identity (name,
source, q/k fingerprint, sha256 of all its weights) in the sidecar.

Written into a temp dir and renamed, after checking every tensor is finite.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .. import __version__
from ..errors import CheckpointError
from ..fsutil import atomic_dir
from ..models import LoadedModel
from ..runtime import adapters, modeling_lowrank, placement
from ..runtime.surgery import CONFIG_VERSION, plans_config
from .card import model_card

FORMAT = "lowrank-attn/checkpoint"
FORMAT_VERSION = CONFIG_VERSION  # 2: config.json of model_type lowrank_attn (base nested), runtime files, dtype, delta
SIDECAR = "lowrank_attn.json"
MODELING_FILE = modeling_lowrank.MODELING_FILE
WEIGHTS = "model.safetensors"
DELTA = "delta.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sha256(path: Path) -> str:
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


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the state dict, by name, one at a time (offloaded weights never all in memory)."""
    for name in sorted(model.state_dict()):
        with placement.materialized_tensor(model, name) as t:
            yield name, t


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every tensor of a (dense) model as float32 bytes, by name: a base model's full identity."""
    h = hashlib.sha256()
    for name, t in _named_tensors(model):
        t = t.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dtype_name(dtype) -> str:
    """'bfloat16' … for a torch dtype or a name; refused (CheckpointError) outside float32/bfloat16/float16."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"dtype: unknown {dtype!r}; choose from {', '.join(DTYPES)}")
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


def _finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN/inf in ``t``, checked in chunks: isfinite of a whole half-precision embedding makes float32
    temporaries the size of the tensor (measured: +1 GB of peak RAM saving Qwen2.5-1.5B in bf16)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _is_map(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("lowrank_")


def _state_in(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in ``dtype``; the (small) lowrank_* maps stay float32. Tensors that
    share storage (tied embedding and LM head) still share it after the cast, so save_pretrained writes them once."""
    out, cast = {}, {}
    for k, t in model.state_dict().items():
        if t.is_floating_point() and not _is_map(k):
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
        for k, t in _named_tensors(lm.model):
            if k in base_names:
                with placement.materialized_tensor(base.model, k) as b:
                    if b.shape == t.shape and torch.equal(b.to(device=t.device, dtype=t.dtype), t.detach()):
                        continue
            keep[k] = (t if _is_map(k) or not t.is_floating_point() else t.to(dtype)).detach().cpu().contiguous()
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
    plans = [getattr(m, "lowrank_plan", None) for m in adapters.attention_modules(model)]
    if getattr(model, "lowrank_attn_baseline", None):
        raise CheckpointError(f"fit {model.lowrank_attn_baseline} is an evaluation baseline (weights truncated "
                              "before RoPE, K cache not reduced) and is not saved; use fit closed-form")
    if any(p is None for p in plans):
        raise CheckpointError("the model is not compressed (run compress first)")
    save_dtype = dtype_name(dtype) if dtype is not None else default_save_dtype(lm)
    if placement.is_offloaded(model) and not delta:
        raise CheckpointError("the model's weights are offloaded (device_map with max_memory/offload_folder), so a "
                              "full checkpoint would copy the whole model: save a delta (--delta), which holds "
                              "only the maps and loads onto the base")
    for name, t in _named_tensors(model):
        if t.is_floating_point() and not _finite(t):
            raise CheckpointError(f"refusing to save: tensor {name} has NaN/inf values")
    cfg = plans_config(plans)
    base_identity = None
    if delta:
        state, base_identity = _delta_state(lm, DTYPES[save_dtype])
    else:
        state = _state_in(model, DTYPES[save_dtype])
    for name, t in state.items():  # fp16 overflows where fp32 did not
        if t.is_floating_point() and not _finite(t):
            raise CheckpointError(f"refusing to save: tensor {name} overflows {save_dtype}; save in float32 or bfloat16")
    with atomic_dir(out, overwrite=overwrite) as tmp:
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
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        sidecar = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lowrank_attn_version": __version__,
            "dtype": save_dtype, "delta": delta, "base": base_identity,
            "lowrank": cfg, "source": {**report.get("source", {}), "qk_fingerprint": report.get("qk_fingerprint")},
            "recipe": report.get("recipe"), "calibration": report.get("calibration"),
            "summary": report.get("summary"), "layers": report.get("layers"),
            "allocation": {k: v for k, v in (report.get("allocation") or {}).items() if k != "probes"} or None,
            "weights_sha256": {w: _sha256(tmp / w) for w in weights},
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, sort_keys=True) + "\n")
        layout = adapters.head_layout(model)
        (tmp / "README.md").write_text(model_card(sidecar, layout,
                                                  files={p.name: p.stat().st_size for p in tmp.iterdir()}))
    return Path(out)


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
        for field, want in (("q_map", plan.q_map.shape), ("k_map", plan.k_map.shape),
                            ("k_mean", (layout.num_kv_heads, layout.head_dim))):
            t = tensors.pop(prefix + field, None)
            if t is None or tuple(t.shape) != tuple(want) or not _finite(t):
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
    A delta checkpoint needs its base: ``base`` (a name/path or a LoadedModel), default the one recorded;
    a base whose weights differ from the recorded ones is refused. ``placed`` (``device_map``, ``max_memory``,
    ``offload_folder``: delta checkpoints only) loads the base as ``load_model`` would, for a base bigger
    than RAM; a post-rope delta is then installed on it in place (its maps are all it holds)."""
    from transformers import AutoTokenizer

    from ..models import check_device

    check_device(device)
    path = Path(path)
    side = read_sidecar(path)
    hashes = side.get("weights_sha256") or {}
    if not hashes:
        raise CheckpointError(f"{path}/{SIDECAR} lists no weights files")
    for name, digest in hashes.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing its weights file {name}")
        if verify and _sha256(f) != digest:
            raise CheckpointError(f"weights file {f} does not match the hash in {SIDECAR} (corrupt or modified)")
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
    state = _load_tensors(path, hashes)
    tokenizer = None
    if side.get("delta"):
        base_lm = _base_for_delta(path, side, base)
        state = {**base_lm.model.state_dict(), **state}
        tokenizer = base_lm.tokenizer
    elif base is not None:
        raise CheckpointError(f"{path} is a full checkpoint; base= is only for delta checkpoints")
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
        if t.is_floating_point() and not _finite(t):
            raise CheckpointError(f"tensor {k} contains NaN/inf")
    _set_dtype(model, target)
    state = {k: t.to(target) if t.is_floating_point() and not _is_map(k) else t for k, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)  # the read tensors become the parameters: no copy
    if getattr(base_cfg, "tie_word_embeddings", False):  # assign broke the tie (a checkpoint may hold both copies)
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise CheckpointError(f"weights do not match the model: missing {empty[:3]}")
    model = model.to(device).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, config=base_cfg)  # not config.json
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(path), source=str(path))


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
