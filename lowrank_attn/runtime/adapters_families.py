"""The model families besides Llama's, each a ``LlamaFamily`` that overrides what differs (see ``adapters``)."""

from __future__ import annotations

import torch
from torch import nn

from .adapters_base import HeadLayout, LlamaFamily, linear


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
        attn.qkv_proj = linear(torch.cat([q[0], k[0], wv]), bias)


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
