"""Rank allocation: which rank each KV head keeps. Policies (how ranks are chosen) and signals (what
the budget allocation ranks components by) are registered by name; ``allocate`` is the one entry.

    ctx = AllocationContext(fits, recipe, layout, mode, model, sample, slidings, held_windows)
    ranks = allocate(ctx)      # per layer, per KV head; ctx.info holds what the policy measured

Policies (``recipe.policy``)
  uniform   rank_ratio · head_dim everywhere
  energy    per head, the smallest rank keeping ``tau`` of its logit energy
  budget    one rank per layer (the padded cache's real byte count), greedy under the budget
            ``rank_ratio`` on the signal's per-component gains
  bound     per head, the smallest rank whose certificate (mean TV bound on held-out rows) ≤ epsilon
  fidelity  the fewest total K+V bytes whose measured next-token KL to the dense model on the held-out
            windows is ≤ ``max_kl`` (or the lowest KL within ``max_kv_fraction`` of a bf16 cache), over the
            key budget and the listed value widths (``policy_fidelity``)

Signals (``recipe.signal``): per layer, the drop of an error per added component, (d,) each
  energy       logit energy of the fit (needs no held-out tokens)
  output       measured change of the attention output on held-out rows / median ‖residual‖²
  e2e          output, each layer rescaled by the next-token KL of compressing it alone (L forwards)
  fisher       output change weighted by the next-token loss gradient g at that output (one
               forward+backward over the held-out windows): Σ_rows (g·Δo)², the empirical Fisher
  fisher-diag  the same with the Fisher's diagonal: Σ_rows Σ_D g² Δo²
Signals that need held-out values fall back to ``energy`` without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import fit as fitmod
from . import policy_fidelity
from .calibrate import QKSample
from .errors import RecipeError
from .heldout import head_certificate, layer_output_errors, output_gradients
from .plans import build_plans, layer_windows
from .probes import end_to_end_kl
from .runtime import adapters
from .runtime.coded import key_quantizer
from .runtime.modes import mode_of

if TYPE_CHECKING:
    from .recipe import Recipe


@dataclass
class AllocationContext:
    fits: list  # per layer, per KV head: fits.HeadMaps (q_map (d,d), k_map (d,d), energy (d,), planes) in keep order
    recipe: Recipe
    layout: adapters.HeadLayout
    mode: str
    model: torch.nn.Module  # the dense model; unchanged on return
    sample: QKSample | None = None  # held-out q/k/v (and residual norms)
    slidings: list = field(default_factory=list)  # per layer: sliding window or None
    held_windows: list = field(default_factory=list)  # the held-out token windows the sample was taken on
    k_means: list | None = None  # per layer (Hkv, d): keys cached centred (as plans.build_plans)
    serve_len: int | None = None  # the longest context served: what each layer's cache holds (budget costs)
    value_side: Callable | None = None  # (plans, recipe) -> None: attaches the value side as compress will
    progress: bool = False  # a line per measured point (policies that search: fidelity)
    copy_probe: tuple | None = None  # (prefix, text, dense log-probs (len(text)-1, V)): cachepath's long-range copy check
    info: dict = field(default_factory=dict)  # filled by the policy: what it measured (goes into the report)

    @property
    def d(self) -> int:
        return self.layout.head_dim

    @property
    def granularity(self) -> int:
        gran = self.recipe.granularity
        return max(gran, mode_of(self.mode).rank_multiple)  # rope-pairs: whole planes

    @property
    def limits(self) -> dict:
        return self._on_grid(self.recipe.min_rank or 1, self.recipe.max_rank)

    def _on_grid(self, min_rank: int, max_rank: int | None) -> dict:
        """Rank limits in whole multiples of the granularity (rope-pairs: whole planes, so an odd min_rank of 3 is
        4): the floor rounded up, the cap down, the floor never above the cap."""
        g = self.granularity
        hi = None if max_rank is None else max(g, max_rank // g * g)
        return dict(min_rank=min(-(-min_rank // g) * g, hi or self.d), max_rank=hi, granularity=g)

    def budget_limits(self, ratio: float) -> dict:
        """``limits`` of a budget at ``ratio``; an unset ``min_rank`` is half the budget's mean rank: no layer
        below half the average. Every measured signal under-rates layers whose error compounds downstream
        (SmolLM2 at 50%: output signal +5.5% without a floor, +2.6% with one at d/4; the Fisher signals
        did not fix it, eval/results/allocation), and a floor relative to the budget is the same rule for
        every head size and ratio."""
        if self.recipe.min_rank is not None:
            return self.limits
        floor = max(1, int(round(ratio * self.d / 2)))
        return self._on_grid(min(floor, self.recipe.max_rank or self.d), self.recipe.max_rank)

    def layer_costs(self) -> list[float]:
        """Per layer, the keys its cache holds at the serving length (a sliding-window layer: its window), so a
        budget counts K-cache bytes where the cache is long; all equal without sliding layers or a serve_len."""
        n = self.serve_len
        if not n:
            return [1.0] * self.layout.num_layers
        return [float(min(w, n) if w else n) for w in (self.slidings or [None] * self.layout.num_layers)]

    @property
    def quantizer(self):
        return key_quantizer(self.recipe)

    @property
    def windows(self) -> list[int]:
        """Per layer, the exact recent keys the plans keep (``plans.layer_windows``; 0 in a mode without full keys)."""
        return layer_windows(self.mode, self.recipe.exact_window, self.slidings or [None] * self.layout.num_layers)

    @property
    def sink(self) -> int:
        """The exact first keys the plans keep (0 unless post-rope)."""
        return self.recipe.exact_sink if mode_of(self.mode).keeps_full_keys else 0

    @property
    def has_values(self) -> bool:
        return self.sample is not None and bool(self.sample.v)

    def per_head(self, layer_ranks: list[int]) -> list[list[int]]:
        return [[r] * self.layout.num_kv_heads for r in layer_ranks]

    def plans(self, ranks: list[list[int]], recipe: Recipe | None = None) -> list:
        """The layer plans of ``ranks``, as compress will install them (with ``recipe``'s value side, default the
        context's)."""
        recipe = (recipe or self.recipe).one_value_width()
        plans = build_plans(self.fits, ranks, recipe, self.mode, self.layout, self.k_means, self.windows)
        if self.value_side is not None:
            self.value_side(plans, recipe)
        return plans

    def key_mean(self, layer: int, j: int):
        """(d,) the mean key KV head j's keys are cached centred on, or None."""
        if self.k_means is None or self.k_means[layer] is None or not mode_of(self.mode).keeps_full_keys:
            return None
        return torch.as_tensor(self.k_means[layer][j])


# ---------------------------------------------------------------- signals

SIGNALS: dict[str, Callable[[AllocationContext], list[np.ndarray]]] = {}


def signal(name: str):
    def register(fn):
        SIGNALS[name] = fn
        return fn
    return register


def rank_grid(ctx: AllocationContext) -> list[int]:
    """The ranks at which held-out errors are measured: steps of max(granularity, d/8), and d."""
    d = ctx.d
    step = max(ctx.granularity, d // 8)
    grid = list(range(step, d + 1, step))
    return grid if grid[-1] == d else grid + [d]


def gains_from_errors(grid: list[int], errs: list[float], d: int) -> np.ndarray:
    """(d,) gain per component: each grid interval's error drop spread over its components; the first
    block is always kept (min_rank ≥ 1)."""
    g = np.zeros(d)
    g[: grid[0]] = 1e30
    for r0, r1, e0, e1 in zip(grid[:-1], grid[1:], errs[:-1], errs[1:]):
        g[r0:r1] = max(e0 - e1, 0.0) / (r1 - r0)
    return g


def output_errors(ctx: AllocationContext, grads: dict | None = None, score: str = "squared") -> tuple[list[int], list[list[float]]]:
    """The rank grid and, per layer, the held-out output error at each grid rank (one rank shared by the
    layer's KV heads). With ``grads`` (``heldout.output_gradients``) each row is scored by ``score``."""
    grid = rank_grid(ctx)
    windows = ctx.windows
    errors = []
    for layer, row in enumerate(ctx.fits):
        w_o = adapters.o_weight(ctx.model, layer).detach().float().cpu()
        cands = [[(torch.as_tensor(f[0][:r]), torch.as_tensor(f[1][:r]))
                  + (() if ctx.key_mean(layer, j) is None else (ctx.key_mean(layer, j),)) for j, f in enumerate(row)]
                 for r in grid]
        # the loss gradient is taken at the attention output itself; the plain score sees what the residual gets
        out_norm = adapters.attention_output_norm(ctx.model, layer) if grads is None else None
        errors.append(layer_output_errors(ctx.sample, layer, cands, w_o, group=ctx.layout.group_size,
                                          window=windows[layer], quantizer=ctx.quantizer, sliding=ctx.slidings[layer],
                                          sink=ctx.sink,
                                          grads=None if grads is None else grads[layer], score=score,
                                          out_norm=out_norm))
    return grid, errors


@signal("energy")
def energy_signal(ctx: AllocationContext) -> list[np.ndarray]:
    return [np.sum([f.energy for f in row], axis=0) for row in ctx.fits]


@signal("output")
def output_signal(ctx: AllocationContext) -> list[np.ndarray]:
    if not ctx.has_values:
        return energy_signal(ctx)
    grid, errors = output_errors(ctx)
    return [gains_from_errors(grid, e, ctx.d) for e in errors]


@signal("e2e")
def e2e_signal(ctx: AllocationContext) -> list[np.ndarray]:
    if not ctx.has_values:
        return energy_signal(ctx)
    grid, errors = output_errors(ctx)
    gains = [gains_from_errors(grid, e, ctx.d) for e in errors]
    if mode_of(ctx.mode).folds_weights or not ctx.held_windows:  # the probe swaps map buffers: maps-only modes
        return gains
    # the output error misjudges how much a layer's error costs downstream (early layers compound):
    # rescale each layer's gains so its error at the budget rank reads as the measured next-token KL
    # of compressing that layer alone
    i_probe = min(range(len(grid)), key=lambda i: abs(grid[i] - ctx.recipe.rank_ratio * ctx.d))
    ids = ctx.held_windows[0].input_ids[:1024]
    kls = end_to_end_kl(ctx.fits, ctx.recipe, ctx.layout, ctx.model, ids, grid[i_probe], ctx.k_means, ctx.windows)
    return [g * (kl / max(e[i_probe], 1e-30)) for g, kl, e in zip(gains, kls, errors)]


def _fisher(ctx: AllocationContext, score: str) -> list[np.ndarray]:
    if not ctx.has_values or not ctx.held_windows:
        return energy_signal(ctx)
    grads = output_gradients(ctx.model, ctx.held_windows)  # per layer, per window: (R, D)
    grid, errors = output_errors(ctx, grads, score)
    return [gains_from_errors(grid, e, ctx.d) for e in errors]


@signal("fisher")
def fisher_signal(ctx: AllocationContext) -> list[np.ndarray]:
    return _fisher(ctx, "fisher")


@signal("fisher-diag")
def fisher_diag_signal(ctx: AllocationContext) -> list[np.ndarray]:
    return _fisher(ctx, "fisher-diag")


# ---------------------------------------------------------------- policies

POLICIES: dict[str, Callable[[AllocationContext], list[list[int]]]] = {}


def policy(name: str):
    def register(fn):
        POLICIES[name] = fn
        return fn
    return register


def allocate(ctx: AllocationContext) -> list[list[int]]:
    """Ranks per layer, per KV head, by ``ctx.recipe.policy``."""
    if ctx.recipe.policy not in POLICIES:
        raise RecipeError(f"policy: must be one of {', '.join(POLICIES)}, got {ctx.recipe.policy!r}")
    ctx.info.setdefault("policy", ctx.recipe.policy)
    return POLICIES[ctx.recipe.policy](ctx)


@policy("uniform")
def uniform_policy(ctx: AllocationContext) -> list[list[int]]:
    n = ctx.layout.num_kv_heads
    flat = fitmod.allocate_uniform(ctx.d, ctx.layout.num_layers * n, ctx.recipe.rank_ratio, **ctx.limits)
    return [flat[i * n : (i + 1) * n] for i in range(ctx.layout.num_layers)]


@policy("energy")
def energy_policy(ctx: AllocationContext) -> list[list[int]]:
    n = ctx.layout.num_kv_heads
    flat = fitmod.allocate_energy([f.energy for row in ctx.fits for f in row], ctx.recipe.tau, **ctx.limits)
    return [flat[i * n : (i + 1) * n] for i in range(ctx.layout.num_layers)]


def layer_gains(ctx: AllocationContext) -> list[np.ndarray]:
    """The recipe's signal, per layer (d,)."""
    return SIGNALS[ctx.recipe.signal](ctx)


@policy("budget")
def budget_policy(ctx: AllocationContext, gains: list[np.ndarray] | None = None,
                  ratio: float | None = None) -> list[list[int]]:
    """One rank per layer (its KV heads' gains summed): the cache pads every head of a layer to the
    layer's largest rank, so per-layer ranks make the budget the real byte count — at the serving length:
    a component costs the keys its layer holds there (``layer_costs``), so ``rank_ratio`` is the share of the
    projected K cache kept at serve_len, and sliding-window layers (whose cache stops at the window) are cheap.
    Without sliding layers that is the mean kept rank / head_dim."""
    gains = layer_gains(ctx) if gains is None else gains
    ratio = ctx.recipe.rank_ratio if ratio is None else ratio
    costs = ctx.layer_costs()
    ranks = fitmod.allocate_budget(gains, ratio, costs=costs, **ctx.budget_limits(ratio))
    ctx.info["key_fraction_at_serve_len"] = float(np.dot(costs, ranks) / (ctx.d * sum(costs)))
    return ctx.per_head(ranks)


@policy("bound")
def bound_policy(ctx: AllocationContext) -> list[list[int]]:
    """Per head, the smallest rank whose certificate (mean TV bound on held-out rows) ≤ epsilon."""
    r, d, gran = ctx.recipe, ctx.d, ctx.granularity
    if ctx.sample is None or not ctx.sample.q:
        raise RecipeError("policy: bound needs held-out tokens (heldout_tokens > 0)")
    windows = ctx.windows
    ranks = []
    for layer, row in enumerate(ctx.fits):
        layer_ranks = []
        for j, (qm, km) in enumerate((f.q_map, f.k_map) for f in row):
            lo = fitmod.round_rank(r.min_rank or 1, gran, 1, d)
            hi = min(r.max_rank or d, d)
            while lo < hi:  # invariant: hi is certified (or the cap); every grid rank below lo fails
                mid = lo + (hi - lo) // (2 * gran) * gran  # on the grid, in [lo, hi - gran]: never untested
                c = head_certificate(ctx.sample, layer, j, ctx.layout.group_size, qm[:mid], km[:mid],
                                     window=windows[layer], quantizer=ctx.quantizer, sliding=ctx.slidings[layer],
                                     sink=ctx.sink, k_mean=ctx.key_mean(layer, j))  # as the final certificate
                if c.tv_bound_mean <= r.epsilon:
                    hi = mid
                else:
                    lo = mid + gran
            layer_ranks.append(hi)
        ranks.append(layer_ranks)
    return ranks


@policy("fidelity")
def fidelity_policy(ctx: AllocationContext) -> list[list[int]]:
    """The fewest total K+V cache bytes (key budget of the budget policy, value width among ``v_bits``) whose
    next-token KL to the dense model on the held-out windows is ≤ max_kl, or the lowest KL within
    max_kv_fraction of the bf16 cache (``policy_fidelity``)."""
    gains = layer_gains(ctx)
    ranks = policy_fidelity.choose(ctx, lambda ratio: budget_policy(ctx, gains, ratio))
    budget_policy(ctx, gains, ctx.info["rank_ratio"])  # the chosen budget's own key_fraction_at_serve_len
    return ranks
