"""Tensor helpers of the compressed runtime, shared by the attention forward (``attention``) and the modes
(``modes``): RoPE, grouped-query layout, the low-rank projection, RoPE plane indices, how a mask reads, and the
row blocks and band windows of the fused prefill (``stack_rows``, ``window_views``)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def by_group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, S, e) → (B, Hkv, groups·S, e): the query heads of a KV head stacked along the rows (a view
    when x is contiguous), so one matmul against the KV head's keys serves its whole group — no copy of
    the keys or values per query head (what repeat_interleave would make at every decode step)."""
    b, h, s, e = x.shape
    return x.reshape(b, h // groups, groups * s, e)


# dtype of the q/k projection products for half-precision models (None: the model's own dtype); the
# result is cast back to the model dtype. Measured in eval/results/precision/.
PROJECTION_DTYPE: torch.dtype | None = torch.float32


def project(x: torch.Tensor, maps: torch.Tensor, groups: int) -> torch.Tensor:
    # x: (B, H, S, d); maps: (Hkv, r, d) shared by the `groups` query heads of each KV head → (B, H, S, r)
    b, h, s, _ = x.shape
    work = PROJECTION_DTYPE if PROJECTION_DTYPE is not None and x.element_size() < 4 else x.dtype
    out = torch.matmul(by_group(x, groups).to(work), maps.to(device=x.device, dtype=work).transpose(-1, -2))
    return out.to(x.dtype).view(b, h, s, -1)  # (B, Hkv, g·S, r) → (B, H, S, r)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B,H,S,e) with cos/sin (B,S,e') broadcast over heads; e' < e (partial rotary): the first e' dims."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def rope_plane_dims(planes: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(Hkv, n) plane indices → (Hkv, 2n) head dims in rotate_half layout [p…, p+d/2…]."""
    return torch.cat([planes, planes + head_dim // 2], dim=-1)


def visible(mask: torch.Tensor) -> torch.Tensor:
    """A transformers attention mask as booleans (True = the key may be attended): a bool mask as it is; an
    additive one holds 0 where allowed and its dtype's min where masked (-65504 in float16, not -inf)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def stack_rows(x, groups: int, c: int):
    """(B,H,S,e) → (B,Hkv,nb,g·c,e): rows in blocks of c (zero rows pad the last), a block's query heads stacked."""
    b, h, s, e = x.shape
    nb = -(-s // c)
    xb = torch.nn.functional.pad(x, (0, 0, 0, nb * c - s)).view(b, h // groups, groups, nb, c, e).transpose(2, 3)
    return xb.reshape(b, h // groups, nb, groups * c, e)


def unstack_rows(x, groups: int, s: int):
    """``stack_rows`` undone: (B,Hkv,nb,g·c,e) → (B,H,S,e)."""
    b, hkv, nb, gc, e = x.shape
    c = gc // groups
    return x.view(b, hkv, nb, groups, c, e).transpose(2, 3).reshape(b, hkv * groups, nb * c, e)[:, :, :s]


def band_positions(a: int, s: int, c: int, width: int, device):
    """Rows a…a+S-1 in blocks of c, each block against the c + width - 1 positions ending at its last row (a band
    of ``width`` keys per row): (nb, rows (nb,1,c,1) positions i, cols (nb,1,1,span) positions j, lo the first j)."""
    nb, span, lo = -(-s // c), c + width - 1, a - width + 1
    rows = a + torch.arange(nb * c, device=device).view(nb, 1, c, 1)
    cols = lo + c * torch.arange(nb, device=device).view(nb, 1, 1, 1) + torch.arange(span, device=device)
    return nb, rows, cols, lo


def window_views(x, lo, length, span, step):
    """Overlapping windows of x (B,Hkv,T,e) along T: positions lo, lo+1, … lo+length-1 (zero outside 0…T-1),
    cut into windows of ``span`` starting every ``step`` → (B,Hkv,n,span,e), strided views of one padded copy."""
    t = x.shape[-2]
    front, back = max(0, -lo), max(0, lo + length - t)
    xp = torch.nn.functional.pad(x[..., max(0, lo) : min(t, lo + length), :], (0, 0, front, back))
    return xp.unfold(2, span, step).transpose(-1, -2)
