"""The low-rank K cache: projected keys for every position, the last ``window`` keys exact,
and optionally the projected keys quantised KIVI-style (per channel over token groups).

It is a transformers ``DynamicLayer``, so it lives inside the stock ``DynamicCache`` that
``generate`` creates: a compressed attention module swaps its layer of the cache for this
one on first use. Bytes are measured from the stored tensors (``nbytes``), never computed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .coded import GroupQuantizer, QuantizedKeys, QuantizedValues, dense
from .errors import LowrankAttnError


class UnsupportedCacheError(LowrankAttnError, ValueError):
    """A cache or decoding strategy the low-rank K cache cannot serve (static, offloaded or quantised
    caches, assisted decoding)."""


class LowRankKeyLayer(DynamicLayer):
    """One layer of the compressed cache.

    keys:    (B, Hkv, T_fp, r)  projected keys not (yet) quantised  (all of them when k_bits is None)
    qkeys:   packed codes of the first T_q projected keys, plus per-group min/step (k_bits set)
    recent:  (B, Hkv, ≤window, d) the most recent keys, exact
    sink_keys: (B, Hkv, ≤sink, d) the first keys of each row, exact (attention sinks)
    sink_start: (B,) long, the position of each row's first real token (after its left padding):
             the sinks are the keys from there on, never pad tokens
    values:  (B, Hkv, T_v, d_v) values not (yet) quantised (all of them when v_quantizer is None); d_v = r_v
             where values are low-rank (``values.py``)
    vcodes:  (B, Hkv, d_v/g, g·bits/8, T_vq) packed per-token codes of the first T_vq values, plus vlo/vstep
             (B, Hkv, d_v/g, 1, T_vq) (v_quantizer set: KIVI's values, the last ``v_window`` kept unquantised)

Every per-row tensor above follows beam search (``reorder_cache``) and batch expansion/selection.

    On a sliding-window layer (``sliding`` = W) it keeps, like transformers' DynamicSlidingWindowLayer,
    only what the next query can see: the last W - 1 positions. Quantised keys leave in whole groups
    (up to group - 1 older ones linger until their group is out of sight), and keys not yet quantised
    (the last window + group + S - 1 at most) always stay.
    """

    def __init__(self, window: int = 0, quantizer: GroupQuantizer | None = None, sliding: int | None = None,
                 sink: int = 0, v_quantizer=None, v_window: int = 0):
        super().__init__()
        if sink and sliding:
            raise ValueError("exact sink keys leave a sliding window: use sink=0 on sliding layers")
        self.window, self.quantizer, self.sliding, self.sink = window, quantizer, sliding or None, sink
        self.v_quantizer, self.v_window = v_quantizer, v_window
        self.sink_keys = self.sink_start = None
        self.is_sliding = self.sliding is not None
        self.recent = self.qcodes = self.qlo = self.qstep = None
        self.vcodes = self.vlo = self.vstep = None
        self.n_quantized = 0  # positions ever quantised (those dropped from a sliding window included)
        self.cumulative_length = 0

    def append(self, full_keys: torch.Tensor, proj_keys: torch.Tensor, values: torch.Tensor,
               first_real: torch.Tensor | None = None, coded: bool = False):
        """Store new tokens; return (projected keys of the T visible positions, exact keys of the last
        ≤ window + S positions, the T visible values). T is every position so far, or on a sliding layer
        at most W - 1 + S. Quantised keys and values come back dequantised, or with ``coded`` (not on a
        sliding layer) as ``coded.QuantizedKeys`` / ``QuantizedValues`` that attention reads on their codes.
        ``first_real`` (B,): on the first call, where each row's real tokens start (left padding before
        them); None = no padding."""
        if not self.is_initialized:
            self.lazy_initialization(proj_keys, values)
            self.recent = full_keys[..., :0, :]
            if self.sink:
                self._init_sinks(full_keys, first_real)
        elif self.sink and self.sink_keys.shape[-2] < self.sink:
            self.sink_keys = torch.cat([self.sink_keys, full_keys[..., : self.sink - self.sink_keys.shape[-2], :]], dim=-2)
        s = proj_keys.shape[-2]
        self.cumulative_length += s
        self.keys = torch.cat([self.keys, proj_keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        recent = torch.cat([self.recent, full_keys], dim=-2) if self.window else self.recent
        all_proj = self._quantize_old()
        self.recent = recent[..., -self.window :, :] if self.window else recent
        values = self._quantize_old_values()
        if not coded or self.sliding:
            all_proj, values = dense(all_proj), dense(values)
        if self.sliding:
            visible = min(self.cumulative_length, self.sliding - 1 + s)
            all_proj, values = all_proj[..., -visible:, :], values[..., -visible:, :]
            self._drop_out_of_window()
        self._per_row(_compact)  # what is kept, not the prompt-sized buffers it was sliced from
        return all_proj, recent, values

    def _init_sinks(self, full_keys: torch.Tensor, first_real: torch.Tensor | None) -> None:
        b, h, s, d = full_keys.shape
        start = torch.zeros(b, dtype=torch.long, device=full_keys.device) if first_real is None else first_real.long()
        self.sink_start = start
        pad = int(start.max())
        if pad and pad + self.sink > s:
            raise UnsupportedCacheError(f"a left-padded prompt must hold at least {self.sink} real token(s) in its "
                                        "first forward (the exact sink keys)")
        n = min(self.sink, s)
        idx = start[:, None] + torch.arange(n, device=start.device)  # (B, n)
        self.sink_keys = full_keys.gather(2, idx[:, None, :, None].expand(b, h, n, d))  # (B, Hkv, n, d)

    def sink_offsets(self) -> torch.Tensor | None:
        """(B,) position of each row's first sink key, or None when every row starts at 0."""
        if self.sink_start is None or not bool(self.sink_start.any()):
            return None
        return self.sink_start

    def _drop_out_of_window(self) -> None:
        """Keep the last sliding - 1 positions (whole quantised groups; see the class docstring)."""
        keep = self.sliding - 1
        excess = self._stored_values() - keep
        if excess <= 0:
            return
        if self.quantizer is None:
            self.keys = self.keys[..., excess:, :]
            self._drop_values(excess)
        elif self.qcodes is not None:  # quantised keys leave in whole groups; not-yet-quantised ones stay
            groups = min(excess // self.quantizer.group, self.qcodes.shape[2])
            self.qcodes, self.qlo, self.qstep = (t[:, :, groups:] for t in (self.qcodes, self.qlo, self.qstep))
            self._drop_values(groups * self.quantizer.group)

    def _stored_values(self) -> int:
        return self.values.shape[-2] + (0 if self.vcodes is None else self.vcodes.shape[-1])

    def _drop_values(self, n: int) -> None:
        """Drop the ``n`` oldest values: quantised ones first (per token: any count), then unquantised ones."""
        if self.vcodes is not None and n:
            nq = min(n, self.vcodes.shape[-1])
            self.vcodes, self.vlo, self.vstep = (t[..., nq:] for t in (self.vcodes, self.vlo, self.vstep))
            n -= nq
        if n:
            self.values = self.values[..., n:, :]

    def _quantize_old_values(self):
        """Quantise every value older than ``v_window`` (per token, KIVI); return all stored values (a tensor, or
        ``QuantizedValues`` once some are quantised)."""
        q = self.v_quantizer
        if q is None:
            return self.values
        n_new = self.values.shape[-2] - self.v_window
        if n_new > 0:
            codes, lo, step = q.quantize(self.values[..., :n_new, :])
            if self.vcodes is None:
                self.vcodes, self.vlo, self.vstep = codes, lo, step
            else:
                self.vcodes, self.vlo, self.vstep = (torch.cat([a, b], dim=-1) for a, b in
                                                     ((self.vcodes, codes), (self.vlo, lo), (self.vstep, step)))
            self.values = self.values[..., n_new:, :]
        if self.vcodes is None:
            return self.values
        return QuantizedValues(q, self.vcodes, self.vlo, self.vstep, self.values)

    def _quantize_old(self):
        """Quantise whole groups that are older than the window; return all projected keys (a tensor, or
        ``QuantizedKeys`` once some are quantised)."""
        q = self.quantizer
        if q is None:
            return self.keys
        t_total = self.n_quantized + self.keys.shape[-2]
        n_new = ((t_total - self.window) // q.group) * q.group - self.n_quantized
        if n_new > 0:
            codes, lo, step = q.quantize(self.keys[..., :n_new, :])
            self.qcodes = codes if self.qcodes is None else torch.cat([self.qcodes, codes], dim=2)
            self.qlo = lo if self.qlo is None else torch.cat([self.qlo, lo], dim=2)
            self.qstep = step if self.qstep is None else torch.cat([self.qstep, step], dim=2)
            self.keys = self.keys[..., n_new:, :]
            self.n_quantized += n_new
        if self.qcodes is None:
            return self.keys
        return QuantizedKeys(q, self.qcodes, self.qlo, self.qstep, self.keys)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys the next forward sees, as transformers' cache layers report it."""
        if not self.sliding:
            return self.cumulative_length + query_length, 0
        kv_offset = max(self.cumulative_length - self.sliding + 1, 0)
        kv_length = min(self.cumulative_length, self.sliding - 1) + query_length
        return kv_length, kv_offset

    def stored_keys(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.recent, self.sink_keys, self.qcodes, self.qlo, self.qstep) if t is not None]

    def stored_values(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.vcodes, self.vlo, self.vstep) if t is not None]

    def key_bytes(self, float_bytes: int | None = None) -> int:
        return sum(tensor_bytes(t, float_bytes) for t in self.stored_keys())

    def value_bytes(self, float_bytes: int | None = None) -> int:
        return sum(tensor_bytes(t, float_bytes) for t in self.stored_values())

    def reset(self) -> None:
        self.recent = self.sink_keys = self.sink_start = self.qcodes = self.qlo = self.qstep = None
        self.vcodes = self.vlo = self.vstep = None
        self.n_quantized = self.cumulative_length = 0
        super().reset()

    is_croppable = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise UnsupportedCacheError("the low-rank K cache cannot drop tokens (crop): assisted, prompt-lookup and "
                                    "speculative decoding are not supported with compressed attention")

    # Every tensor indexed by batch row; beam search and batch expansion/selection move them all together.
    _PER_ROW = ("keys", "values", "recent", "sink_keys", "sink_start", "qcodes", "qlo", "qstep", "vcodes", "vlo",
                "vstep")

    def _per_row(self, fn) -> None:
        for name in self._PER_ROW:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the state of row beam_idx[i] (projected, exact, sink and quantised keys)."""
        if self.is_initialized:
            self._per_row(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._per_row(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._per_row(lambda t: t[indices.to(t.device)])

    def offload(self):
        raise UnsupportedCacheError("offloaded caches are not supported with compressed attention")


def lowrank_layer(cache, idx: int, **kwargs) -> LowRankKeyLayer:
    """Layer ``idx`` of a transformers cache as a LowRankKeyLayer: the stock dynamic layer that ``generate``
    (or the user) put there is swapped for one built with ``kwargs`` on first use. Caches whose layers keep
    their own storage (static, offloaded, quantised) are refused: they would silently hold dense keys."""
    layer = cache.layers[idx]
    if isinstance(layer, LowRankKeyLayer):
        return layer
    if getattr(cache, "offloading", False):
        raise UnsupportedCacheError("offloaded caches are not supported with compressed attention; use the default "
                                    "dynamic cache (drop cache_implementation)")
    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise UnsupportedCacheError(f"{type(cache).__name__} ({type(layer).__name__} layers) is not supported with "
                                    "compressed attention, which keeps its own low-rank K cache inside the default "
                                    "dynamic cache; drop cache_implementation / pass a DynamicCache")
    if layer.get_seq_length():
        raise UnsupportedCacheError("a low-rank attention layer was given a cache that already holds dense keys")
    cache.layers[idx] = LowRankKeyLayer(**kwargs)
    return cache.layers[idx]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy of it where it is a slice of a buffer over twice its size: the exact window kept
    from a prompt's keys (``recent[..., -window:, :]``), the tail left after quantising a prompt, would otherwise
    hold the whole prompt-sized buffer alive until the next append. Decode-step slices (a window out of window +
    1 rows) stay views: their buffers are freed by the next step's ``cat``."""
    if t.untyped_storage().nbytes() > 2 * t.nbytes + 64:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def held_bytes(layer) -> int:
    """Bytes of the buffers a cache layer's tensors keep alive (each storage once): what it really occupies, which
    ``key_bytes`` + ``value_bytes`` equal when no stored tensor is a view of a larger buffer."""
    storages = {}
    for t in (*layer.stored_keys(), *layer.stored_values()):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def tensor_bytes(t: torch.Tensor, float_bytes: int | None = None) -> int:
    """``t.nbytes``, or with ``float_bytes`` set, as a model of that float size would hold it (codes keep theirs)."""
    return t.numel() * float_bytes if float_bytes and t.is_floating_point() else t.nbytes


