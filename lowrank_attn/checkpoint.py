"""Compressed checkpoints: safetensors weights + config + ``lowrank_attn.json`` sidecar.

    save_compressed(lm, report, "ckpt/smol-k50")
    lm = load_compressed("ckpt/smol-k50")        # never executes code from the directory

Layout of a checkpoint directory:
  model.safetensors        weights, including the per-layer maps (buffers ``lowrank_q_map`` …)
  config.json              the base model's config + ``lowrank_attn`` (mode, ranks, planes, cache
                           settings) + ``auto_map`` → modeling_lowrank.py
  modeling_lowrank.py      self-contained code for ``AutoModelForCausalLM.from_pretrained(DIR,
                           trust_remote_code=True)`` (the user's explicit choice to run it)
  lowrank_attn.json        format version, recipe, report (ranks, certificate), source identity,
                           sha256 of every weights file (checked on load)
  tokenizer files

Written into a temp dir and renamed, after checking every tensor is finite.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import torch

from . import __version__, adapters
from .attention import LayerPlan, apply_lowrank
from .errors import CheckpointError
from .fsutil import atomic_dir
from .models import LoadedModel

FORMAT = "lowrank-attn/checkpoint"
FORMAT_VERSION = 1
SIDECAR = "lowrank_attn.json"
MODELING_FILE = "modeling_lowrank.py"


def plans_to_config(plans: list[LayerPlan]) -> dict:
    p0 = plans[0]
    return {
        "format_version": FORMAT_VERSION, "mode": p0.mode, "window": p0.window, "k_bits": p0.k_bits,
        "k_group": p0.k_group, "ranks": [list(map(int, p.ranks)) for p in plans],
        "planes": [p.planes.tolist() for p in plans] if p0.mode == "rope-pairs" else None,
    }


def plans_from_config(cfg: dict, layout: adapters.HeadLayout) -> list[LayerPlan]:
    """Plans with zero maps of the right shapes (the weights file fills them)."""
    plans = []
    for i, ranks in enumerate(cfg["ranks"]):
        r_max = max(ranks)
        kw = dict(mode=cfg["mode"], ranks=list(ranks), window=cfg["window"], k_bits=cfg["k_bits"], k_group=cfg["k_group"])
        if cfg["mode"] == "rope-pairs":
            kw["planes"] = torch.tensor(cfg["planes"][i], dtype=torch.long)
        else:
            kw["q_map"] = torch.zeros(layout.num_kv_heads, r_max, layout.head_dim)
            kw["k_map"] = torch.zeros(layout.num_kv_heads, r_max, layout.head_dim)
        plans.append(LayerPlan(**kw))
    return plans


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


def modeling_source(model: torch.nn.Module) -> str:
    """A self-contained modeling file: this package's own attention/cache/adapter code + a loader class."""
    from . import attention, errors, kcache

    base = type(model).__mro__[1] if getattr(type(model), "_is_lowrank", False) else type(model)
    base_name = base.__name__
    parts = []
    for mod in (errors, kcache, adapters, attention):
        src = inspect.getsource(mod)
        src = src.replace("from __future__ import annotations\n", "")
        lines = [ln for ln in src.splitlines() if not ln.startswith("from . ") and not ln.startswith("from .")]
        parts.append(f"# ---- lowrank_attn/{mod.__name__.split('.')[-1]}.py (version {__version__})\n" + "\n".join(lines))
    loader = f'''
# ---- loader
import types as _types
adapters = _types.SimpleNamespace(**{{k: v for k, v in globals().items() if not k.startswith("__")}})
from transformers import {base_name} as _Base


class LowRankCausalLM(_Base):
    """{base_name} with lowrank-attn compressed attention (config.lowrank_attn)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        cfg = config.lowrank_attn
        layout = head_layout(self)
        plans = []
        for i, ranks in enumerate(cfg["ranks"]):
            r_max = max(ranks)
            kw = dict(mode=cfg["mode"], ranks=list(ranks), window=cfg["window"], k_bits=cfg["k_bits"],
                      k_group=cfg["k_group"])
            if cfg["mode"] == "rope-pairs":
                kw["planes"] = torch.tensor(cfg["planes"][i], dtype=torch.long)
            else:
                kw["q_map"] = torch.zeros(layout.num_kv_heads, r_max, layout.head_dim)
                kw["k_map"] = torch.zeros(layout.num_kv_heads, r_max, layout.head_dim)
            plans.append(LayerPlan(**kw))
        apply_lowrank(self, plans)
'''
    header = ('"""Generated by lowrank-attn: compressed attention for this checkpoint.\n\n'
              'Loaded only with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True);\n'
              'lowrank_attn.load_compressed(DIR) does not execute this file."""\n'
              "from __future__ import annotations\n\n")
    return header + "\n\n".join(parts) + "\n" + loader


def save_compressed(lm: LoadedModel, report: dict, out: str | Path, *, overwrite: bool = False) -> Path:
    model = lm.model
    mods = adapters.attention_modules(model)
    plans = [getattr(m, "lowrank_plan", None) for m in mods]
    if any(p is None for p in plans):
        raise CheckpointError("the model is not compressed (run compress first)")
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"refusing to save: tensor {name} has NaN/inf values")
    cfg = plans_to_config(plans)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.config.lowrank_attn = cfg
        model.config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.LowRankCausalLM"}
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            del model.config.auto_map
        lm.tokenizer.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(modeling_source(model))
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        sidecar = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lowrank_attn_version": __version__,
            "lowrank": cfg, "source": {**report.get("source", {}), "qk_fingerprint": report.get("qk_fingerprint")},
            "recipe": report.get("recipe"), "calibration": report.get("calibration"),
            "summary": report.get("summary"), "layers": report.get("layers"),
            "weights_sha256": {w: _sha256(tmp / w) for w in weights},
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, sort_keys=True) + "\n")
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
        raise CheckpointError(f"{f} has format version {side.get('format_version')}; this lowrank-attn reads "
                              f"version {FORMAT_VERSION} (upgrade lowrank-attn)")
    return side


def load_compressed(path: str | Path, *, device: str = "cpu", verify: bool = True) -> LoadedModel:
    """Load a checkpoint written by ``save_compressed``; verifies hashes, shapes and finiteness."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}/config.json: {str(e).splitlines()[0]}") from e
    if getattr(config, "lowrank_attn", None) != side["lowrank"]:
        raise CheckpointError(f"config.json and {SIDECAR} disagree about the compression settings")
    if hasattr(config, "auto_map"):
        del config.auto_map
    model = AutoModelForCausalLM.from_config(config)
    layout = adapters.head_layout(model)
    if len(side["lowrank"]["ranks"]) != layout.num_layers or any(
        len(r) != layout.num_kv_heads or min(r) < 1 or max(r) > layout.head_dim for r in side["lowrank"]["ranks"]
    ):
        raise CheckpointError(f"{SIDECAR} ranks do not fit a model of {layout.num_layers} layers × "
                              f"{layout.num_kv_heads} KV heads of dim {layout.head_dim}")
    apply_lowrank(model, plans_from_config(side["lowrank"], layout))
    state = {}
    for name in hashes:
        try:
            state.update(load_file(str(path / name)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {path / name}: {e}") from e
    expected = model.state_dict()
    tied = {k for k in expected if k not in state and "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, but the ranks in {SIDECAR} need "
                                  f"{tuple(expected[k].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {k} contains NaN/inf")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(model=model, tokenizer=tok, name=str(path), source=str(path))


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
