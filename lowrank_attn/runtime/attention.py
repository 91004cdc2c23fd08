"""Compressed attention: the module that replaces a layer's attention forward.

The attention kernels (``attend``, ``_prefill_fused``, ``_attend_rows``; the tensor helpers they share with
the modes are in ``kernels``) and the forward every compressed attention module runs (``LowRankAttention``),
which reaches the model's weights only through its family adapter (``adapters``). Installing it is
``surgery.install_plans``; ``modeling_lowrank.apply_lowrank`` also gives the model its compressed class.

Per layer, for KV head j with rank r_j (padded with zero rows to the layer's r_max), the mode
(post-rope, bilinear, rope-pairs: one object each in ``modes``) gives the low-rank queries and keys.

Logits keep the model's own scale; per-row softmax in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from .values import ValueBand, band_pairs, decode as decode_values, encode as encode_values, prefill_values, value_quantizer
from .coded import FOLD_MAX_ROWS, dense, key_logits, key_quantizer, weighted_values
from .kcache import UnsupportedCacheError, lowrank_layer, prefill_keys
from .kernels import band_positions, by_group, stack_rows, unstack_rows, visible, window_views
from .plan import LayerPlan


ATTEND_BLOCK = 512  # query rows per block when attending a long prefill (bounds the explicit logits)


def attend(q_low, k_low, values, scaling, *, q_full=None, k_recent=None, window=0, mask=None, sliding=None,
           groups=1, k_sink=None, sink_start=None, softcap=None, exact_from=None, v_exact=None, v_window=0,
           block: int = ATTEND_BLOCK):
    """Attention with low-rank logits, an exact band of the ``window`` most recent keys, and the
    first keys (``k_sink``, attention sinks) exact; with ``v_exact``, a row's ``v_window`` most recent values exact.

    q_low: (B,H,S,r)   k_low: (B,Hkv,T,r)   values: (B,Hkv,T,dv)   queries are the last S of T positions
    q_full: (B,H,S,d)  k_recent: (B,Hkv,W,d) exact keys of the last W ≤ T positions
    k_sink: (B,Hkv,n,d) exact keys of the first n of the T positions, or with ``sink_start`` (B,) of the n
            positions from sink_start[b] on in row b (its first real token after left padding)
    mask: None (causal), bool (True = attend) or additive float, broadcastable to (B,H,S,T)
    softcap: c > 0 bends every logit to c·tanh(logit / c) before masking (gemma2), or None
    exact_from: keys from this position on are exact for every row (``prefill: exact``, a chunk after cached
            tokens: its own keys, which ``k_recent`` then covers), or None
    v_exact: (B,Hkv,N,dv) the unquantised values of the last N ≤ T positions, where ``values`` holds them
            quantised: row i reads value j from it where i − j < v_window (and j is among the N), as a decode
            step reads its own most recent values (the cache keeps the last v_window unquantised); else None

    Long query sets are processed in blocks of ``block`` rows, each against only the keys it can see
    (causal), so the explicit logits stay (B,H,block,T) and half the causal square is never computed.
    A causal prefill from position 0 (S = T, no mask) goes through the fused attention kernel instead:
    the low-rank pairs with q/k zero-padded to the value dim (exact), and with exact keys the band and
    sinks attended explicitly and merged by log-sum-exp (``_prefill_fused``).
    """
    s, t = q_low.shape[-2], k_low.shape[-2]
    if s == t or s > block:  # quantised rows (``coded``) are read on their codes by a few query rows only
        k_low, values = dense(k_low), dense(values)
    if mask is not None:
        mask = mask[..., -t:]
    v_band = ValueBand.of(v_exact, v_window, dense(values)) if v_exact is not None and v_window else None
    fused = None if sink_start is not None or softcap or exact_from is not None else _prefill_fused(
        q_low, k_low, values, scaling, q_full, k_recent, window, mask, sliding, groups, k_sink, v_band)
    if fused is not None:
        return fused
    if s <= block:
        return _attend_rows(q_low, k_low, values, scaling, q_full, k_recent, window, mask, sliding, groups, k_sink,
                            sink_start, softcap, exact_from, v_band)
    w_len = 0 if k_recent is None else k_recent.shape[-2]
    outs = []
    for start in range(0, s, block):
        stop = min(start + block, s)
        k_end = t - s + stop  # keys at positions ≥ k_end are in every row's future
        m = None
        if mask is not None:
            m = mask[..., start:stop, :k_end] if mask.shape[-2] > 1 else mask[..., :k_end]
        kr = None if k_recent is None else k_recent[..., : max(0, k_end - (t - w_len)), :]
        outs.append(_attend_rows(q_low[:, :, start:stop], k_low[..., :k_end, :], values[..., :k_end, :], scaling,
                                 None if q_full is None else q_full[:, :, start:stop], kr, window, m, sliding, groups,
                                 None if k_sink is None else k_sink[..., :k_end, :], sink_start, softcap, exact_from,
                                 None if v_band is None else v_band.upto(k_end)))
    return torch.cat(outs, dim=2)


def _padded(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.shape[-1] == dim else torch.nn.functional.pad(x, (0, dim - x.shape[-1]))


_FLASH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# Prompt length from which a prefill with exact keys (window, sinks) goes through the fused kernel (CPU); shorter
# prompts take the explicit blocked path (a few blocks of rows: the kernel's setup would not pay). The prefill
# ratios against dense are in eval/results/bench/prefill-*.json.
FUSED_WINDOW_MIN_LEN = 256
BAND_ROWS = 32  # query rows per band block of the fused prefill (each against BAND_ROWS + window - 1 keys)
BAND_CHUNK = 4096  # query rows per pass over the band (bounds its explicit logits to (B,H,BAND_CHUNK,~2·window))


def _prefill_fused(q_low, k_low, values, scaling, q_full, k_recent, window, mask, sliding, groups, k_sink,
                   v_band=None):
    """``attend`` for a causal prefill from position 0 through the fused SDPA kernel, or None where it
    does not apply (a mask, a sliding window shorter than the prompt, a chunk after cached tokens).

    With exact keys the pairs split three ways, each row's parts merged by log-sum-exp: far pairs
    (sink ≤ j ≤ i - window) through the flash kernel over the low-rank keys (which also returns each row's
    log-sum-exp), and the band (i - window < j ≤ i) and sinks (j < sink) explicitly, vectorised over
    blocks of BAND_ROWS rows (``_near_pairs``). A value band (``values.ValueBand``) adds, per row, its pairs'
    probabilities (from the row's log-sum-exp) times v − v̂ (``values.band_pairs``)."""
    b, h, s, r = q_low.shape
    t, dv = k_low.shape[-2], values.shape[-1]
    if s != t or s < 2 or mask is not None or (sliding and sliding < t):
        return None
    width = max(r, dv)  # q/k and values zero-padded to one width (exact), the output cut back to dv
    sink = 0 if k_sink is None else min(k_sink.shape[-2], t)
    window = window if k_recent is not None and k_recent.shape[-2] > 0 else 0
    if v_band is not None and v_band.diff.shape[-2] != t:
        return None
    if not window and not sink and v_band is None:  # every pair low-rank: one causal kernel call (zero padding is exact)
        return torch.nn.functional.scaled_dot_product_attention(
            _padded(q_low, width), _padded(k_low, width), _padded(values, width), is_causal=True, scale=scaling,
            enable_gqa=groups > 1)[..., :dv]
    if (_FLASH_LSE is None or q_low.device.type != "cpu" or t < FUSED_WINDOW_MIN_LEN
            or ((window or sink) and q_full is None) or (window and k_recent.shape[-2] != t)):
        return None
    values = values.contiguous()  # a quantised cache hands back a channel-major view: the kernels read rows
    far0 = window + sink  # the first row with a far pair
    lse_far = q_low.new_full((b, h, t), float("-inf"), dtype=torch.float32)
    o_far = None
    if far0 < t:  # rows far0… against keys sink…t-window-1: a causal square
        o_far, lse = _FLASH_LSE(_padded(q_low[:, :, far0:], width), _padded(k_low[:, :, sink : t - window], width),
                                _padded(values[:, :, sink : t - window], width), 0.0, True, scale=scaling)
        o_far, lse_far[:, :, far0:] = o_far[..., :dv], lse.float()
    if not window and not sink:  # (a value band) every pair low-rank: the kernel's output and log-sum-exp
        out, lse_all = o_far.contiguous(), lse_far
    else:
        out = torch.empty(b, h, t, dv, dtype=values.dtype, device=values.device)
        lse_all = torch.empty_like(lse_far) if v_band is not None else None
    keys = k_recent if window else k_sink
    exact_keys = None  # the exact keys of every position a value band may read exactly (the window's, the sinks)
    if v_band is not None and (window or sink):
        exact_keys = k_recent if window else torch.nn.functional.pad(k_sink[..., :sink, :], (0, 0, 0, t - sink))
    for a in range(0, t, BAND_CHUNK):
        e = min(a + BAND_CHUNK, t)
        if window or sink:
            o_near, lse_near = _near_pairs(q_full[:, :, a:e] * scaling, keys, values, a, window, sink, groups)
            out[:, :, a:e], lse = _merge_far(o_near, lse_near, o_far, lse_far[:, :, a:e], a, far0)
            if lse_all is not None:
                lse_all[:, :, a:e] = lse
        if v_band is not None:
            out[:, :, a:e] += band_pairs(q_low[:, :, a:e] * scaling, None if exact_keys is None else
                                         q_full[:, :, a:e] * scaling, k_low, exact_keys, v_band, lse_all[:, :, a:e],
                                         a, window, sink, groups, BAND_ROWS)
    return out


def _merge_far(o_near, lse_near, o_far, lse_far, a: int, far0: int):
    """Rows a…a+S-1: their near pairs' output and log-sum-exp merged with their far pairs' (``o_far`` holds rows
    far0… ; a row before far0 has none: ``lse_far`` −inf) → the rows' output (B,H,S,dv) and log-sum-exp (B,H,S)."""
    m = torch.maximum(lse_far, lse_near)
    wf, wn = torch.exp(lse_far - m), torch.exp(lse_near - m)  # every row holds its own key: m is finite
    total = wf + wn
    o = (wn / total).unsqueeze(-1).to(o_near.dtype) * o_near
    e = a + o.shape[-2]
    if o_far is not None and e > far0:
        lo = max(a, far0)
        w_far = (wf / total)[..., lo - a :].unsqueeze(-1).to(o_near.dtype)
        o[:, :, lo - a :] += w_far * o_far[:, :, lo - far0 : e - far0]
    return o, m + total.log()


def _near_pairs(q, keys, values, a, window, sink, groups):
    """Rows a…a+S-1 of a causal prefill against their exact keys: the band (i - window < j ≤ i, j ≥ sink) and
    the sinks (j < sink), softmax-normalised over those pairs; returns the output and each row's log-sum-exp.

    q: (B,H,S,d) scaled exact queries   keys: (B,Hkv,T,d) exact keys   values: (B,Hkv,T,dv)
    → (B,H,S,dv), (B,H,S) float32. Rows go in blocks of c = BAND_ROWS; block n's band keys are the
    c + window - 1 positions ending at its last row, taken as strided views of one padded copy (no per-block copy)."""
    b, s, hkv, c = q.shape[0], q.shape[2], keys.shape[1], BAND_ROWS
    nb, rows, cols, lo = band_positions(a, s, c, window, q.device)  # block n holds keys lo + n·c … (window's span)
    qb = stack_rows(q, groups, c)  # (B,Hkv,nb,g·c,d)
    parts, vals, allowed = [], [], []
    if sink:
        parts.append(torch.matmul(qb, keys[:, :, None, :sink].transpose(-1, -2)))  # (B,Hkv,nb,g·c,sink)
        vals.append(values[:, :, None, :sink])
        allowed.append(torch.arange(sink, device=q.device).view(1, 1, 1, sink) <= rows)
    if window:
        span = c + window - 1
        kp = window_views(keys, lo, nb * c + window - 1, span, c)  # (B,Hkv,nb,span,d)
        parts.append(torch.matmul(qb, kp.transpose(-1, -2)))  # (B,Hkv,nb,g·c,span)
        vals.append(window_views(values, lo, nb * c + window - 1, span, c))
        allowed.append((cols <= rows) & (rows - cols < window) & (cols >= sink))
    logits = torch.cat(parts, dim=-1).view(b, hkv, nb, groups, c, -1).float()
    logits.masked_fill_(~torch.cat(allowed, dim=-1), float("-inf"))  # (nb,1,c,n) broadcast over B,Hkv,g
    top = logits.amax(dim=-1, keepdim=True)  # finite: every row holds a sink or its own key
    z = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)  # one exp, in place
    lse = (top + z.log()).squeeze(-1)  # (B,Hkv,nb,g,c)
    p = logits.div_(z).to(values.dtype).view(b, hkv, nb, groups * c, -1)
    o = torch.matmul(p[..., :sink], vals[0]) if sink else 0
    if window:
        o = o + torch.matmul(p[..., sink:], vals[-1])  # (B,Hkv,nb,g·c,dv)
    lse = lse.view(b, hkv, nb, groups * c, 1)
    return unstack_rows(o, groups, s), unstack_rows(lse, groups, s).squeeze(-1)