def key_cache_bytes(cache, float_bytes: int | None = None) -> int:
    """Bytes held for keys by a transformers cache (low-rank layers or stock ones), measured from tensors;
    ``float_bytes=2``: counted as a bf16/fp16 model holds them (what people serve), whatever this model's dtype."""
    return kv_cache_bytes(cache, float_bytes)["k"]


def lowrank_layer_bytes(layer, float_bytes: int | None = None) -> tuple[int, int] | None:
    """(key bytes, value bytes) of a low-rank cache layer — this package's, or the class bundled in a checkpoint
    (remote code), recognised by its byte methods — or None for any other layer."""
    if not (hasattr(layer, "key_bytes") and hasattr(layer, "value_bytes")):
        return None
    return layer.key_bytes(float_bytes), layer.value_bytes(float_bytes)


def kv_cache_bytes(cache, float_bytes: int | None = None) -> dict[str, int]:
    """{"k", "v", "total"}: bytes a transformers cache holds for keys and for values (low-rank layers or stock
    dynamic ones), measured from the stored tensors (codes, scales, exact windows and sinks included)."""
    k = v = 0
    for layer in getattr(cache, "layers", []):
        if (kv := lowrank_layer_bytes(layer, float_bytes)) is not None:
            k, v = k + kv[0], v + kv[1]
        else:
            k += tensor_bytes(layer.keys, float_bytes) if getattr(layer, "keys", None) is not None else 0
            v += tensor_bytes(layer.values, float_bytes) if getattr(layer, "values", None) is not None else 0
    return {"k": k, "v": v, "total": k + v}


def prefill_keys(proj_keys: torch.Tensor, window: int, quantizer: GroupQuantizer | None) -> torch.Tensor:
    """Projected keys as a cache would hold them after a prefill of S tokens (quantised groups dequantised)."""
    if quantizer is None:
        return proj_keys
    t = proj_keys.shape[-2]
    n = max(0, ((t - window) // quantizer.group) * quantizer.group)
    if n == 0:
        return proj_keys
    old = quantizer.dequantize(*quantizer.quantize(proj_keys[..., :n, :])).to(proj_keys.dtype)
    return torch.cat([old, proj_keys[..., n:, :]], dim=-2)
