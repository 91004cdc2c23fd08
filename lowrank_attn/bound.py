"""Pure math: the softmax stability certificate (DESIGN §5).

For one query row with exact logits z and approximate logits z' = z + δ over its
valid keys, p = softmax(z), p' = softmax(z'):

    KL(p‖p') ≤ osc(δ)²/8        (Hoeffding's lemma)
    TV(p,p') = ½‖p − p'‖₁ ≤ osc(δ)/4   (Pinsker on the line above)

with osc(δ) = max δ − min δ over valid keys. Always true, no assumption.
To first order ‖p − p'‖₂ ≤ p_max·‖δ‖₂; delocalised rows (p_max ≤ κ/n) keep it small,
attention sinks (one key with most of the mass) break that and are reported.
A row whose osc(δ)/4 reaches 1 has a vacuous TV bound (TV ≤ 1 always); their share is
``vacuous_fraction``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Certificate:
    rows: int
    tv_mean: float  # measured total variation, mean over rows
    tv_max: float
    kl_mean: float  # measured KL(p_exact ‖ p_approx)
    kl_max: float
    tv_bound_mean: float  # min(1, osc/4) averaged
    tv_bound_max: float
    kl_bound_mean: float  # osc²/8 averaged
    kl_bound_max: float
    pmax_mean: float  # mean over rows of the largest exact attention weight
    sink_fraction: float  # rows whose largest weight ≥ 0.5 (delocalisation broken)
    vacuous_fraction: float  # rows whose TV bound is trivial (osc(δ)/4 ≥ 1: says nothing)
    violations: int  # rows where measured TV or KL exceeded its bound (must be 0)

    def as_dict(self) -> dict:
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def certify(exact: torch.Tensor, approx: torch.Tensor, valid: torch.Tensor) -> Certificate:
    """exact, approx: (..., n, m) logits (float32 or float64, computed in that dtype);
    valid: bool, broadcastable to them (True = key visible)."""
    valid = valid.expand_as(exact)
    neg = torch.tensor(float("-inf"), dtype=exact.dtype, device=exact.device)
    logp = torch.log_softmax(torch.where(valid, exact, neg), dim=-1)
    logq = torch.log_softmax(torch.where(valid, approx, neg), dim=-1)
    p = logp.exp()
    zero = torch.zeros((), dtype=exact.dtype, device=exact.device)
    kl = torch.where(valid, p * (logp - logq), zero).sum(-1)
    tv = 0.5 * torch.where(valid, (p - logq.exp()).abs(), zero).sum(-1)
    delta = approx - exact
    big = torch.tensor(float("inf"), dtype=exact.dtype, device=exact.device)
    osc = torch.where(valid, delta, -big).amax(-1) - torch.where(valid, delta, big).amin(-1)
    has = valid.any(-1)
    kl, tv, osc = kl[has], tv[has], osc[has]
    tv_b = torch.clamp(osc / 4, max=1.0)
    kl_b = osc**2 / 8
    pmax = p.amax(-1)[has]
    tol = 1e-9 if exact.dtype == torch.float64 else 1e-5  # round-off of the measured values
    viol = int(((tv > tv_b + tol) | (kl > kl_b + tol)).sum())
    f = lambda t, op: float(getattr(t, op)()) if t.numel() else 0.0  # noqa: E731
    return Certificate(
        rows=int(has.sum()), tv_mean=f(tv, "mean"), tv_max=f(tv, "max"), kl_mean=f(kl, "mean"), kl_max=f(kl, "max"),
        tv_bound_mean=f(tv_b, "mean"), tv_bound_max=f(tv_b, "max"), kl_bound_mean=f(kl_b, "mean"),
        kl_bound_max=f(kl_b, "max"), pmax_mean=f(pmax, "mean"), sink_fraction=f((pmax >= 0.5).double(), "mean"),
        vacuous_fraction=f((osc >= 4).double(), "mean"), violations=viol,
    )


def first_order_tv_estimate(tail_error_per_pair: float, pmax: float, n_keys: int) -> float:
    """A-priori prediction of the L1 attention change from the fit's tail eigenvalues.

    ‖p − p'‖₂ ≲ p_max·‖δ‖₂ with ‖δ‖₂² ≈ n·(mean squared logit error per pair); L1 ≤ √n·L2; TV = L1/2.
    """
    l2 = pmax * (n_keys * max(tail_error_per_pair, 0.0)) ** 0.5
    return min(1.0, 0.5 * n_keys**0.5 * l2)
