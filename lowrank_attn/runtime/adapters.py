"""Per-architecture knowledge: the only module that knows module and weight names.

An adapter answers, for one loaded model: where the attention modules are, how
many query / KV heads and what head dimension, whether RoPE and q/k norms sit
between the projections and the dot product, and the per-head q/k weight
matrices (for the W_Q^T W_K spectrum and for folding projections into weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

# model_type -> (layers path, q weight name, k weight name) for llama-style blocks.
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "gemma", "phi3", "olmo2", "smollm3"}
_GPT2_LIKE = {"gpt2"}
SUPPORTED = sorted(_LLAMA_LIKE | _GPT2_LIKE)


@dataclass(frozen=True)
class HeadLayout:
    """Attention geometry of a model (same for every layer)."""

    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    has_rope: bool
    has_qk_norm: bool
    has_qk_bias: bool
    max_positions: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (GQA)."""
        return self.num_heads // self.num_kv_heads


def _text_config(model: nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def model_type(model: nn.Module) -> str:
    return str(getattr(_text_config(model), "model_type", "unknown"))


def check_supported(model: nn.Module) -> None:
    mt = model_type(model)
    if mt not in SUPPORTED:
        raise UnsupportedModelError(
            f"architecture '{mt}' is not supported (supported: {', '.join(SUPPORTED)}); "
            "lowrank-attn needs decoder-only self-attention with separate query and key projections"
        )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    check_supported(model)
    mt = model_type(model)
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    if mt in _GPT2_LIKE:
        return [block.attn for block in base.h]
    inner = getattr(base, "language_model", base)
    return [layer.self_attn for layer in inner.layers]


def head_layout(model: nn.Module) -> HeadLayout:
    check_supported(model)
    cfg = _text_config(model)
    mt = model_type(model)
    if mt in _GPT2_LIKE:
        n_heads = cfg.n_head
        return HeadLayout(
            num_layers=cfg.n_layer, num_heads=n_heads, num_kv_heads=n_heads,
            head_dim=cfg.n_embd // n_heads, hidden_size=cfg.n_embd, has_rope=False,
            has_qk_norm=False, has_qk_bias=True, max_positions=cfg.n_positions,
        )
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    attn = attention_modules(model)[0]
    return HeadLayout(
        num_layers=cfg.num_hidden_layers, num_heads=n_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim, hidden_size=cfg.hidden_size, has_rope=True,
        has_qk_norm=hasattr(attn, "q_norm"), has_qk_bias=attn.q_proj.bias is not None,
        max_positions=int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
    )


def qk_weights(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key projection weights of one layer as (H*d, D) and (Hkv*d, D)."""
    attn = attention_modules(model)[layer]
    if model_type(model) in _GPT2_LIKE:
        w = attn.c_attn.weight  # Conv1D: (D, 3D), y = x @ w
        d_model = w.shape[0]
        return w[:, :d_model].T, w[:, d_model : 2 * d_model].T
    return attn.q_proj.weight, attn.k_proj.weight


# ---------------------------------------------------------------- weight folding (model surgery)

def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def fold_bilinear(attn: nn.Module, q_map: torch.Tensor, k_map: torch.Tensor, layout: HeadLayout) -> None:
    """Fold (Hkv, r, d) query/key maps into the projection weights (models without RoPE).

    GPT-2's fused c_attn (Conv1D, y = x W + b with W: (D, 3D)) becomes (D, H·r + Hkv·r + D).
    """
    d, g = layout.head_dim, layout.group_size
    if hasattr(attn, "c_attn"):
        w, b = attn.c_attn.weight, attn.c_attn.bias  # (D, 3D), (3D,)
        dm = w.shape[0]
        wq, wk, wv = w[:, :dm], w[:, dm : 2 * dm], w[:, 2 * dm :]
        bq, bk, bv = b[:dm], b[dm : 2 * dm], b[2 * dm :]
        qm = q_map.repeat_interleave(g, dim=0).to(w.dtype)  # (H, r, d)
        km = k_map.to(w.dtype)
        new_wq = torch.einsum("Dhd,hrd->Dhr", wq.reshape(dm, -1, d), qm).reshape(dm, -1)
        new_wk = torch.einsum("Dhd,hrd->Dhr", wk.reshape(dm, -1, d), km).reshape(dm, -1)
        new_bq = torch.einsum("hd,hrd->hr", bq.reshape(-1, d), qm).reshape(-1)
        new_bk = torch.einsum("hd,hrd->hr", bk.reshape(-1, d), km).reshape(-1)
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(new_wq.shape[1] + new_wk.shape[1] + wv.shape[1], dm).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([new_wq, new_wk, wv], dim=1))
            conv.bias.copy_(torch.cat([new_bq, new_bk, bv]))
        attn.c_attn = conv
        return
    raise UnsupportedModelError("bilinear folding is only defined for models without RoPE (gpt2); use post-rope")


def fold_query_interaction(attn: nn.Module, maps: torch.Tensor, layout: HeadLayout) -> None:
    """Replace the query weights W_q,h (and bias) of each query head h by maps[h]^T @ W_q,h, so that
    its logits become q_h^T maps[h] k: maps (H, d, d) act before RoPE (and before any q-norm). Used by
    the weight-SVD baseline, whose rank-r truncation of W_q,h^T W_k lives in weight space; queries and
    keys stay d-dimensional."""
    lin = attn.q_proj
    m = torch.block_diag(*maps.transpose(-1, -2).to(lin.weight.dtype)).to(lin.weight.device)  # (H·d, H·d)
    assert m.shape[0] == lin.weight.shape[0] == layout.num_heads * layout.head_dim
    attn.q_proj = _linear(m @ lin.weight, None if lin.bias is None else m @ lin.bias)


def select_qk_rows(attn: nn.Module, dims: torch.Tensor, valid: torch.Tensor, layout: HeadLayout) -> None:
    """Keep, per KV head j, the q/k projection rows ``dims[j]`` (its group's query heads share them);
    rows where ``valid`` is False are zeroed padding. Llama-style separate q_proj / k_proj."""
    if layout.has_qk_norm:
        raise UnsupportedModelError("rope-pairs folds plane selection into W_q/W_k, which a q/k norm forbids "
                                    "(the norm needs the full head); use mode post-rope")
    d, g = layout.head_dim, layout.group_size
    dev = attn.q_proj.weight.device
    q_rows = torch.cat([h * d + dims[h // g] for h in range(layout.num_heads)]).to(dev)
    k_rows = torch.cat([j * d + dims[j] for j in range(layout.num_kv_heads)]).to(dev)
    q_keep = torch.cat([valid[h // g] for h in range(layout.num_heads)]).to(dev)
    k_keep = valid.reshape(-1).to(dev)
    for name, rows, keep in (("q_proj", q_rows, q_keep), ("k_proj", k_rows, k_keep)):
        lin = getattr(attn, name)
        w = lin.weight[rows] * keep[:, None].to(lin.weight.dtype)
        b = None if lin.bias is None else lin.bias[rows] * keep.to(lin.bias.dtype)
        setattr(attn, name, _linear(w, b))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks (whose input is the residual stream), in layer order."""
    mods = attention_modules(model)
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    if model_type(model) in _GPT2_LIKE:
        blocks = list(base.h)
    else:
        blocks = list(getattr(base, "language_model", base).layers)
    assert len(blocks) == len(mods)
    return blocks


def o_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """Output projection of one layer as (D, H·d): attention output = concat_h(o_h) @ W^T."""
    attn = attention_modules(model)[layer]
    if model_type(model) in _GPT2_LIKE:
        return attn.c_proj.weight.T  # Conv1D weight is (H·d, D)
    return attn.o_proj.weight
