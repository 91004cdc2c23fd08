"""The value side of a compressed attention layer, composed with whatever its mode does to queries and keys.

Low-rank values (``LayerPlan.v_enc``/``v_dec``, fitted by ``lowrank_attn.vfit``): the cache stores
v' = E_j v (r_v numbers per token for KV head j) and each query head's attention output is decoded back,
o = D_j o', in front of the output projection. Attention is linear in the values, so attending over v' and
decoding is the same as attending over D_j E_j v: the fold into ``o_proj`` (W_h ← W_h D_j) and ``v_proj``
(W_v ← E_j W_v) is algebraically identical; the maps are kept as two small float32 buffers per layer
instead (like the post-RoPE key maps), so one code path serves every family, offloaded weights included.
Per token and head that costs 2·d·r_v multiply-adds and saves (d − r_v)·T in p·V at a context of T.
The same two maps carry a rotation of quantised values (``lowrank_attn.vrotation``: r_v = d, an orthonormal basis
change, exact without quantisation): the cache quantises E_j v, where each token's energy is spread evenly.

Quantised values (``v_bits``, KIVI's scheme): per token, asymmetric over groups of ``v_group`` channels (the
group's min/max, or that range shrunk to the least squared error: ``v_clip``), bit-packed; the last ``v_window``
values of a layer stay unquantised (the cache, ``kcache``), so a decode step reads its own most recent values exact;
a forward over many rows (a prompt attended compressed, a perplexity) reads them so too: ``ValueBand`` adds each
row's Σ p·(v − v̂) over its band to attention over the stored values (``band_pairs`` in the fused prefill).
"""

from __future__ import annotations

import torch

from .coded import GroupQuantizer, checked_clip, weighted_values
from .kernels import band_positions, by_group, stack_rows, unstack_rows, window_views

# multiply in float32 for half-precision models (as the key maps do); the result is cast back
_WORK_DTYPE = torch.float32


