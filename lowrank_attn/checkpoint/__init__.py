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
  modeling_lowrank.py, attention.py, coded.py, kernels.py, plan.py, modes.py, kcache.py, values.py, adapters*.py,
  surgery.py, placement.py, errors.py
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

from .format import (  # noqa: F401  (the package's checkpoint API)
    DELTA, DTYPES, FORMAT, FORMAT_VERSION, MODELING_FILE, SIDECAR, WEIGHTS, check_same_source, default_save_dtype,
    describe_checkpoint, dtype_name, is_checkpoint, qk_fingerprint, read_sidecar, source_fingerprint, weights_sha256,
)
from .load import load_compressed  # noqa: F401
from .save import save_compressed  # noqa: F401

__all__ = ["DELTA", "DTYPES", "FORMAT", "FORMAT_VERSION", "MODELING_FILE", "SIDECAR", "WEIGHTS", "check_same_source",
           "default_save_dtype", "describe_checkpoint", "dtype_name", "is_checkpoint", "load_compressed", "qk_fingerprint",
           "read_sidecar", "save_compressed", "source_fingerprint", "weights_sha256"]
