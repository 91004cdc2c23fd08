"""Streaming second moments of calibration activations: float64 sums kept on the activations' device and
flushed to NumPy on read. ``GramStats`` (q/k Grams: ``analyze``) and ``FitStats`` (what ``compress`` fits
from: attention-weighted Grams, key means, per-head output Grams). Fed by ``calibrate``'s hooks."""

from __future__ import annotations

import numpy as np
import torch

from .errors import StatisticsError
from .runtime.kernels import visible

# dtype of one forward's products (q q^T, k k^T over its ≤ a few thousand tokens); the sums over windows
# are always float64. float64 products are exact to ~1e-16 but slow on GPUs without fp64 units; float32
# products were measured (eval/results/precision/gram_products.md) against float64 ones.
PRODUCT_DTYPE = torch.float64


class _Sum:
    """A float64 statistic, read as a host numpy array. Sums of tensors on an accelerator are kept
    there (torch float64) and moved to the host once, when the statistic is read — not per layer
    per forward; on CPU the sums go straight into the host array (shared memory, no copy)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        obj._flush()
        return obj._host[self.name]

    def __set__(self, obj, value):
        if "_host" not in obj.__dict__:
            obj._host, obj._pending = {}, {}
        obj._flush()
        obj._host[self.name] = value


class _DeviceSums:
    _host: dict
    _pending: dict

    def _acc(self, name: str, device: torch.device) -> torch.Tensor:
        """The accumulator of ``name`` on ``device`` (a float64 torch tensor; add into it in place). One
        partial sum per device (the statistic is their total), so a model spread over devices by a
        device_map never moves a sum between them while it runs."""
        if device.type == "cpu":
            return torch.from_numpy(self._host[name])
        t = self._pending.get((name, device))
        if t is None:
            t = self._pending[(name, device)] = torch.zeros(self._host[name].shape, dtype=torch.float64, device=device)
        return t

    def _flush(self) -> None:
        pending = getattr(self, "_pending", None)
        if pending:
            for (name, _), t in pending.items():
                self._host[name] += t.cpu().numpy()
            pending.clear()

    def __getstate__(self):
        self._flush()
        return self.__dict__


class GramStats(_DeviceSums):
    """Streaming float64 second moments of queries and keys, per layer, per head.

    gq[l]: (H, d, d)    sum over tokens of q q^T for each query head
    skk[l]: (Hkv, d, d) sum of k k^T for each KV head;  sk[l]: (Hkv, d) sum of k
    go[l]: (H, d, d)    sum of o o^T of each query head's attention output (the value side; ``add_output``)
    n[l]: tokens seen.  Centred key Gram: skk - n k̄ k̄^T.  Memory is independent of tokens.
    """

    gq, skk, sk, go = _Sum(), _Sum(), _Sum(), _Sum()

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int):
        self.shape = (num_layers, num_heads, num_kv_heads, head_dim)
        d = head_dim
        self.gq = np.zeros((num_layers, num_heads, d, d))
        self.skk = np.zeros((num_layers, num_kv_heads, d, d))
        self.sk = np.zeros((num_layers, num_kv_heads, d))
        self.go = np.zeros((num_layers, num_heads, d, d))
        self.n = np.zeros(num_layers, dtype=np.int64)
        self.scale = np.full(num_layers, np.nan)

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        # query: (B, H, S, d), key: (B, Hkv, S, d); accumulate in float64 on the tensors' device.
        q = query.detach().to(PRODUCT_DTYPE)
        k = key.detach().to(PRODUCT_DTYPE)
        self._acc("gq", q.device)[layer] += torch.einsum("bhsd,bhse->hde", q, q)  # promoted into the float64 sum
        self._acc("skk", k.device)[layer] += torch.einsum("bhsd,bhse->hde", k, k)
        self._acc("sk", k.device)[layer] += k.sum(dim=(0, 2), dtype=torch.float64)
        self.n[layer] += q.shape[0] * q.shape[2]
        self.scale[layer] = scaling

    def __iadd__(self, other: "GramStats") -> "GramStats":
        if other.shape != self.shape:
            raise ValueError("cannot add Gram statistics of different shapes")
        self.gq += other.gq
        self.skk += other.skk
        self.sk += other.sk
        self.go += other.go
        self.n += other.n
        self.scale = np.where(np.isnan(self.scale), other.scale, self.scale)
        return self

    def add_output(self, layer: int, out: torch.Tensor) -> None:
        # out: (B, S, H, d) attention output before o_proj
        o = out.detach().to(PRODUCT_DTYPE)
        self._acc("go", o.device)[layer] += torch.einsum("bshd,bshe->hde", o, o)

    def key_gram_centred(self, layer: int) -> np.ndarray:
        """(Hkv, d, d): sum over tokens of (k - k̄)(k - k̄)^T."""
        n = max(int(self.n[layer]), 1)
        mean = self.sk[layer] / n
        return self.skk[layer] - n * np.einsum("hd,he->hde", mean, mean)

    def check_finite(self) -> None:
        for name in ("gq", "skk", "sk", "go"):
            arr = getattr(self, name)
            if not np.isfinite(arr).all():
                bad = sorted({int(i) for i in np.argwhere(~np.isfinite(arr))[:, 0]})
                raise StatisticsError(f"non-finite values in {name} statistics of layers {bad[:10]} "
                                      "(the model produced NaN/inf activations on this text)")


class FitStats(_DeviceSums):
    """Second moments for the fit, streamed in float64, optionally weighted by attention.

    With ``weighting='attention'`` each key is weighted by the attention it receives from
    queries at distance ≥ ``window`` (the only pairs the projection touches, since the last
    ``window`` keys stay exact — and so do the first ``sink`` keys, which are left out too), and each
    query by the attention it gives to such keys (``window``: one for every layer, or one per layer):

    gq[l]:  (H, d, d)   Σ_i b_i q_i q_i^T      skk[l]: (Hkv, d, d)  Σ_j a_j k_j k_j^T
    sk[l]:  (Hkv, d)    Σ_j a_j k_j            sa[l]:  (Hkv,)       Σ_j a_j
    go[l]:  (H, d, d)   Σ_i o_i o_i^T of each query head's attention output (the value fit, ``vfit``)
    Without weighting a = b = 1. Centred key Gram: skk − sk sk^T / sa.
    """

    gq, skk, sk, sa, go = _Sum(), _Sum(), _Sum(), _Sum(), _Sum()

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 weighting: str = "none", window=0, sink: int = 0):
        d = head_dim
        self.weighting, self.sink = weighting, sink
        self.windows = list(window) if isinstance(window, (list, tuple)) else [window] * num_layers
        self.group = num_heads // num_kv_heads
        self.gq = np.zeros((num_layers, num_heads, d, d))
        self.skk = np.zeros((num_layers, num_kv_heads, d, d))
        self.sk = np.zeros((num_layers, num_kv_heads, d))
        self.sa = np.zeros((num_layers, num_kv_heads))
        self.go = np.zeros((num_layers, num_heads, d, d))
        self.scale = np.full(num_layers, np.nan)
        self.tokens = 0

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask, scaling: float,
            value: torch.Tensor | None = None) -> torch.Tensor | None:
        """Accumulate one forward's q/k moments. query: (B, H, S, d), key and value: (B, Hkv, S, d). With attention
        weighting and ``value`` given, returns the attention output (B, S, H, d) from the same weights (the
        calibration forward then need not attend a second time); else None."""
        q = query.detach()
        k = key.detach()
        out = None
        if self.weighting == "attention":
            b_w, a_w, out = self._attention_weights(q, k, mask, scaling, self.windows[layer], value=value)
        else:
            b_w = q.new_ones(q.shape[:3])
            a_w = k.new_ones(k.shape[:3])
        q64, k64 = q.to(PRODUCT_DTYPE), k.to(PRODUCT_DTYPE)  # products in PRODUCT_DTYPE, sums in float64
        b64, a64 = b_w.to(PRODUCT_DTYPE), a_w.to(PRODUCT_DTYPE)
        dev = q.device
        self._acc("gq", dev)[layer] += torch.einsum("bhs,bhsd,bhse->hde", b64, q64, q64)
        self._acc("skk", dev)[layer] += torch.einsum("bhs,bhsd,bhse->hde", a64, k64, k64)
        self._acc("sk", dev)[layer] += torch.einsum("bhs,bhsd->hd", a64, k64)
        self._acc("sa", dev)[layer] += a64.sum(dim=(0, 2), dtype=torch.float64)
        self.scale[layer] = scaling
        if layer == 0:
            self.tokens += q.shape[0] * q.shape[2]
        return out

    def add_output(self, layer: int, out: torch.Tensor) -> None:
        # out: (B, S, H, d) attention output before o_proj
        o = out.detach().to(PRODUCT_DTYPE)
        self._acc("go", o.device)[layer] += torch.einsum("bshd,bshe->hde", o, o)

    def output_gram_group(self, layer: int, kv_head: int) -> np.ndarray:
        """(d, d): the attention-output Gram of the query heads of ``kv_head``'s group, averaged over them
        (``vfit``: exact when the group's heads share one output distribution)."""
        return self.go[layer, kv_head * self.group : (kv_head + 1) * self.group].mean(0)

    def _attention_weights(self, q, k, mask, scaling, window: int, block: int = 256, value=None):
        """Attention each query gives to, and each key receives from, pairs at distance ≥ window, and with
        ``value`` (B,Hkv,S,dv) the attention output (B,S,H,dv) in q's dtype from the same (all-pairs) weights.

        Query blocks of ``block`` rows (float32), each against only the keys it can see (causal: the
        upper triangle is never computed); a query head group shares its KV head's keys by stacking
        the group's rows (no repeated keys); the causal and window masks touch only the diagonal band."""
        b, h, s, d = q.shape
        vf = None if value is None else value.detach().float()
        out = None if value is None else q.new_empty((b, h, s, value.shape[-1]), dtype=torch.float32)
        g, hkv = self.group, h // self.group
        kt = k.float().transpose(-1, -2)  # (B,Hkv,d,S)
        qf = q.float() * scaling
        if mask is not None:
            mask = visible(mask[..., -s:])
        b_w = q.new_zeros((b, h, s), dtype=torch.float32)
        a_w = q.new_zeros((b, hkv, s), dtype=torch.float32)
        for start in range(0, s, block):
            stop = min(start + block, s)
            n = stop - start
            rows = torch.arange(start, stop, device=q.device)[:, None]
            qb = qf[:, :, start:stop].reshape(b, hkv, g * n, d)
            logits = torch.matmul(qb, kt[..., :stop]).view(b, h, n, stop)  # keys ≥ stop are in every row's future
            diag = logits[..., start:stop]
            diag.masked_fill_(torch.arange(start, stop, device=q.device) > rows, float("-inf"))
            if mask is not None:
                m = mask[..., start:stop, :stop] if mask.shape[-2] > 1 else mask[..., :stop]
                logits.masked_fill_(~m, float("-inf"))
            p = torch.softmax(logits, dim=-1)
            if out is not None:  # every pair, before the near ones are dropped below
                out[:, :, start:stop] = torch.matmul(p.view(b, hkv, g * n, stop), vf[..., :stop, :]).view(b, h, n, -1)
            if window > 0:  # only the pairs the projection will touch: drop distance < window
                lo = max(0, start - window + 1)
                near = rows - torch.arange(lo, stop, device=q.device) < window
                p[..., lo:stop].masked_fill_(near, 0.0)
            p[..., : self.sink].zero_()  # the first keys stay exact too
            b_w[:, :, start:stop] = p.sum(-1)
            a_w[..., :stop] += p.view(b, hkv, g * n, stop).sum(-2)
        if out is not None:
            out = out.transpose(1, 2).to(q.dtype).contiguous()
        return b_w, a_w, out  # (B,H,S), (B,Hkv,S), (B,S,H,dv) or None

    def key_gram_centred(self, layer: int) -> np.ndarray:
        sa = np.maximum(self.sa[layer], 1e-300)[:, None, None]
        return self.skk[layer] - np.einsum("hd,he->hde", self.sk[layer], self.sk[layer]) / sa

    def key_mean(self, layer: int) -> np.ndarray:
        """(Hkv, d): the (attention-weighted) mean key the centred Gram is centred on."""
        return self.sk[layer] / np.maximum(self.sa[layer], 1e-300)[:, None]

    def query_gram_group(self, layer: int, kv_head: int) -> np.ndarray:
        return self.gq[layer, kv_head * self.group : (kv_head + 1) * self.group].sum(0)

    def check_finite(self, dtype=None) -> None:
        """``dtype``: the model's; float16 gets the likely cause in the message (its range is 6.5e4)."""
        hint = ("; the model runs in float16, whose range its activations exceed (Gemma-3 does): use bfloat16 "
                "or float32" if dtype == torch.float16 else "")
        for name in ("gq", "skk", "sk", "sa", "go"):
            if not np.isfinite(getattr(self, name)).all():
                raise StatisticsError(f"non-finite values in {name} statistics (NaN/inf activations on the calibration "
                                      f"text){hint}")
