"""Per-architecture knowledge: the only module that knows module and weight names.

One small adapter class per architecture family (after SliceGPT's ``ModelAdapter``), registered by
``model_type`` in ``FAMILIES``: the base ``LlamaFamily`` and ``HeadLayout`` in ``adapters_base``, the other
families in ``adapters_families`` (siblings in this flat folder: the remote-code loader follows only ``from .module
import name``). An adapter owns, for its family:

* where things are: decoder layers, the attention module, the q/k/v/o projections;
* how q, k and v come out of the hidden states (separate projections or a fused one) and where
  a q/k norm sits (``qk_norm``: per head, or over all heads before the head split);
* per layer: RoPE or NoPE (``uses_rope``, ``rope_inv_freq``), logit soft-capping (``softcap``),
  sliding window (``sliding_window``);
* the weight surgery of the folded modes: rope-pairs row selection (``select_qk_rows``), the
  bilinear fold (``fold_bilinear``), the weight-SVD query fold (``fold_query_interaction``), and
  the weights read for spectra and allocation (``qk_weights``, ``o_weight``).

The compressed forward (``attention.LowRankAttention``) calls only these methods and never names a
module. ``adapter(model)`` is bound to a model (structure, RoPE frequencies); the copy each compressed
attention module keeps (``adapter_for_config``) holds only the config.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters_base import HeadLayout, LlamaFamily
from .adapters_families import (
    Gemma2Family, Gemma3Family, GPT2Family, MistralFamily, Olmo2Family, Phi3Family, Qwen3Family, SmolLM3Family,
)
from .errors import UnsupportedModelError
from .placement import materialized

__all__ = ["FAMILIES", "SUPPORTED", "HeadLayout", "LlamaFamily", "adapter", "adapter_for_config", "attention_modules",
           "attention_output_norm", "check_supported", "decoder_layers", "fold_query_interaction", "head_layout",
           "model_type", "o_weight", "qk_weights", "sliding_windows", "text_config"]


FAMILIES: dict[str, type[LlamaFamily]] = {
    mt: fam for fam in (LlamaFamily, MistralFamily, Qwen3Family, Gemma2Family, Gemma3Family, Olmo2Family,
                        SmolLM3Family, Phi3Family, GPT2Family) for mt in fam.model_types
}
# Every family listed here has a test (tests/test_families.py) that compresses a tiny model of it at full rank
# with the default recipe and reproduces the dense logits, uncached and cached.
SUPPORTED = sorted(FAMILIES)


# ---------------------------------------------------------------- the model-level API


def text_config(model: nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def model_type(model: nn.Module) -> str:
    return str(getattr(text_config(model), "model_type", "unknown"))


def check_supported(model: nn.Module) -> None:
    mt = model_type(model)
    if mt not in FAMILIES:
        raise UnsupportedModelError(
            f"architecture '{mt}' is not supported (supported: {', '.join(SUPPORTED)}); "
            "lowrank-attn needs decoder-only self-attention of a family it has an adapter for"
        )


def adapter(model: nn.Module) -> LlamaFamily:
    """The family adapter of ``model``, bound to it."""
    check_supported(model)
    return FAMILIES[model_type(model)](text_config(model), model)


def adapter_for_config(config) -> LlamaFamily:
    """An adapter holding only the (text) config: what a compressed attention module keeps for its forward."""
    mt = str(getattr(config, "model_type", "unknown"))
    if mt not in FAMILIES:
        raise UnsupportedModelError(f"architecture '{mt}' is not supported (supported: {', '.join(SUPPORTED)})")
    return FAMILIES[mt](config)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return adapter(model).attention_modules()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks (whose input is the residual stream), in layer order."""
    return adapter(model).decoder_layers()


def head_layout(model: nn.Module) -> HeadLayout:
    return adapter(model).head_layout()


def sliding_windows(model: nn.Module) -> list[int | None]:
    """Per layer, the sliding window (keys a query sees) or None."""
    a = adapter(model)
    return [a.sliding_window(i) for i in range(a.num_layers)]


def qk_weights(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key projection weights of one layer as (H*d, D) and (Hkv*d, D) (read-only; offloaded
    weights are brought in for the read)."""
    a = adapter(model)
    attn = a.attention_modules()[layer]
    with materialized(attn):
        return tuple(w.detach() for w in a.qk_weights(attn))


def attention_output_norm(model: nn.Module, layer: int) -> nn.Module | None:
    """The norm between one layer's attention output and the residual stream, or None (see the family)."""
    return adapter(model).attention_output_norm(layer)


def o_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """Output projection of one layer as (D, H·d): attention output = concat_h(o_h) @ W^T."""
    a = adapter(model)
    attn = a.attention_modules()[layer]
    with materialized(attn):
        return a.o_weight(attn).detach()


def fold_query_interaction(attn: nn.Module, maps: torch.Tensor, layout: HeadLayout | None = None) -> None:
    """Weight-SVD query fold on one attention module (see ``LlamaFamily.fold_query_interaction``)."""
    adapter_for_config(attn.config).fold_query_interaction(attn, maps)
