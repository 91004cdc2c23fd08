"""The ``compress`` report (JSON-ready): per layer and KV head its rank, retained logit energy, predicted error,
key rank, reliability and held-out certificate; the summary over heads; the calibration and source it came from.

A head is flagged ``"unreliable": true`` (with ``unreliable_reasons``; the summary counts them in
``unreliable_heads``) when its fit or certificate says little beyond the calibration text:
``key_rank`` < head_dim (the centred calibration keys span fewer dimensions, variance below
``KEY_RANK_RTOL`` of the largest counting as none: the key map is set by the ridge in the
others, so keys that leave that span at serving time are not covered), ``key_rank`` 0 (constant
keys), or a vacuous certificate (TV bound trivial on ≥ ``VACUOUS_FRACTION`` of held-out rows).
"""

from __future__ import annotations

import numpy as np

from .calibrate import FitStats
from .heldout import head_certificate
from .kvbytes import kv_fraction
from .recipe import Recipe
from .runtime import adapters
from .runtime.coded import key_quantizer
from .runtime.modes import head_maps
from .runtime.plan import LayerPlan
from .runtime.surgery import plans_config
from .texts import SAMPLED_NAME

KEY_RANK_RTOL = 1e-9  # centred-key variance below this fraction of the head's largest counts as none
VACUOUS_FRACTION = 0.5  # flag a head whose TV bound is trivial on at least this share of held-out rows


def key_rank(gk_centred: np.ndarray, gk_raw: np.ndarray) -> int:
    """Numerical rank of one head's centred key second moment; 0 for constant keys (whose centred
    moment is only round-off of the uncentred one, ``gk_raw``)."""
    lam = np.linalg.eigvalsh((gk_centred + gk_centred.T) / 2)
    top = float(lam[-1])
    if not top > 1e-12 * max(float(np.trace(gk_raw)), 0.0) or not top > 0:
        return 0
    return int((lam > KEY_RANK_RTOL * top).sum())


def unreliable_reasons(rank_k: int, d: int, cert: dict | None) -> list[str]:
    reasons = []
    if rank_k == 0:
        reasons.append("constant keys on the calibration text: no logit energy to fit, nothing known beyond it")
    elif rank_k < d:
        reasons.append(f"rank-deficient keys: calibration keys span {rank_k} of {d} dimensions; the key map is "
                       "set by the ridge in the others")
    if cert and cert.get("vacuous_fraction", 0.0) >= VACUOUS_FRACTION:
        reasons.append(f"vacuous certificate: the TV bound is trivial on {cert['vacuous_fraction']:.0%} of held-out rows")
    return reasons


def kv_bytes_report(plans: list[LayerPlan], layout) -> dict:
    """K and V bytes vs a bf16 dense cache at a few context lengths (kvbytes: exact)."""
    low = plans_config(plans)
    return {str(n): {k: round(v, 4) for k, v in kv_fraction(low, layout.num_kv_heads, layout.head_dim, n,
                                                                   layout.sliding_windows).items()}
            for n in (2048, 8192, 32768)}


def layer_report(plan: LayerPlan, row, layer: int, stats: FitStats, cal, layout, sliding,
                  recipe: Recipe) -> dict:
    """One layer's report: per KV head its rank, retained energy, key rank, reliability and (with held-out
    tokens) its certificate, measured on the plan as installed."""
    quant = key_quantizer(recipe)
    heads = []
    gk = stats.key_gram_centred(layer)
    for j, energy in enumerate(head.energy for head in row):
        r = plan.ranks[j]
        total_e = float(energy.sum())
        entry = {"kv_head": j, "rank": r, "retained_energy": round(1 - float(energy[r:].sum()) / total_e, 6) if total_e else 1.0,
                 # the tail energy sums over every (query head of the group, query token, key token): g·N·N pairs
                 "predicted_error_per_pair": float(energy[r:].sum()) / (layout.group_size * max(stats.tokens, 1) ** 2)}
        if cal.held_windows:
            qm, km = head_maps(plan, j, layout.head_dim)
            cert = head_certificate(cal.sample, layer, j, layout.group_size, qm, km, window=plan.window,
                                    quantizer=quant, sliding=sliding, sink=plan.sink,
                                    k_mean=None if plan.k_mean is None else plan.k_mean[j])
            entry["certificate"] = cert.as_dict()
        entry["key_rank"] = key_rank(gk[j], stats.skk[layer, j])
        reasons = unreliable_reasons(entry["key_rank"], layout.head_dim, entry.get("certificate"))
        entry["unreliable"], entry["unreliable_reasons"] = bool(reasons), reasons
        heads.append(entry)
    return {"layer": layer, "r_max": plan.r_max, "exact_window": plan.window, "kv_heads": heads}


def summary_report(lm, recipe, mode, layout, layers_report, text_objs, n_fit, held_windows, seq_len, serve_len=None) -> dict:
    heads = [h for layer in layers_report for h in layer["kv_heads"]]
    d = layout.head_dim
    certs = [h["certificate"] for h in heads if "certificate" in h]
    summary = {
        "mean_rank_ratio": round(float(np.mean([h["rank"] for h in heads])) / d, 6),
        "padded_rank_ratio": round(float(np.mean([layer["r_max"] for layer in layers_report])) / d, 6),
        "min_rank": min(h["rank"] for h in heads), "max_rank": max(h["rank"] for h in heads),
        "unreliable_heads": int(sum(bool(h.get("unreliable")) for h in heads)),
    }
    if any("v_rank" in layer for layer in layers_report):
        summary["mean_value_rank_ratio"] = round(float(np.mean([layer.get("v_rank", d) for layer in layers_report])) / d, 6)
    if certs:
        summary.update({
            "tv_mean": float(np.mean([c["tv_mean"] for c in certs])),
            "tv_max": float(max(c["tv_max"] for c in certs)),
            "kl_mean": float(np.mean([c["kl_mean"] for c in certs])),
            "tv_bound_mean": float(np.mean([c["tv_bound_mean"] for c in certs])),
            "violations": int(sum(c["violations"] for c in certs)),
            "sink_heads": int(sum(c["sink_fraction"] > 0.5 for c in certs)),
        })
    return {
        "mode": mode,
        "recipe": recipe.to_dict(),
        "source": {"name": lm.name, "source": lm.source, "model_type": adapters.model_type(lm.model),
                   **({"origin": lm.origin} if lm.origin else {})},
        "calibration": {"texts": [t.name for t in text_objs], "sampled": text_objs[0].name == SAMPLED_NAME,
                        "fit_tokens": n_fit, "heldout_tokens": sum(len(w.input_ids) for w in held_windows),
                        "seq_len": seq_len, "serve_len": serve_len},
        "summary": summary,
        "layers": layers_report,
    }
