"""``compress``: calibrate, fit per-head low-rank query/key maps, allocate ranks, certify, install.

    model, report = compress(model_or_name, recipe)          # the model is changed in place

The report (JSON-ready) has per layer and KV head: rank, retained logit energy, predicted
error, and the certificate measured on held-out tokens (DESIGN §5).

The report's parts (per head, per layer, the summary, the reliability flags) are built in ``compress_report``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .runtime import adapters, placement
from . import policies
from .runtime.modeling_lowrank import apply_lowrank
from .runtime.modes import DEFAULT_MODE, mode_of
from .plans import EXACT_SHARE, build_plans, layer_windows
from .runtime.plan import LayerPlan
from .calibrate import FitStats, QKSample, pre_rope_key_moments, run_hooked
from .fits import FITS, fit_all
from .errors import RecipeError, StatisticsError, TextError
from .models import LoadedModel, load_model
from . import value_plans
from .phases import PhaseClock
from .recipe import Recipe
from .cachepath import copy_check, copy_logprobs
from .compress_report import kv_bytes_report, layer_report, summary_report
from .texts import calibration_texts, token_windows

DEFAULT_SEQ_LEN = 2048  # calibration windows (spread over serve_len); attention weights cost O(seq_len) per token
DEFAULT_EXACT_WINDOW = 256  # exact recent keys in post-rope (README: the A/B against 64); k_bits scale it down
DEFAULT_EXACT_SINK = 1  # exact first key in post-rope (the attention sink; README)


def resolve_recipe(recipe: Recipe, layout: adapters.HeadLayout, seq_len: int | None = None) -> tuple[Recipe, str]:
    """The recipe with its mode and unset exact-key counts made concrete for this model, and the mode.
    Unset ``exact_window``/``exact_sink`` take the defaults in post-rope and 0 in the folded modes (which drop
    the full keys); set ones a mode cannot keep are refused. The default window is 256 keys, at most 1/8 of the
    ``seq_len``-token calibration windows, and k_bits/16 of that with quantised keys (4 bits: 64), so the exact
    keys keep the same share of the bytes (measured at 4 bits: 64 exact keys are better per byte than 256 on
    SmolLM2 and Gemma-3, eval/results/targets/ab)."""
    mode = resolve_mode(recipe, layout)
    if not mode_of(mode).keeps_full_keys:
        window, sink = 0, 0
    else:
        default = DEFAULT_EXACT_WINDOW * (recipe.k_bits or 16) // 16
        default = min(default, seq_len // EXACT_SHARE) if seq_len else default
        window = default if recipe.exact_window is None else recipe.exact_window
        sink = DEFAULT_EXACT_SINK if recipe.exact_sink is None else recipe.exact_sink
    return dataclasses.replace(recipe, exact_window=window, exact_sink=sink), mode


def resolve_mode(recipe: Recipe, layout: adapters.HeadLayout) -> str:
    mode = recipe.mode
    if mode == "auto":
        # post-rope (for a model without RoPE: post-projection) for every family: the only mode that keeps
        # the default recipe's exact window and sink keys; bilinear/rope-pairs must be asked for
        mode = DEFAULT_MODE
    refusal = mode_of(mode).check(layout, recipe.exact_window, recipe.exact_sink)
    if refusal:
        raise RecipeError(refusal)
    if recipe.max_rank is not None and recipe.max_rank > layout.head_dim:
        raise RecipeError(f"max_rank: must be <= head_dim {layout.head_dim}, got {recipe.max_rank}")
    if recipe.min_rank is not None and recipe.min_rank > layout.head_dim:
        raise RecipeError(f"min_rank: must be <= head_dim {layout.head_dim}, got {recipe.min_rank}")
    return mode


# ---------------------------------------------------------------- allocation

def allocate(fits, recipe: Recipe, layout, sample: QKSample | None, mode: str, slidings, model,
             held_windows=(), info: dict | None = None, k_means=None, serve_len: int | None = None,
             value_side=None, progress: bool = False, copy_probe: tuple | None = None) -> list[list[int]]:
    """Rank per layer and KV head by the recipe's policy (``lowrank_attn.policies``); what the policy
    measured goes into ``info`` when given (with the fidelity policy: the value width it chose, ``v_bits``).
    ``k_means``: as for ``build_plans``, and ``value_side`` (``value_plans.ValueSide.attach``): the plans the policy
    measures are the ones that will be installed; ``copy_probe`` (prefix, text, dense copy log-probs): the
    fidelity policy's long-range copy check."""
    ctx = policies.AllocationContext(fits=fits, recipe=recipe, layout=layout, mode=mode, model=model, sample=sample,
                                     slidings=list(slidings), held_windows=list(held_windows), k_means=k_means,
                                     serve_len=serve_len, value_side=value_side, progress=progress,
                                     copy_probe=copy_probe)
    ranks = policies.allocate(ctx)
    if info is not None:
        info.update(ctx.info)
    return ranks


