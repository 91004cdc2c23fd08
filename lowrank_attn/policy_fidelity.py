"""The ``fidelity`` policy's search (registered in ``policies``): the K+V cache point a user asks for by what it
must keep or what it may cost, measured on the held-out windows.

* ``max_kl`` (``--max-kl X``): the fewest total K+V cache bytes whose next-token KL to the dense model is ≤ X.
* ``max_kv_fraction`` (``--max-kv-fraction X``): the lowest next-token KL among the points whose total K+V bytes
  at the serving length are ≤ X of a bf16 cache ("my cache at a fifth").

Two things move the bytes: the key budget (the ``budget`` policy's allocation at a ratio, in steps of 1/8 of
head_dim) and, where ``v_bits`` lists several widths, the value width. For a KL target, for each width, fewest
bytes first, a bisection over the key budget finds the smallest that meets ``max_kl`` (exact when the KL does not
rise with the budget, as when the greedy allocation is nested: every layer costs the same per rank; with sliding
layers at a serving length it need not be, and the answer is then the fewest-bytes point measured that meets it);
a budget is measured only when the bisection needs it, and a wider value width only at budgets whose bytes beat
the best point found so far. For a byte target, each width's
largest key budget within the bytes is measured (bytes come from the plans, without measuring) and the lowest KL
wins. Every probe installs the plans compress would install (keys and values) on the dense model, runs the
held-out windows and undoes them.

Every point is also checked for long-range copying (``cachepath.copy_check``: a held-out passage repeated, the
repeat read through the cache the point stores), and a point that copies ``COPY_WARN_POINTS`` or more under dense
is not taken: next-token KL on natural text barely sees keys that only retrieval needs (Gemma-3-270m's byte target
0.185 by KL alone: held-out KL 0.029, copy top-1 63% vs dense 98%, RULER 2.4 vs 35.7; the 2-bit-value point, KL
0.040, copies 97% and scores 31.3). Without a copy probe (``ctx.copy_probe``: compress gives one), KL decides alone.

If no point meets ``max_kl`` (and copies) the widest value width at full key rank is taken and the report (and the
compress output, and the model card) says so: ``max_kl_met: false``. If no point that fits ``max_kv_fraction``
copies, the one that copies best is taken and ``copy_kept: false`` says so. If no point fits ``max_kv_fraction``
it is an error (before anything is written), naming the smallest point's bytes.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np

from .cachepath import COPY_WARN_POINTS, copy_check, copy_logprobs, copy_lost
from .errors import RecipeError
from .heldout import heldout_fidelity, window_logprobs
from .kvbytes import kv_fraction
from .probes import installed
from .runtime.surgery import plans_config

BUDGET_STEPS = 8  # key budgets probed: multiples of head_dim/8 (or of the granularity, if coarser)
BYTES_AT = 8192  # candidates are compared by their total K+V bytes at this context (or the serving length)


def choose(ctx, ranks_at: Callable[[float], list[list[int]]]) -> list[list[int]]:
    """Ranks of the chosen point, by the recipe's target (``max_kv_fraction``, else ``max_kl``); ``ctx``
    (``policies.AllocationContext``) gets what was measured in ``info``. ``ranks_at(ratio)``: the key ranks of a
    budget (the budget policy's allocation)."""
    r = ctx.recipe
    r.check_targets()  # compress checks it before any work; the policy may be called on its own
    if not ctx.held_windows:
        raise RecipeError("policy: fidelity needs held-out tokens (heldout_tokens > 0); with heldout_tokens 0 use "
                          "--policy budget")
    search = _Search(ctx, ranks_at)
    if r.max_kv_fraction is not None:
        best, target = _best_within_bytes(search, r.max_kv_fraction), {"max_kv_fraction": r.max_kv_fraction}
    else:
        best = _cheapest_within_kl(search, r.max_kl)
        target = {"max_kl": r.max_kl, "max_kl_met": best is not None}
        if best is None:  # no point meets max_kl: the widest value width at full key rank
            widest = r.value_bit_options[-1]
            best = (search.bytes(search.n_budgets, widest), *search.measure(search.n_budgets, widest))
    _, ranks, m = best
    if "copy_accuracy" in m:
        target.update(copy_accuracy=m["copy_accuracy"], copy_accuracy_dense=search.copy_dense,
                      copy_kept=search.keeps_copying(m))
    ctx.info.update({"signal": r.signal, **target, "v_bits": m["v_bits"],
                     "rank_ratio": m["rank_ratio"], "mean_rank_ratio": m["mean_rank_ratio"], "kl": m["kl"],
                     "kv_bytes_fraction": m["kv_bytes_fraction"], "kv_bytes_at": search.tokens,
                     "heldout_ppl": m["ppl"], "heldout_ppl_dense": m["dense_ppl"],
                     "heldout_ppl_change": m["ppl"] / m["dense_ppl"] - 1,
                     "heldout_tokens": sum(len(w.input_ids) for w in ctx.held_windows),
                     "probes": sorted(({k: v for k, v in p.items() if k != "dense_ppl"} for p in search.probes.values()),
                                      key=lambda p: p["kv_bytes_fraction"])})
    return ranks


def _cheapest_within_kl(search: _Search, max_kl: float):
    """(bytes, ranks, measurement) of the fewest-bytes point with KL ≤ max_kl that keeps copying, or None. The
    bisection per value width assumes the KL falls (and copying holds) as the key budget grows (not guaranteed where
    layers' costs differ: a larger budget can move ranks between layers); the answer is the fewest-bytes point among
    all those measured that meets max_kl, so a bisection misled that way costs bytes, not the target."""
    for bits in search.ctx.recipe.value_bit_options:
        best = _fewest_bytes_met(search, max_kl)
        n = search.n_budgets
        if best is not None:  # only budgets that would beat the best point so far
            n = max((k for k in range(1, n + 1) if search.bytes(k, bits) < best[0]), default=0)
        if n == 0:
            continue
        lo, hi = 1, n  # every budget below lo was measured to miss; hi: the smallest not yet shown to miss
        while lo < hi:
            mid = (lo + hi) // 2
            if search.meets(search.measure(mid, bits)[1], max_kl):
                hi = mid
            else:
                lo = mid + 1
        search.measure(hi, bits)  # already measured unless no smaller budget met the target
    return _fewest_bytes_met(search, max_kl)


def _fewest_bytes_met(search: _Search, max_kl: float):
    """(bytes, ranks, measurement) of the fewest-bytes measured point with KL ≤ max_kl that keeps copying, or None."""
    met = [(search.bytes(k, bits), k, bits) for k, bits in search.measured()
           if search.meets(search.measure(k, bits)[1], max_kl)]
    if not met:
        return None
    fraction, k, bits = min(met)
    return (fraction, *search.measure(k, bits))


def _best_within_bytes(search: _Search, max_fraction: float):
    """(bytes, ranks, measurement) of the lowest-KL point that keeps copying among those whose bytes are ≤
    max_fraction (if none copies, the one that copies best): per value width the largest key budget that fits
    (bytes grow with the budget; found without measuring), each measured once."""
    points, options = [], search.ctx.recipe.value_bit_options
    for bits in options:
        fits = [k for k in range(1, search.n_budgets + 1) if search.bytes(k, bits) <= max_fraction]
        if fits:
            points.append((search.bytes(max(fits), bits), *search.measure(max(fits), bits)))
    copying = [p for p in points if search.keeps_copying(p[2])]
    if copying:
        return min(copying, key=lambda p: p[2]["kl"])
    if points:
        return max(points, key=lambda p: p[2]["copy_accuracy"])
    low, bits = min(((search.bytes(1, b), b) for b in options), key=lambda c: c[0])
    raise RecipeError(f"max_kv_fraction: no point fits {max_fraction:g} of the bf16 K+V cache at {search.tokens} "
                      f"tokens: the smallest (key budget {search.ratio(1):.3f}, {bits or 16}-bit values) keeps "
                      f"{low:.1%}; raise max_kv_fraction or list narrower v_bits")


class _Search:
    """The candidates (key budget k of ``n_budgets``, value width) of one model: their plans, bytes and measured
    fidelity (each measured at most once)."""

    def __init__(self, ctx, ranks_at: Callable[[float], list[list[int]]]):
        self.ctx, self.ranks_at = ctx, ranks_at
        self.step = max(ctx.granularity, ctx.d // BUDGET_STEPS, 1)
        self.n_budgets = math.ceil(ctx.d / self.step)
        self.tokens = ctx.serve_len or BYTES_AT
        self.dense = [window_logprobs(ctx.model, w) for w in ctx.held_windows]  # per window (S, V)
        self.copy_dense = None  # the dense model's copy top-1 accuracy (once a point is checked)
        self.probes: dict[tuple, dict] = {}  # (ranks per layer and KV head, value bits) -> measurement
        self._measured: list[tuple[int, object]] = []  # (budget, value bits) in the order measured
        self._ranks: dict[int, list[list[int]]] = {}
        self._bytes: dict[tuple, float] = {}

    def ranks(self, k: int) -> list[list[int]]:
        if k not in self._ranks:
            self._ranks[k] = self.ranks_at(self.ratio(k))
        return self._ranks[k]

    def ratio(self, k: int) -> float:
        return min(k * self.step / self.ctx.d, 1.0)

    def plans(self, k: int, bits):
        return self.ctx.plans(self.ranks(k), self.ctx.recipe.with_value_bits(bits))

    def bytes(self, k: int, bits, plans=None) -> float:
        """Total K+V bytes vs bf16 at ``tokens`` of the point (``plans``: its plans, if already built)."""
        if (k, bits) not in self._bytes:
            layout = self.ctx.layout
            low = plans_config(plans or self.plans(k, bits))
            self._bytes[k, bits] = kv_fraction(low, layout.num_kv_heads, layout.head_dim, self.tokens,
                                                 layout.sliding_windows)["total"]
        return self._bytes[k, bits]

    def keeps_copying(self, m: dict) -> bool:
        """Whether a measured point still copies (``cachepath.copy_lost``; True unchecked)."""
        return "copy_accuracy" not in m or not copy_lost(m["copy_accuracy"], self.copy_dense)

    def meets(self, m: dict, max_kl: float) -> bool:
        return m["kl"] <= max_kl and self.keeps_copying(m)

    def measured(self) -> list[tuple[int, object]]:
        """(budget, value bits) of every point measured so far."""
        return list(self._measured)

    def measure(self, k: int, bits) -> tuple[list[list[int]], dict]:
        ranks = self.ranks(k)
        key = (tuple(map(tuple, ranks)), bits)  # every head's rank: budgets can differ in any of them
        if (k, bits) not in self._measured:
            self._measured.append((k, bits))
        if key not in self.probes:
            plans = self.plans(k, bits)
            frac = self.bytes(k, bits, plans)  # before installing: from the plans as built
            with installed(self.ctx.model, plans):
                m = heldout_fidelity(self.ctx.model, self.ctx.held_windows, self.dense)
                m.update(self._copy())
            p = self.probes[key] = {"rank_ratio": self.ratio(k), "mean_rank_ratio": float(np.mean(ranks)) / self.ctx.d,
                                    "v_bits": bits, "kv_bytes_fraction": round(frac, 4), **m}
            if self.ctx.progress:
                self._say(p)
        return ranks, self.probes[key]

    def _copy(self) -> dict:
        """The installed point's long-range copy check ({} without a copy probe)."""
        if not self.ctx.copy_probe:
            return {}
        prefix, text, dense = self.ctx.copy_probe
        c = copy_check(dense, copy_logprobs(self.ctx.model, prefix, text), text)
        self.copy_dense = c["dense_accuracy"]
        return {"copy_accuracy": c["accuracy"], "copy_kl": c["kl"]}

    def _say(self, p: dict) -> None:
        from tqdm.auto import tqdm

        max_kl = self.ctx.recipe.max_kl
        verdict = "" if max_kl is None else f" ({'meets' if p['kl'] <= max_kl else 'misses'} {max_kl:g})"
        copy = "" if "copy_accuracy" not in p else (
            f"; long-range copy top-1 {p['copy_accuracy']:.1%} (dense {self.copy_dense:.1%})"
            + ("" if self.keeps_copying(p) else f", {COPY_WARN_POINTS}+ points under dense: loses retrieval"))
        tqdm.write(f"[fidelity] key budget {p['rank_ratio']:.3f}, {p['v_bits'] or 16}-bit values, K+V "
                   f"{p['kv_bytes_fraction']:.1%} at {self.tokens} tokens: next-token KL {p['kl']:.4g}{verdict}{copy}",
                   file=sys.stderr)
