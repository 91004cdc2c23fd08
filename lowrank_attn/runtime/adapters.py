"""Per-architecture knowledge: the only module that knows module and weight names.

One small adapter class per architecture family (after SliceGPT's ``ModelAdapter``), registered by
``model_type`` in ``FAMILIES``. An adapter owns, for its family:

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

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError
from .placement import materialized


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

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (GQA)."""
        return self.num_heads // self.num_kv_heads


def _text_config(model: nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _heads_map(w: torch.Tensor, maps: torch.Tensor, d: int) -> torch.Tensor:
    """Rows of a projection (H·d, …) mapped per head by maps (H, r, d) → (H·r, …)."""
    h = maps.shape[0]
    return torch.einsum("hd...,hrd->hr...", w.reshape(h, d, *w.shape[1:]), maps.to(w)).reshape(h * maps.shape[1],
                                                                                             *w.shape[1:])


# ---------------------------------------------------------------- families


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
        attn.q_proj, attn.k_proj = _linear(*q), _linear(*k)

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
            q = (_heads_map(wq, qm, d), None if bq is None else _heads_map(bq, qm, d))
            k = (_heads_map(wk, k_map, d), None if bk is None else _heads_map(bk, k_map, d))
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


class MistralFamily(LlamaFamily):
    """mistral: the sliding window lives in the config and applies to every layer."""

    model_types = ("mistral",)

    def sliding_window(self, layer: int) -> int | None:
        return getattr(self.config, "sliding_window", None)


class Qwen3Family(LlamaFamily):
    """qwen3: RMSNorm on each head's q and k (before RoPE)."""

    model_types = ("qwen3",)
    qk_norm = "head"


class Gemma2Family(LlamaFamily):
    """gemma2: attention-logit soft-capping; alternating sliding / full layers."""

    model_types = ("gemma2",)
    attention_output_normed = True

    def softcap(self, layer: int) -> float | None:
        return getattr(self.config, "attn_logit_softcapping", None)


class Gemma3Family(Gemma2Family):
    """gemma3 (text): per-head q/k norm, sliding layers with their own RoPE table, optional soft cap."""

    model_types = ("gemma3_text",)
    qk_norm = "head"


class Olmo2Family(LlamaFamily):
    """olmo2: RMSNorm over all heads' q (H·d) and k (Hkv·d), before the head split."""

    model_types = ("olmo2",)
    qk_norm = "all"
    attention_output_normed = True


class SmolLM3Family(LlamaFamily):
    """smollm3: NoPE layers (``config.no_rope_layers[i] == 0``); sliding layers only with use_sliding_window."""

    model_types = ("smollm3",)

    def uses_rope(self, layer: int) -> bool:
        return bool(self.config.no_rope_layers[layer])

    def sliding_window(self, layer: int) -> int | None:
        return super().sliding_window(layer) if getattr(self.config, "use_sliding_window", False) else None


class Phi3Family(MistralFamily):
    """phi3: one fused ``qkv_proj`` (rows: H·d queries, Hkv·d keys, Hkv·d values); sliding window from the config."""

    model_types = ("phi3",)

    def _project_qkv(self, attn, hidden):
        qkv = attn.qkv_proj(hidden)
        nq, nk = self._qk_rows(attn)
        return qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]

    def _qk_rows(self, attn) -> tuple[int, int]:
        """(query rows, key rows) of the fused projection; values are the last Hkv·d."""
        total = attn.qkv_proj.weight.shape[0] - self.num_kv_heads * self.head_dim
        nq = total // (self.num_heads + self.num_kv_heads) * self.num_heads
        return nq, total - nq

    def _split(self, attn, t):
        nq, nk = self._qk_rows(attn)
        return t[:nq], t[nq : nq + nk], t[nq + nk :]

    def q_weight_bias(self, attn):
        b = attn.qkv_proj.bias
        return self._split(attn, attn.qkv_proj.weight)[0], None if b is None else self._split(attn, b)[0]

    def k_weight_bias(self, attn):
        b = attn.qkv_proj.bias
        return self._split(attn, attn.qkv_proj.weight)[1], None if b is None else self._split(attn, b)[1]

    def set_qk(self, attn, q, k):
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
        wv, bv = self._split(attn, w)[2], None if b is None else self._split(attn, b)[2]
        bias = None if b is None else torch.cat([q[1], k[1], bv])
        attn.qkv_proj = _linear(torch.cat([q[0], k[0], wv]), bias)


class GPT2Family(LlamaFamily):
    """gpt2: fused ``c_attn`` (Conv1D, y = x W + b, W: (D, 3D)), MHA, no RoPE, ``c_proj`` out."""

    model_types = ("gpt2",)

    def __init__(self, config, model: nn.Module | None = None):
        self.config, self.model = config, model
        self.num_heads = self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.num_layers = config.n_layer

    def decoder_layers(self):
        base = getattr(self._bound(), "transformer", None) or self.model
        return list(base.h)

    def attention_modules(self):
        return [block.attn for block in self.decoder_layers()]

    def head_layout(self) -> HeadLayout:
        cfg = self.config
        return HeadLayout(num_layers=cfg.n_layer, num_heads=cfg.n_head, num_kv_heads=cfg.n_head,
                          head_dim=self.head_dim, hidden_size=cfg.n_embd, has_rope=False, has_qk_norm=False,
                          has_qk_bias=True, max_positions=cfg.n_positions)

    def uses_rope(self, layer: int) -> bool:
        return False

    def rotary_dim(self) -> int:
        return 0

    def sliding_window(self, layer: int) -> int | None:
        return None

    def _project_qkv(self, attn, hidden):
        qkv = attn.c_attn(hidden)
        nq = (qkv.shape[-1] - self.config.n_embd) // 2
        return qkv[..., :nq], qkv[..., nq : 2 * nq], qkv[..., 2 * nq :]

    def output(self, attn, out):
        return attn.resid_dropout(attn.c_proj(out))

    def _split(self, attn):
        w, b = attn.c_attn.weight, attn.c_attn.bias  # (D, nq + nk + D), (nq + nk + D,)
        nq = (w.shape[1] - self.config.n_embd) // 2
        return [(w[:, a:z].T, b[a:z]) for a, z in ((0, nq), (nq, 2 * nq), (2 * nq, w.shape[1]))]

    def q_weight_bias(self, attn):
        return self._split(attn)[0]

    def k_weight_bias(self, attn):
        return self._split(attn)[1]

    def set_qk(self, attn, q, k):
        from transformers.pytorch_utils import Conv1D

        wv, bv = self._split(attn)[2]
        w = torch.cat([q[0], k[0], wv]).T  # (D, nq + nk + D)
        conv = Conv1D(w.shape[1], w.shape[0]).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(torch.cat([q[1], k[1], bv]))
        attn.c_attn = conv

    def o_weight(self, attn):
        return attn.c_proj.weight.T  # Conv1D weight is (H·d, D)


FAMILIES: dict[str, type[LlamaFamily]] = {
    mt: fam for fam in (LlamaFamily, MistralFamily, Qwen3Family, Gemma2Family, Gemma3Family, Olmo2Family,
                        SmolLM3Family, Phi3Family, GPT2Family) for mt in fam.model_types
}
# Every family listed here has a test (tests/test_families.py) that compresses a tiny model of it at full rank
# with the default recipe and reproduces the dense logits, uncached and cached.
SUPPORTED = sorted(FAMILIES)


# ---------------------------------------------------------------- the model-level API


def model_type(model: nn.Module) -> str:
    return str(getattr(_text_config(model), "model_type", "unknown"))


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
    return FAMILIES[model_type(model)](_text_config(model), model)


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
