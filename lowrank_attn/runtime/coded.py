"""Quantised rows of the cache: KIVI's group quantiser (``GroupQuantizer``), its bit packing, and a layer's
cached keys and values as the cache holds them (quantised rows, then float rows) attended on their codes.

A decode step reads every cached key and value. Dequantising them first (codes → floats, × step, + lo over all
T rows) costs more than the attention products themselves; ``QuantizedKeys`` / ``QuantizedValues`` move the
scales to the other side instead:

  keys, per channel c over groups g of G tokens:   q·k_t = Σ_c (q_c·step_gc)·code_tc + Σ_c q_c·lo_gc
  values, per token t over groups g of channels:   Σ_t p_t·v_tc = Σ_t (p_t·step_tg)·code_tc + Σ_t p_t·lo_tg

so only the unpacking (uint8 → float32, exact) touches every cached number, and the products run in float32
(closer to the exact dequantised product than a half-precision dequantisation is). The scaled queries are
R×r per token group (R = query rows per KV head), so this pays while R is small — a decode step; a prefill or a
long chunk takes ``dense()`` (``FOLD_MAX_ROWS``).
"""

from __future__ import annotations

import functools

import torch


# how a group's range is chosen: KIVI's min/max, or min/max shrunk about their midpoint by the factor (of
# ``clip_factors``) with the least squared error over the group. Same bytes (a lo and a step per group either way)
CLIPS = ("minmax", "mse")


def checked_clip(clip: str) -> str:
    """``clip`` if it is one of ``CLIPS``, else a ValueError naming them."""
    if clip not in CLIPS:
        raise ValueError(f"unknown clip {clip!r}; choose from {', '.join(CLIPS)}")
    return clip


def clip_factors(bits: int) -> tuple[float, ...]:
    """The shrink factors ``clip="mse"`` tries: 1, 0.95, … down to 0.7 (0.5 at 2 bits, where outliers cost more).
    Measured on SmolLM2's rotated values and projected keys (groups of 64): -20% squared error at 3 bits, -8% at 4,
    -45% at 2; a finer or wider grid gained under 1% more at 3-4 bits."""
    return tuple(1 - 0.05 * i for i in range(11 if bits <= 2 else 7))


@functools.lru_cache(maxsize=32)
def _factors(bits: int, device: torch.device) -> torch.Tensor:
    """``clip_factors`` as a float32 tensor, made once per device (a decode step quantises every step)."""
    return torch.tensor(clip_factors(bits), dtype=torch.float32, device=device)