def _attend_rows(q_low, k_low, values, scaling, q_full, k_recent, window, mask, sliding, groups, k_sink=None,
                 sink_start=None, softcap=None, exact_from=None, v_band=None):
    b, h, s, _ = q_low.shape
    t = k_low.shape[-2]
    logits = key_logits(by_group(q_low * scaling, groups), k_low).view(b, h, s, t)
    if k_sink is not None and k_sink.shape[-2]:
        n = k_sink.shape[-2]
        exact = torch.matmul(by_group(q_full * scaling, groups), k_sink.transpose(-1, -2)).view(b, h, s, n)
        if sink_start is None:
            logits[..., :n] = exact.to(logits.dtype)
        else:  # row b's sinks sit at sink_start[b] … (after its left padding)
            cols = sink_start.view(b, 1) + torch.arange(n, device=q_low.device)  # (B, n)
            idx = cols.clamp(max=t - 1).view(b, 1, 1, n).expand(b, h, s, n)
            keep = (cols < t).view(b, 1, 1, n)
            logits.scatter_(-1, idx, torch.where(keep, exact.to(logits.dtype), logits.gather(-1, idx)))
    q_pos = torch.arange(t - s, t, device=q_low.device).unsqueeze(-1) if s > 1 or sliding else None  # (S,1)
    if window and k_recent is not None and k_recent.shape[-2]:
        w_len = k_recent.shape[-2]
        lo = max(t - w_len, t - s - window + 1, 0)  # first key any row holds exact
        if exact_from is not None:
            lo = max(t - w_len, min(lo, exact_from))
        if lo < t:
            kr = k_recent[..., w_len - (t - lo) :, :]
            exact = torch.matmul(by_group(q_full * scaling, groups), kr.transpose(-1, -2)).view(b, h, s, t - lo)
            if s == 1:  # a decode step: every key from lo on is inside the band
                logits[..., lo:] = exact.to(logits.dtype)
            else:
                k_pos = torch.arange(lo, t, device=q_low.device)
                band = (q_pos - k_pos) < window  # (S, t-lo)
                if exact_from is not None:
                    band = band | (k_pos >= exact_from)
                logits[..., lo:] = torch.where(band, exact.to(logits.dtype), logits[..., lo:])
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is None:
        if sliding and sliding < t:
            k_pos = torch.arange(t, device=q_low.device)
            allowed = (k_pos <= q_pos) & (q_pos - k_pos < sliding)
            logits.masked_fill_(~allowed, float("-inf"))
        elif s > 1:  # only the last S keys can be in a row's future
            future = torch.arange(t - s, t, device=q_low.device) > q_pos  # (S,S)
            logits[..., t - s :].masked_fill_(future, float("-inf"))
    elif mask.dtype == torch.bool:
        logits.masked_fill_(~mask, float("-inf"))
    else:
        logits.add_(mask)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if mask is not None and mask.dtype == torch.bool:  # a query that may see no key (a left-pad row): output 0,
        probs = probs.nan_to_num(0.0)                    # as SDPA gives, not NaN that later layers read as values
    out = weighted_values(by_group(probs, groups), values).view(b, h, s, -1)  # (B,Hkv,g·S,dv) → (B,H,S,dv)
    near = None if v_band is None else v_band.rows(probs, groups)
    return out if near is None else out + near