# ---------------------------------------------------------------- the pipeline

@dataclass
class Calibration:
    """Token windows split into fit / held-out, the held-out sample, and fit statistics computed
    on demand per (weighting, windows, sink) — so a sweep calibrates once per configuration."""

    texts: list
    fit_windows: list
    held_windows: list
    seq_len: int
    sample: QKSample
    serve_len: int | None = None
    stats_cache: dict = field(default_factory=dict)

    @property
    def fit_tokens(self) -> int:
        return sum(len(w.input_ids) for w in self.fit_windows)

    def stats(self, model, weighting: str, window, progress: bool = True, sink: int = 0) -> FitStats:
        """``window``: exact recent keys, one int for every layer or one per layer."""
        key = (weighting, tuple(window) if isinstance(window, (list, tuple)) else window, sink)
        if key not in self.stats_cache:
            layout = adapters.head_layout(model)
            st = FitStats(layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim,
                          weighting=weighting, window=window, sink=sink)
            run_hooked(model, self.fit_windows, st, "calibration", progress, with_values=True)
            st.check_finite(next(model.parameters()).dtype)
            self.stats_cache[key] = st
        return self.stats_cache[key]


def serving_length(recipe: Recipe, layout, seq_len: int) -> int:
    """The longest context the maps must serve: ``recipe.serve_len`` or the model's maximum positions; the
    calibration length for models without RoPE (their windows are not moved)."""
    if not layout.has_rope:
        return seq_len
    serve_len = recipe.serve_len or layout.max_positions
    if serve_len > layout.max_positions:
        raise RecipeError(f"serve_len: {serve_len} exceeds the model's maximum of {layout.max_positions} positions")
    if serve_len < seq_len:
        raise RecipeError(f"serve_len: {serve_len} is shorter than the calibration windows (seq_len {seq_len})")
    return serve_len


def spread_positions(windows: list, serve_len: int, seed: int) -> list:
    """Place the windows at absolute positions spread evenly over [0, serve_len): window i of n starts at
    (i + 1/2)/n of the free range, in a seeded order (so text and position are not paired by list order).

    Post-RoPE keys and queries rotate with their absolute position; statistics from windows that all start
    at 0 describe only the phases of the first seq_len positions, and maps fitted to them fail on the slow
    planes further out (measured: +221% ppl at 8192 tokens from 2048-token windows at position 0)."""
    if not windows:
        return windows
    free = serve_len - max(len(w.input_ids) for w in windows)
    if free <= 0:
        return windows
    n = len(windows)
    order = np.random.default_rng(seed).permutation(n)
    return [dataclasses.replace(w, position=int((order[i] + 0.5) / n * free)) for i, w in enumerate(windows)]


