"""Where a module computes, and its weights when accelerate has offloaded them.

A model loaded with a ``device_map`` whose weights do not all fit (``max_memory``, ``offload_folder``) keeps
the offloaded ones on the ``meta`` device; accelerate's hooks bring them in for each forward and drop them
after. Everything lowrank-attn reads outside a forward (the o-projection for the allocation, q/k weights
for a fingerprint, a map's device) goes through these two helpers.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device where it has one (an
    offloaded module's weights sit on ``meta``), else the device of its first weight (CPU without any)."""
    for m in module.modules():
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def is_offloaded(module: nn.Module) -> bool:
    """Some weight of ``module`` is offloaded (on ``meta``, brought in by an accelerate hook per forward)."""
    return any(p.is_meta for p in module.parameters())


@contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its offloaded weights on its execution device for the block (a no-op otherwise).
    Read-only: accelerate puts the offloaded copy back on exit, so a change made inside is lost."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in module.modules():
            stack.enter_context(align_module_device(m))
        yield module


@contextmanager
def materialized_tensor(model: nn.Module, name: str) -> Iterator[torch.Tensor]:
    """Parameter or buffer ``name`` (a state-dict key) of ``model`` for the block, an offloaded one brought in by
    the module that owns it, and only that module."""
    owner, _, attr = name.rpartition(".")
    with materialized(model.get_submodule(owner)) as mod:
        yield getattr(mod, attr)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its input embedding's execution device (the first of a device_map)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    return execution_device(emb if isinstance(emb, nn.Module) else model)