class TokenQuantizer:
    """Per-token quantisation over groups of ``group`` channels (KIVI's values): ``GroupQuantizer`` on the
    transposed values, the channel axis playing the role tokens play for keys (codes packed along channels).

    quantize: x (B, Hkv, T, r) → packed (B, Hkv, r/g, g·bits/8, T), lo and step (B, Hkv, r/g, 1, T), with
    g = ``value_group(r, group)``. dequantize gives (B, Hkv, T, r) as a transposed view of a channel-major
    buffer: attention reads it in one matmul without a copy."""

    def __init__(self, bits: int, group: int, clip: str = "minmax"):
        self.bits, self.group, self.clip = bits, group, checked_clip(clip)

    def _inner(self, channels: int) -> GroupQuantizer:
        return GroupQuantizer(self.bits, value_group(channels, self.group), clip=self.clip)

    def quantize(self, x: torch.Tensor):
        return self._inner(x.shape[-1]).quantize(x.transpose(-1, -2))

    def dequantize(self, packed, lo, step, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Hkv, T, r), written into ``out`` (a transposed view of a channel-major buffer is fastest) if given."""
        n_groups, g = packed.shape[2], packed.shape[3] * 8 // self.bits
        inner_out = None if out is None else out.transpose(-1, -2)
        return self._inner(n_groups * g).dequantize(packed, lo, step, out=inner_out).transpose(-1, -2)


def value_group(rank: int, group: int) -> int:
    """The channel group actually used for ``rank`` values: ``group`` or the largest of 16, 8 dividing rank."""
    for g in (group, 16, 8):
        if rank % g == 0:
            return g
    raise ValueError(f"value rank {rank} is not a multiple of 8: cannot pack {rank}-channel values")


def value_quantizer(plan) -> TokenQuantizer | None:
    return TokenQuantizer(plan.v_bits, plan.v_group, clip=plan.v_clip) if plan.v_bits else None


def install(attn, plan, device) -> None:
    """Buffers ``lowrank_v_enc`` (Hkv, r_v, d) and ``lowrank_v_dec`` (Hkv, d, r_v) where values are low-rank."""
    if plan.v_enc is None:
        return
    attn.register_buffer("lowrank_v_enc", plan.v_enc.to(device=device, dtype=torch.float32).contiguous())
    attn.register_buffer("lowrank_v_dec", plan.v_dec.to(device=device, dtype=torch.float32).contiguous())


def encode(attn, v: torch.Tensor) -> torch.Tensor:
    """v (B, Hkv, S, d) → what the cache stores: (B, Hkv, S, r_v), or v itself where values are not low-rank."""
    enc = getattr(attn, "lowrank_v_enc", None)
    if enc is None:
        return v
    out = torch.matmul(v.to(_WORK_DTYPE), enc.to(v.device).transpose(-1, -2))  # (B,Hkv,S,d)·(Hkv,d,r) → (B,Hkv,S,r)
    return out.to(v.dtype)


def decode(attn, out: torch.Tensor, groups: int) -> torch.Tensor:
    """Attention output over encoded values (B, H, S, r_v) → (B, H, S, d) for the output projection."""
    dec = getattr(attn, "lowrank_v_dec", None)
    if dec is None:
        return out
    b, h, s, r = out.shape
    grouped = out.reshape(b, h // groups, groups * s, r).to(_WORK_DTYPE)  # the group's rows share D_j
    full = torch.matmul(grouped, dec.to(out.device).transpose(-1, -2))  # (B, Hkv, g·S, d)
    return full.to(out.dtype).view(b, h, s, -1)


def prefill_values(values: torch.Tensor, window: int, quantizer: TokenQuantizer | None) -> torch.Tensor:
    """Values as a cache would hold them after a prefill of T tokens: all but the last ``window`` quantised."""
    if quantizer is None:
        return values
    n = max(0, values.shape[-2] - window)
    if n == 0:
        return values
    old = quantizer.dequantize(*quantizer.quantize(values[..., :n, :])).to(values.dtype)
    return torch.cat([old, values[..., n:, :]], dim=-2)


class ValueBand:
    """What a row reading its own ``window`` most recent values unquantised adds to attention over the stored
    (quantised) values: Σ_j p_ij (v_j − v̂_j) over i − window < j ≤ i, for j among the last N positions.

    diff: (B,Hkv,N,dv) v − v̂ of the last N positions, T positions in all (the keys')."""

    def __init__(self, diff, window: int, t: int):
        self.diff, self.window, self.t = diff, window, t

    @classmethod
    def of(cls, v_exact, window: int, stored) -> "ValueBand":
        """v_exact (B,Hkv,N,dv): the unquantised values of the last N of the T positions ``stored`` holds."""
        t = stored.shape[-2]
        return cls(v_exact - stored[..., t - v_exact.shape[-2] :, :], window, t)

    def upto(self, end: int) -> "ValueBand":
        """The band of the first ``end`` positions (a block of rows that sees no later key)."""
        return ValueBand(self.diff[..., : max(0, self.diff.shape[-2] - (self.t - end)), :], self.window, end)

    def rows(self, probs, groups: int):
        """probs (B,H,S,T) float32 of the last S rows over the T positions → the correction (B,H,S,dv), or None."""
        b, h, s, t = probs.shape
        lo = max(t - self.diff.shape[-2], t - s - self.window + 1, 0)
        if lo >= t:
            return None
        q_pos = torch.arange(t - s, t, device=probs.device).unsqueeze(-1)  # (S,1)
        band = (q_pos - torch.arange(lo, t, device=probs.device)) < self.window  # (S, t-lo); future p are 0
        p = by_group(probs[..., lo:] * band, groups)
        return weighted_values(p, self.diff[..., self.diff.shape[-2] - (t - lo) :, :]).view(b, h, s, -1)


def band_pairs(q_low, q_full, k_low, exact_keys, v_band, lse, a, window, sink, groups, c):
    """Rows a…a+S-1 of a causal prefill: Σ_j p_ij (v_j − v̂_j) over each row's value band
    (i − v_band.window < j ≤ i), p_ij = exp(l_ij − lse_i) with the logit the prefill used (exact keys inside the key
    band and for the sinks, low-rank otherwise) and the row's log-sum-exp over all its pairs.

    q_low: (B,H,S,r), q_full: (B,H,S,d) scaled queries (q_full None: every logit low-rank)
    k_low: (B,Hkv,T,r)   exact_keys: (B,Hkv,T,d) (where the prefill has exact keys) or None   lse: (B,H,S) float32
    → (B,H,S,dv) in v − v̂'s dtype. Blocks of c rows against the c + v_window - 1 positions ending at
    their last row."""
    s, vw = q_low.shape[-2], v_band.window
    nb, rows, cols, lo = band_positions(a, s, c, vw, q_low.device)  # (nb,1,c,1) positions i, (nb,1,1,span) j
    span = cols.shape[-1]

    def views(x):  # (B,Hkv,T,e) → (B,Hkv,nb,span,e): each block's band positions (zeros outside 0…T-1)
        return window_views(x, lo, nb * c + vw - 1, span, c)

    logits = torch.matmul(stack_rows(q_low, groups, c), views(k_low).transpose(-1, -2)).float()  # (B,Hkv,nb,g·c,span)
    shape = (*logits.shape[:3], groups, c, span)
    logits = logits.view(shape)
    if q_full is not None:
        exact = torch.matmul(stack_rows(q_full, groups, c), views(exact_keys).transpose(-1, -2)).float().view(shape)
        logits = torch.where(((rows - cols < window) & (cols >= sink)) | (cols < sink), exact, logits)
    lse_b = stack_rows(lse.unsqueeze(-1), groups, c).view(*shape[:5], 1)
    p = logits.sub_(lse_b).exp_().masked_fill_(~((cols <= rows) & (rows - cols < vw) & (cols >= 0)), 0.0)
    o = torch.matmul(p.view(*shape[:3], groups * c, span).to(v_band.diff.dtype), views(v_band.diff))
    return unstack_rows(o, groups, s)