class GroupQuantizer:
    """KIVI-style quantisation: asymmetric min/max over groups of ``group`` consecutive entries along ``axis``,
    ``bits`` bits per value, packed along that axis to bits/8 bytes per value (``pack_codes``); ``clip="mse"``
    shrinks each group's range to the least squared error instead (``CLIPS``, same bytes).

    axis -2 (the default): x (B,H,T,r) → packed (B,H,T/G,G·bits/8,r), lo/step (B,H,T/G,1,r) — keys, per channel
    over token groups; ``values.TokenQuantizer`` applies it to the transposed values (per token over channel groups,
    a channel-major layout). axis -1 groups and packs along the last dim instead."""

    def __init__(self, bits: int, group: int, axis: int = -2, clip: str = "minmax"):
        if group % 8:
            raise ValueError(f"a quantisation group of {group} cannot be packed in bytes: use a multiple of 8")
        self.bits, self.group, self.axis, self.clip = bits, group, axis, checked_clip(clip)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (B, H, T, r) with the ``axis`` dim a multiple of group
        g = x.unflatten(self.axis, (-1, self.group))  # groups along ``axis`` of the 5-D view
        lo, hi = g.amin(dim=self.axis, keepdim=True), g.amax(dim=self.axis, keepdim=True)
        if self.clip == "mse":
            lo, hi = self._least_squares_range(g, lo, hi)
        step = (hi - lo) / (2**self.bits - 1)
        step = torch.where(step > 0, step, torch.ones_like(step))
        # codes against the lo and step as stored, in float32: half-precision arithmetic here put 8-bit codes up to
        # 1.4 steps off (the nearest code is within half a step)
        codes = torch.round((g.float() - lo.float()) / step.float()).clamp_(0, 2**self.bits - 1).to(torch.uint8)
        return pack_codes(codes, self.bits, self.axis), lo, step

    def _least_squares_range(self, g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """Per group, [lo, hi] shrunk about its midpoint by the ``clip_factors`` factor of least squared error
        (searched in float32 whatever the cache's dtype; returned in it)."""
        top, dtype = 2**self.bits - 1, g.dtype
        g, lo, hi = g.float(), lo.float(), hi.float()
        f = _factors(self.bits, g.device).view(-1, *[1] * g.dim())
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        lo_f = mid - f * half  # (F, *lo.shape): every factor at once
        step_f = torch.where(half > 0, 2 * f * half / top, torch.ones_like(lo_f))
        err = torch.round((g - lo_f) / step_f).clamp_(0, top).mul_(step_f).add_(lo_f).sub_(g).square_()
        best = err.sum(dim=self.axis, keepdim=True).argmin(dim=0, keepdim=True)  # axis < 0; the first on ties
        return lo_f.gather(0, best)[0].to(dtype), (lo_f + step_f * top).gather(0, best)[0].to(dtype)

    def dequantize(self, packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """(B,H,T,r) in lo's dtype, written into ``out`` (e.g. a slice of a bigger buffer) if given."""
        codes = unpack_codes(packed, self.bits, self.axis, lo.dtype)  # the 5-D grouped view, exact small integers
        if out is None:
            out = torch.empty(codes.shape, dtype=lo.dtype, device=lo.device).flatten(self.axis - 1, self.axis)
        view = out.unflatten(self.axis, codes.shape[self.axis - 1 :][:2])
        torch.mul(codes, step, out=view).add_(lo)  # not addcmul (its rounding differs)
        return out


def key_quantizer(settings) -> GroupQuantizer | None:
    """The key quantiser of a plan or a recipe (``k_bits``, ``k_group``, ``k_clip``); None: keys not quantised."""
    bits = settings.k_bits
    return GroupQuantizer(bits, settings.k_group, clip=settings.k_clip) if bits else None


def _along(values: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``values`` shaped to broadcast along ``axis`` (≥ 0) of an ndim-dim tensor."""
    return values.view(-1, *([1] * (ndim - 1 - axis)))


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint8 codes < 2**bits → bits/8 bytes per code along ``dim`` (its length n a multiple of 8). A width w of
    1, 2, 4 or 8 bits: byte j holds the codes j, j + n·w/8, j + 2·n·w/8, … (the i-th at shift w·i), so each
    unpacks with a shift and a mask over one contiguous slice (no broadcast). Other widths are split into such
    parts (3 bits: the low 2 bits, then the high bit), the parts concatenated along ``dim``."""
    dim = dim % codes.dim()
    parts, shift = [], 0
    for width in _pow2_parts(bits):
        part = codes if width == bits else (codes >> shift) & (2**width - 1)
        parts.append(_pack_pow2(part, width, dim))
        shift += width
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The inverse of ``pack_codes``: the codes in ``dtype`` (uint8, or a float type written as it unpacks)."""
    dim = dim % packed.dim()
    widths = _pow2_parts(bits)
    if len(widths) == 1:
        return _unpack_pow2(packed, bits, dim, dtype)
    n = packed.shape[dim] * 8 // bits
    out, shift = None, 0
    for width, part in zip(widths, packed.split([n * w // 8 for w in widths], dim=dim)):
        codes = _unpack_pow2(part, width, dim)
        out = codes if out is None else out.bitwise_or_(codes << shift)
        shift += width
    return out.to(dtype)


def _pow2_parts(bits: int) -> tuple[int, ...]:
    """``bits`` as widths that divide 8, widest first (3 → 2, 1)."""
    return (bits,) if 8 % bits == 0 else tuple(w for w in (4, 2, 1) if bits & w)


def _pack_pow2(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 8 // bits
    chunks = codes.unflatten(dim, (per, codes.shape[dim] // per))  # chunk i: the codes i·n/per … (i+1)·n/per - 1
    shifts = _along(bits * torch.arange(per, device=codes.device, dtype=torch.uint8), dim, codes.dim() + 1)
    return (chunks << shifts).sum(dim=dim, dtype=torch.uint8)


def _unpack_pow2(packed: torch.Tensor, bits: int, dim: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    per, m = 8 // bits, packed.shape[dim]
    if per == 1:
        return packed.to(dtype)
    shape = list(packed.shape)
    shape[dim] = per * m
    out = packed.new_empty(shape, dtype=dtype)
    for i in range(per):
        part = packed >> (bits * i) if i else packed
        out.narrow(dim, i * m, m).copy_(part & (2**bits - 1) if i < per - 1 else part)
    return out


# query rows per KV head (query heads per KV head × new tokens) up to which attention reads the codes
FOLD_MAX_ROWS = 32


class QuantizedKeys:
    """(B, Hkv, T, r) projected keys: n·G quantised (codes (B,Hkv,n,G·bits/8,r), lo/step (B,Hkv,n,1,r), KIVI's
    per-channel groups of G tokens) followed by the not yet quantised ``tail`` (B,Hkv,T_fp,r)."""

    def __init__(self, quantizer: GroupQuantizer, codes, lo, step, tail: torch.Tensor):
        self.quantizer, self.codes, self.lo, self.step, self.tail = quantizer, codes, lo, step, tail
        b, h, n, _, r = lo.shape
        self.shape = torch.Size((b, h, n * quantizer.group + tail.shape[-2], r))
        self.dtype = tail.dtype

    def dense(self) -> torch.Tensor:
        """The keys dequantised, in the tail's dtype."""
        nq = self.shape[-2] - self.tail.shape[-2]
        out = self.tail.new_empty(self.shape)
        self.quantizer.dequantize(self.codes, self.lo, self.step, out=out[..., :nq, :])  # no concatenated copy
        out[..., nq:, :] = self.tail
        return out

    def logits(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, Hkv, R, r) → q·kᵀ (B, Hkv, R, T), float32."""
        codes = unpack_codes(self.codes, self.quantizer.bits, -2, torch.float32)  # (B,Hkv,n,G,r)
        qf = q.float().unsqueeze(2)  # (B,Hkv,1,R,r)
        head = torch.matmul(qf * self.step.float(), codes.transpose(-1, -2))  # (B,Hkv,n,R,G)
        head += (qf * self.lo.float()).sum(-1, keepdim=True)
        head = head.transpose(2, 3).flatten(3)  # (B,Hkv,R,n·G)
        return torch.cat([head, torch.matmul(qf.squeeze(2), self.tail.float().transpose(-1, -2))], dim=-1)


class QuantizedValues:
    """(B, Hkv, T, d) values: T_q quantised per token (codes (B,Hkv,d/g,g·bits/8,T_q), lo/step (B,Hkv,d/g,1,T_q),
    KIVI's per-token groups of g channels, ``values.TokenQuantizer``) followed by the unquantised ``tail``."""

    def __init__(self, quantizer, codes, lo, step, tail: torch.Tensor):
        self.quantizer, self.codes, self.lo, self.step, self.tail = quantizer, codes, lo, step, tail
        self.shape = torch.Size((*tail.shape[:2], lo.shape[-1] + tail.shape[-2], tail.shape[-1]))
        self.dtype = tail.dtype

    def dense(self) -> torch.Tensor:
        """The values dequantised, in the tail's dtype: a (B,Hkv,T,d) view of a channel-major buffer."""
        b, h, t, d = self.shape
        nq = self.lo.shape[-1]
        out = self.tail.new_empty(b, h, d, t).transpose(-1, -2)
        self.quantizer.dequantize(self.codes, self.lo, self.step, out=out[..., :nq, :])  # no concatenated copy
        out[..., nq:, :] = self.tail
        return out

    def weighted(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, Hkv, R, T) attention probabilities → p·V (B, Hkv, R, d), float32."""
        nq = self.lo.shape[-1]
        codes = unpack_codes(self.codes, self.quantizer.bits, -2, torch.float32)  # (B,Hkv,d/g,g,T_q)
        pf = p[..., :nq].float().unsqueeze(2)  # (B,Hkv,1,R,T_q)
        head = torch.matmul(pf * self.step.float(), codes.transpose(-1, -2))  # (B,Hkv,d/g,R,g)
        head += (pf * self.lo.float()).sum(-1, keepdim=True)
        head = head.transpose(2, 3).flatten(3)  # (B,Hkv,R,d)
        return head + torch.matmul(p[..., nq:].float(), self.tail.float())


def dense(x):
    """A tensor as it is; quantised rows dequantised."""
    return x if isinstance(x, torch.Tensor) else x.dense()


def key_logits(q: torch.Tensor, keys) -> torch.Tensor:
    """q (B,Hkv,R,r) · keysᵀ → (B,Hkv,R,T): on the codes where ``keys`` are quantised rows."""
    return torch.matmul(q, keys.transpose(-1, -2)) if isinstance(keys, torch.Tensor) else keys.logits(q)


def weighted_values(p: torch.Tensor, values) -> torch.Tensor:
    """p (B,Hkv,R,T) float32 · values → (B,Hkv,R,d) in the values' dtype: on the codes where ``values`` are
    quantised rows."""
    if isinstance(values, torch.Tensor):
        return torch.matmul(p.to(values.dtype), values)
    return values.weighted(p).to(values.dtype)