class LowRankAttention(nn.Module):
    """The forward of every compressed attention module, whatever the family and mode: the module's adapter
    (``self.lowrank_family``, see ``adapters``) projects q/k/v, places the q/k norms, says whether this
    layer has RoPE, its sliding window and soft cap, and applies the output projection; its mode
    (``self.lowrank_mode``, see ``modes``) turns the hidden states into low-rank (and full) queries and keys."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        plan: LayerPlan = self.lowrank_plan
        fam = self.lowrank_family
        b, s, _ = hidden_states.shape
        groups = fam.group_size
        rope = position_embeddings if fam.uses_rope(self.layer_idx) else None  # cos, sin: (B, S, rotary dims)
        # (B,H,S,r), (B,Hkv,S,r), (B,Hkv,S,dv), and the full post-RoPE q/k where the mode keeps exact keys
        q_low, k_low, v, q_full, k_full = self.lowrank_mode.qk(self, fam, plan, hidden_states, rope)
        v = encode_values(self, v)  # (B,Hkv,S,r_v): what the cache stores
        out = _cached_attend(self, plan, q_low, k_low, v, q_full, k_full, attention_mask, past_key_values, groups)
        out = decode_values(self, out, groups)  # (B,H,S,d)
        return fam.output(self, out.transpose(1, 2).reshape(b, s, -1)), None


def _cached_attend(module, plan, q_low, k_low, v, q_full, k_full, mask, cache, groups):
    quantizer = key_quantizer(plan)
    v_quantizer = value_quantizer(plan)
    window = plan.window if k_full is not None else 0
    sliding = module.lowrank_family.sliding_window(module.layer_idx)
    sink = plan.sink if k_full is not None and not sliding else 0
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        raise UnsupportedCacheError("compressed attention needs a 4-D sdpa/eager attention mask, got "
                                    f"{type(mask).__name__}: load the model with attn_implementation='sdpa'")
    sink_start = exact_from = v_exact = None
    softcap = module.lowrank_family.softcap(module.layer_idx)
    exact = (getattr(module, "lowrank_prefill", "compressed") == "exact" and q_full is not None and not softcap
             and (mask is not None or not sliding or sliding >= k_low.shape[-2]))
    if cache is not None:
        layer = lowrank_layer(cache, module.layer_idx, window=window, quantizer=quantizer, sliding=sliding, sink=sink,
                              v_quantizer=v_quantizer, v_window=plan.v_window)
        first = _first_real(mask, k_low.shape[-2]) if sink and not layer.is_initialized else None
        s, history = k_low.shape[-2], layer.get_seq_length()
        prompt = exact and history == 0  # a prompt from an empty cache: stored compressed, attended exactly
        chunk = exact and history > 0 and s > 1  # after cached tokens: its own keys and values exact
        # a compressed chunk after cached tokens: the unquantised values the cache holds before this append
        held = layer.values if v_quantizer is not None and not exact and history > 0 and s > 1 else None
        k_all, k_recent, v_all = layer.append(k_full if window or sink else k_low[..., :0], k_low, v, first_real=first,
                                              coded=prompt or (not chunk and groups * s <= FOLD_MAX_ROWS))
        if prompt:
            return exact_attend(q_full, k_full, v, module.scaling, mask, groups)
        if chunk:
            exact_from = k_all.shape[-2] - s
            v_all = torch.cat([v_all[..., :exact_from, :], v], dim=-2)
        elif s > 1 and v_quantizer is not None:  # a compressed prompt or chunk: rows read their recent values exact
            n = 0 if held is None else min(held.shape[-2], plan.v_window - 1, v_all.shape[-2] - s)
            v_exact = torch.cat([held[..., held.shape[-2] - n :, :], v], dim=-2) if n > 0 else v  # (B,Hkv,n+S,dv)
        k_sink = layer.sink_keys
        sink_start = layer.sink_offsets() if sink else None
    elif exact:
        return exact_attend(q_full, k_full, v, module.scaling, mask, groups)
    else:
        k_all, k_recent = prefill_keys(k_low, window, quantizer), k_full
        v_all = prefill_values(v, plan.v_window, v_quantizer)
        v_exact = v if v_quantizer is not None else None
        k_sink = None
        if sink:
            first = _first_real(mask, k_low.shape[-2])
            if first is not None and bool(first.any()):  # left padding: each row's own first real tokens
                idx = first[:, None] + torch.arange(sink, device=first.device)  # (B, sink)
                idx = idx.clamp(max=k_full.shape[-2] - 1)
                k_sink = k_full.gather(2, idx[:, None, :, None].expand(-1, k_full.shape[1], -1, k_full.shape[-1]))
                sink_start = first
            else:
                k_sink = k_full[..., :sink, :]
    return attend(q_low, k_all, v_all, module.scaling, q_full=q_full, k_recent=k_recent, window=window, mask=mask,
                  sliding=sliding, groups=groups, k_sink=k_sink, sink_start=sink_start, softcap=softcap,
                  exact_from=exact_from, v_exact=v_exact, v_window=plan.v_window)


def exact_attend(q_full, k_full, values, scaling, mask, groups):
    """A prompt attending over its own full keys and values (``prefill: exact``, ``surgery.set_prefill``): dense
    SDPA, q/k and values zero-padded to one width (exact). q_full (B,H,S,d), k_full (B,Hkv,S,d), values (B,Hkv,S,dv)
    → (B,H,S,dv); mask None (causal) or the model's 4-D mask."""
    width, dv = max(q_full.shape[-1], values.shape[-1]), values.shape[-1]
    if mask is not None:
        mask = mask[..., -k_full.shape[-2]:]
    return torch.nn.functional.scaled_dot_product_attention(
        _padded(q_full, width), _padded(k_full, width), _padded(values, width), attn_mask=mask, is_causal=mask is None,
        scale=scaling, enable_gqa=groups > 1)[..., :dv]


def _first_real(mask, s: int) -> torch.Tensor | None:
    """(B,) index of each row's first key its last query may attend (the first real token after left
    padding), from a prefill's (B, 1|H, S, T) mask (bool: True = attend; additive: 0 = attend), or None."""
    if mask is None:
        return None
    row = mask[:, 0, -1, -s:]  # (B, S)
    return visible(row).int().argmax(dim=-1)