def prepare_calibration(lm: LoadedModel, recipe: Recipe, *, progress: bool = True) -> Calibration:
    """Read and tokenise the calibration text, hold out windows, record the held-out sample."""
    layout = adapters.head_layout(lm.model)
    seq_len = recipe.seq_len or min(DEFAULT_SEQ_LEN, layout.max_positions)
    if seq_len > layout.max_positions:
        raise RecipeError(f"seq_len: {seq_len} exceeds the model's maximum of {layout.max_positions} positions")
    text_objs = calibration_texts(recipe.text, lm.model, lm.tokenizer, n_tokens=min(recipe.max_tokens or 8192, 8192),
                                  seed=recipe.seed)
    total = (recipe.max_tokens or 0) + recipe.heldout_tokens if recipe.max_tokens else None
    windows = token_windows(lm.tokenizer, text_objs, seq_len=seq_len, max_tokens=total)
    n_held = min(len(windows) - 1, -(-recipe.heldout_tokens // seq_len)) if recipe.heldout_tokens else 0
    # held-out windows spread evenly over the list, so several texts contribute
    held_idx = set(np.linspace(0, len(windows) - 1, n_held, dtype=int).tolist()) if n_held > 0 else set()
    serve_len = serving_length(recipe, layout, seq_len)
    cal = Calibration(texts=text_objs,
                      fit_windows=spread_positions([w for i, w in enumerate(windows) if i not in held_idx], serve_len,
                                                   recipe.seed),
                      held_windows=spread_positions([w for i, w in enumerate(windows) if i in held_idx], serve_len,
                                                    recipe.seed + 1),
                      seq_len=seq_len, sample=QKSample(), serve_len=serve_len)
    if cal.fit_tokens < 2 * layout.head_dim:
        raise TextError(f"calibration text too short: {cal.fit_tokens} tokens; at least {2 * layout.head_dim} are needed")
    if cal.held_windows:
        run_hooked(lm.model, cal.held_windows, cal.sample, "held-out", progress, with_values=True, residual=True)
    return cal


def compress(model: str | LoadedModel, recipe: Recipe | None = None, texts: list[str] | None = None, *,
             calibration: Calibration | None = None, progress: bool = True) -> tuple[LoadedModel, dict]:
    """Calibrate, fit, allocate, certify and install low-rank attention (in place). Returns (model, report).
    ``calibration`` (``prepare_calibration`` on the same model and recipe text) skips re-reading the text."""
    recipe = recipe or Recipe()
    if texts is not None:
        recipe = recipe.replace(text=list(texts))
    dtype = getattr(torch, recipe.dtype)
    lm = model if isinstance(model, LoadedModel) else load_model(model if isinstance(model, str) else recipe.model,
                                                                 device=recipe.device, dtype=dtype)
    layout = adapters.head_layout(lm.model)
    _check_early(lm, recipe, layout)
    torch.manual_seed(recipe.seed)
    clock = PhaseClock(progress)
    clock.start("text", "reading the calibration text and recording the held-out sample")
    cal = calibration or prepare_calibration(lm, recipe, progress=progress)
    recipe, mode = resolve_recipe(recipe, layout, cal.seq_len)
    slidings = adapters.sliding_windows(lm.model)  # per layer (mistral/phi3: from the config)
    post = mode_of(mode).keeps_full_keys  # exact keys, keys cached centred
    windows = layer_windows(mode, recipe.exact_window, slidings)
    _check_window(recipe, windows, cal.seq_len, post)
    weighting = recipe.weighting if recipe.fit == "closed-form" else "none"  # baselines use plain statistics
    clock.start("statistics", "streaming query/key/output second moments over the calibration windows")
    stats = cal.stats(lm.model, weighting, windows, progress, recipe.exact_sink if post else 0)
    clock.start("fit", "closed-form maps per KV head")
    fit = FITS[recipe.fit]
    fit.check_model(layout)
    pre_rope = pre_rope_key_moments(lm.model, cal.fit_windows, progress) if fit.pre_rope_keys else None
    fits = fit_all(stats, layout, mode, recipe, lm.model, pre_rope)
    k_means = _key_means(lm, stats, layout) if recipe.fit == "closed-form" and post else None
    clock.start("values", "value maps" if recipe.v_rank_ratio < 1 else f"value quantisation ({recipe.v_rotation} basis)")
    values = value_plans.fit_value_side(stats, lm.model, layout, recipe, slidings, cal.seq_len, cal.sample.resid_sq)
    allocation, copy_probe = {}, _copy_probe(lm, cal)
    clock.start("allocation", f"ranks by the {recipe.policy} policy ({recipe.signal} signal, measured on held-out tokens)")
    ranks = allocate(fits, recipe, layout, cal.sample, mode, slidings, lm.model, cal.held_windows, allocation, k_means,
                     cal.serve_len, values.attach, progress, copy_probe)
    # one value width from here on: the fidelity policy's choice, else the widest the recipe lists
    recipe = recipe.with_value_bits(allocation["v_bits"]) if "v_bits" in allocation else recipe.one_value_width()
    if fit.fold is not None and layout.has_rope:
        return _fold_before_rope(lm, recipe, mode, layout, fits, ranks, cal, fit)
    plans = build_plans(fits, ranks, recipe, mode, layout, k_means, windows)
    _check_finite(plans)
    values.attach(plans, recipe)
    clock.start("certificate", "attention error and its bound per head on held-out tokens")
    layers_report = _layers_report(plans, fits, values, stats, cal, layout, slidings, recipe)
    from .checkpoint import qk_fingerprint

    fingerprint = qk_fingerprint(lm.model)  # of the original weights, before folding
    clock.start("install")
    apply_lowrank(lm.model, plans)
    clock.stop()
    report = summary_report(lm, recipe, mode, layout, layers_report, cal.texts, cal.fit_tokens, cal.held_windows,
                            cal.seq_len, cal.serve_len)
    report["summary"]["kv_bytes_vs_bf16"] = kv_bytes_report(plans, layout)
    if copy_probe:  # (prefix, text, dense log-probs)
        report["summary"]["long_range_copy"] = copy_check(copy_probe[2], copy_logprobs(lm.model, *copy_probe[:2]),
                                                          copy_probe[1])
    report.update(qk_fingerprint=fingerprint, timings_s=clock.times, allocation=allocation)
    return lm, report


def _copy_probe(lm: LoadedModel, cal) -> tuple | None:
    """(prefix, text, the dense model's copy log-probs) from the first held-out window's first half (its BOS as
    the prefix), or None without held-out windows: ``cachepath.copy_logprobs``, measured on each point the fidelity
    policy weighs and again once the maps are installed (what RULER's retrieval needs, which held-out perplexity
    barely sees)."""
    if not cal.held_windows:
        return None
    ids = cal.held_windows[0].input_ids.tolist()
    bos = lm.tokenizer.bos_token_id
    prefix = ids[:1] if bos is not None and ids[0] == bos else []
    text = ids[len(prefix): len(ids) // 2]
    return prefix, text, copy_logprobs(lm.model, prefix, text)


def _layers_report(plans, fits, values: value_plans.ValueSide, stats, cal, layout, slidings, recipe) -> list[dict]:
    """Per layer: keys (ranks, energy, certificate: ``compress_report.layer_report``) and values."""
    v_windows = values.windows(recipe)
    return [{**layer_report(plan, row, layer, stats, cal, layout, slidings[layer], recipe),
             **value_plans.report_layer(values.fits[layer] if values.fits else None, values.ranks[layer], v_windows[layer])}
            for layer, (plan, row) in enumerate(zip(plans, fits))]


def _check_window(recipe: Recipe, windows: list[int], seq_len: int, post: bool) -> None:
    if post and max(windows) >= seq_len - 1 and recipe.policy != "uniform":
        raise RecipeError(f"exact_window: {recipe.exact_window} keeps every key of a {seq_len}-token calibration "
                          "window exact, so calibration sees no pair the projection touches; use a longer seq_len "
                          "or a smaller exact_window")


def _key_means(lm: LoadedModel, stats: FitStats, layout) -> list:
    """Per layer, the mean key the keys are cached centred on: the one the fit centred them on (exact: softmax
    ignores a constant key), so the dropped mean component cannot shift projected logits against the exact window
    and sink keys. None on soft-capped layers (gemma2): c·tanh(logit/c) is not shift-invariant."""
    family = adapters.adapter(lm.model)
    return [None if family.softcap(layer) else stats.key_mean(layer) for layer in range(layout.num_layers)]


def _check_early(lm: LoadedModel, recipe: Recipe, layout) -> None:
    """Refuse, before any text is read, a fidelity target without its policy (or the policy without one), a mode
    the model cannot take, and a weight change on offloaded weights."""
    recipe.check_targets()
    early_mode = resolve_mode(recipe, layout)
    if placement.is_offloaded(lm.model) and (mode_of(early_mode).folds_weights or FITS[recipe.fit].fold is not None):
        raise RecipeError(f"mode {early_mode} with fit {recipe.fit} changes the model's weights, and some are offloaded "
                          "(device_map with max_memory/offload_folder), where a change would be lost: use mode "
                          "post-rope with a projection fit (the default), or load the model without offloading")


def _check_finite(plans: list[LayerPlan]) -> None:
    for i, p in enumerate(plans):
        for t in (p.q_map, p.k_map):
            if t is not None and not torch.isfinite(t).all():
                raise StatisticsError(f"the fit of layer {i} is not finite (degenerate key statistics); "
                                      "raise ridge or give more calibration text")


def _fold_before_rope(lm, recipe, mode, layout, fits, ranks, cal, fit) -> tuple[LoadedModel, dict]:
    """A baseline installed in the weights before RoPE (``fits.Fit.fold``: weight-svd per query head, palu's key
    latent). Logits change only through the weights; queries and keys (and the model's K cache) stay
    d-dimensional, so this is a fidelity baseline, not a compressed checkpoint. No certificate: its error is
    not a post-RoPE projection of the held-out sample. The summary states the bf16 K bytes per token a cache of
    rank-r keys (palu: latents) would hold."""
    layers_report = []
    for layer, (row, layer_ranks) in enumerate(zip(fits, ranks)):
        fit.fold(lm.model, layer, row, layer_ranks, layout)
        heads = [{"kv_head": j, "rank": r,
                  "retained_energy": round(1 - float(e[r:].sum()) / float(e.sum()), 6) if e.sum() else 1.0}
                 for j, (e, r) in enumerate(zip((head.energy for head in row), layer_ranks))]
        layers_report.append({"layer": layer, "r_max": max(layer_ranks), "kv_heads": heads})
    lm.model.lowrank_attn_baseline = fit.name  # save_compressed refuses it
    report = summary_report(lm, recipe, mode, layout, layers_report, cal.texts, cal.fit_tokens, cal.held_windows, cal.seq_len,
                      cal.serve_len)
    report["summary"]["keys"] = (f"{fit.name}: folded into the weights before RoPE; this model's K cache is not "
                                 "reduced (latent_key_bytes_per_token_bf16: what rank-r keys or latents would take)")
    report["summary"]["latent_key_bytes_per_token_bf16"] = 2 * sum(sum(r) for r in ranks)
    return lm, report


