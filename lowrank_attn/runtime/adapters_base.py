"""The base adapter (``LlamaFamily``: separate q/k/v/o projections, RoPE, optional q/k norm) and ``HeadLayout``; the
other families (``adapters_families``) override what differs. See ``adapters`` for the model-level API."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class HeadLayout:
    """Attention geometry of a model (same for every layer)."""

    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    has_rope: bool  # some layer applies RoPE
    has_qk_norm: bool
    has_qk_bias: bool
    max_positions: int
    sliding_windows: tuple[int | None, ...] = ()  # per layer: its sliding window, or None (empty: none anywhere)

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (GQA)."""
        return self.num_heads // self.num_kv_heads


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def heads_map(w: torch.Tensor, maps: torch.Tensor, d: int) -> torch.Tensor:
    """Rows of a projection (H·d, …) mapped per head by maps (H, r, d) → (H·r, …)."""
    h = maps.shape[0]
    return torch.einsum("hd...,hrd->hr...", w.reshape(h, d, *w.shape[1:]), maps.to(w)).reshape(h * maps.shape[1],
                                                                                             *w.shape[1:])


class LlamaFamily:
    """llama-style attention: separate q/k/v/o ``nn.Linear`` (biases optional), RoPE on every layer,
    no q/k norm, no soft-capping; sliding window per layer from ``config.layer_types``.
    Covers llama, qwen2 (q/k/v biases; sliding layers only with use_sliding_window) and gemma."""

    model_types: tuple[str, ...] = ("llama", "qwen2", "gemma")
    qk_norm: str | None = None  # None | "head" (RMSNorm over each head's d dims) | "all" (over H·d, before the split)

    def __init__(self, config, model: nn.Module | None = None):
        self.config = config  # the text config
        self.model = model
        cfg = config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.num_layers = cfg.num_hidden_layers

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ---- structure (needs the model)

    def _bound(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("this adapter holds only a config; use adapters.adapter(model)")
        return self.model

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder blocks (whose input is the residual stream), in layer order."""
        base = getattr(self._bound(), "model", None) or self.model
        return list(getattr(base, "language_model", base).layers)

    def attention_modules(self) -> list[nn.Module]:
        return [block.self_attn for block in self.decoder_layers()]

    def head_layout(self) -> HeadLayout:
        attn = self.attention_modules()[0]
        q_bias = self.q_weight_bias(attn)[1]
        return HeadLayout(
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, hidden_size=self.config.hidden_size,
            has_rope=any(self.uses_rope(i) for i in range(self.num_layers)),
            has_qk_norm=self.qk_norm is not None, has_qk_bias=q_bias is not None,
            max_positions=int(getattr(self.config, "max_position_embeddings", 2048) or 2048),
            sliding_windows=tuple(self.sliding_window(i) for i in range(self.num_layers)),
        )

    # ---- per layer (from the config)

    def uses_rope(self, layer: int) -> bool:
        return True

    def rotary_dim(self) -> int:
        """Head dims RoPE rotates (the first ones; partial_rotary_factor < 1 leaves the rest unrotated)."""
        params = getattr(self.config, "rope_parameters", None) or {}
        factor = params.get("partial_rotary_factor", getattr(self.config, "partial_rotary_factor", 1.0)) or 1.0
        return int(self.head_dim * factor)

    def rope_inv_freq(self, layer: int) -> torch.Tensor | None:
        """(rotary_dim / 2,) RoPE angular frequencies of ``layer`` (plane p rotates by position·inv_freq[p]),
        or None on a layer without RoPE."""
        if not self.uses_rope(layer):
            return None
        base = getattr(self._bound(), "model", None) or self.model
        rotary = getattr(getattr(base, "language_model", base), "rotary_emb")
        freq = getattr(rotary, "inv_freq", None)
        if freq is None:  # one table per layer type (gemma3)
            freq = getattr(rotary, f"{self.config.layer_types[layer]}_inv_freq")
        return freq

    def sliding_window(self, layer: int) -> int | None:
        """Keys a query of ``layer`` sees (itself included), or None for full attention."""
        types = getattr(self.config, "layer_types", None)
        if types and types[layer] == "sliding_attention":
            return getattr(self.config, "sliding_window", None)
        return None

    def softcap(self, layer: int) -> float | None:
        """Attention-logit soft cap c (logits → c·tanh(logits / c)), or None."""
        return None

    attention_output_normed = False  # the block normalises the attention output before the residual add

    def attention_output_norm(self, layer: int) -> nn.Module | None:
        """The norm the attention output passes before it joins the residual stream (gemma2/gemma3 sandwich
        and olmo2 post-norm blocks: their ``post_attention_layernorm``), or None (llama-style pre-norm blocks,
        where ``post_attention_layernorm`` is the MLP's input norm)."""
        return self.decoder_layers()[layer].post_attention_layernorm if self.attention_output_normed else None

    # ---- the forward's pieces (one attention module)

    def qkv(self, attn: nn.Module, hidden: torch.Tensor, qk_dim: int | None = None):
        """hidden (B,S,D) → q (B,H,S,e), k (B,Hkv,S,e), v (B,Hkv,S,d) before RoPE, q/k norms applied, where
        e = qk_dim: head_dim, or the r_max of a folded mode (projections already output r_max dims per head)."""
        b, s, _ = hidden.shape
        e = qk_dim or self.head_dim
        q, k, v = self._project_qkv(attn, hidden)
        if self.qk_norm == "all" and e == self.head_dim:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q.view(b, s, -1, e)
        k = k.view(b, s, -1, e)
        if self.qk_norm == "head" and e == self.head_dim:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(b, s, -1, self.head_dim).transpose(1, 2)

    def _project_qkv(self, attn, hidden):
        return attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)

    def output(self, attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """(B,S,H·d) concatenated head outputs → (B,S,D)."""
        return attn.o_proj(out)

    # ---- weights

    def q_weight_bias(self, attn) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query projection as (H·e, D) weight and (H·e,) bias (None without one), y = x W^T + b."""
        return attn.q_proj.weight, attn.q_proj.bias

    def k_weight_bias(self, attn) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attn.k_proj.weight, attn.k_proj.bias

    def set_qk(self, attn, q: tuple, k: tuple) -> None:
        """Replace the query and key projections by (weight, bias) pairs (any number of rows per head)."""
        attn.q_proj, attn.k_proj = linear(*q), linear(*k)

    def o_weight(self, attn) -> torch.Tensor:
        """(D, H·d): attention output = concat_h(o_h) @ W^T."""
        return attn.o_proj.weight

    def qk_weights(self, attn) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_weight_bias(attn)[0], self.k_weight_bias(attn)[0]

    # ---- surgery of the folded modes

    def select_qk_rows(self, attn, dims: torch.Tensor, valid: torch.Tensor) -> None:
        """rope-pairs: keep, per KV head j, the q/k projection rows ``dims[j]`` (Hkv, r) (its group's query
        heads share them); rows where ``valid`` is False become zero padding."""
        if self.qk_norm:
            raise UnsupportedModelError("rope-pairs folds plane selection into W_q/W_k, which a q/k norm forbids "
                                        "(the norm needs the full head); use mode post-rope")
        if self.rotary_dim() != self.head_dim:
            raise UnsupportedModelError("rope-pairs needs RoPE on the whole head (partial_rotary_factor 1); use post-rope")
        d, g = self.head_dim, self.group_size
        (wq, bq), (wk, bk) = self.q_weight_bias(attn), self.k_weight_bias(attn)
        dev = wq.device
        q_rows = torch.cat([h * d + dims[h // g] for h in range(self.num_heads)]).to(dev)
        k_rows = torch.cat([j * d + dims[j] for j in range(self.num_kv_heads)]).to(dev)
        q_keep = torch.cat([valid[h // g] for h in range(self.num_heads)]).to(dev)
        k_keep = valid.reshape(-1).to(dev)

        def rows(w, b, idx, keep):
            return (w[idx] * keep[:, None].to(w.dtype), None if b is None else b[idx] * keep.to(b.dtype))

        self.set_qk(attn, rows(wq, bq, q_rows, q_keep), rows(wk, bk, k_rows, k_keep))

    def fold_bilinear(self, attn, q_map: torch.Tensor, k_map: torch.Tensor) -> None:
        """Fold (Hkv, r, d) query/key maps into the projection weights and biases (layers without RoPE):
        the projections then output r dims per head."""
        if any(self.uses_rope(i) for i in range(self.num_layers)):
            raise UnsupportedModelError("bilinear folding is only defined for models without RoPE; use post-rope")
        d = self.head_dim
        qm = q_map.repeat_interleave(self.group_size, dim=0)  # (H, r, d)
        (wq, bq), (wk, bk) = self.q_weight_bias(attn), self.k_weight_bias(attn)
        with torch.no_grad():
            q = (heads_map(wq, qm, d), None if bq is None else heads_map(bq, qm, d))
            k = (heads_map(wk, k_map, d), None if bk is None else heads_map(bk, k_map, d))
        self.set_qk(attn, q, k)

    def fold_query_interaction(self, attn, maps: torch.Tensor) -> None:
        """Replace the query weights W_q,h (and bias) of each query head h by maps[h]^T @ W_q,h, so that its
        logits become q_h^T maps[h] k: maps (H, d, d) act before RoPE (and before any q-norm). Used by the
        weight-SVD baseline; queries and keys stay d-dimensional."""
        (wq, bq), k = self.q_weight_bias(attn), self.k_weight_bias(attn)
        m = torch.block_diag(*maps.transpose(-1, -2).to(wq.dtype)).to(wq.device)  # (H·d, H·d)
        assert m.shape[0] == wq.shape[0] == self.num_heads * self.head_dim
        with torch.no_grad():
            self.set_qk(attn, (m @ wq, None if bq is None else m @ bq), tuple(t.detach().clone() if t is not None
                                                                             else None for t in k))
