"""How many bytes a compressed KV cache holds, from a checkpoint's ``lowrank_attn`` config (``surgery.plans_config``),
exactly as ``runtime.kcache`` stores them — tested equal to the bytes measured from a live cache. Floats are counted
at 2 bytes (what a bf16 cache holds), packed codes at their size.
"""

from __future__ import annotations

from collections.abc import Sequence

from .runtime.modes import layer_sink, layer_window, per_layer
from .runtime.values import value_group

DENSE_BYTES = 2  # a bf16 dense K cache: 2 bytes per value


def _growing(lowrank: dict, slidings: Sequence[int | None]) -> list[int]:
    """The layers that keep every token (no sliding window)."""
    return [i for i in range(len(lowrank["ranks"])) if not (i < len(slidings) and slidings[i])]


def key_bytes_per_token(lowrank: dict, num_kv_heads: int, head_dim: int, value_bytes: int = 2,
                        slidings: Sequence[int | None] = ()) -> tuple[float, int]:
    """(bytes per token of the compressed K cache beyond its exact window and sinks, fixed bytes of the exact
    window — its keys exact and projected — and sinks), summed over the layers that keep every token
    (``slidings``: a sliding-window layer's bytes stop growing at its window), from the stored shapes: r_max
    projected dims per KV head (padded), ``value_bytes`` each, or k_bits/8 plus a min and a step per channel per
    group when quantised."""
    per_token, exact = 0.0, 0
    for layer in _growing(lowrank, slidings):
        dims = num_kv_heads * max(lowrank["ranks"][layer])
        if lowrank.get("k_bits"):
            per_token += dims * (lowrank["k_bits"] / 8 + 2 * value_bytes / lowrank["k_group"])
        else:
            per_token += dims * value_bytes
        window = layer_window(lowrank, layer)  # held twice: exact (head_dim) and projected, not yet quantised
        exact += (window + layer_sink(lowrank, layer)) * num_kv_heads * head_dim + window * dims
    return per_token, exact * value_bytes


def value_bytes_per_token(lowrank: dict, num_kv_heads: int, head_dim: int, value_bytes: int = 2,
                          slidings: Sequence[int | None] = ()) -> tuple[float, int]:
    """As ``key_bytes_per_token`` for the V cache: r_v values per KV head and layer (head_dim where values are not
    projected), ``value_bytes`` each, or v_bits/8 plus a min and a step per token per channel group when quantised
    (the last v_window values stay unquantised: the fixed part)."""
    per_token, fixed = 0.0, 0
    for layer in _growing(lowrank, slidings):
        r = per_layer(lowrank.get("v_ranks"), layer) or head_dim
        if lowrank.get("v_bits"):
            group = value_group(r, lowrank.get("v_group", 32))
            per_token += num_kv_heads * r * (lowrank["v_bits"] / 8 + 2 * value_bytes / group)
            fixed += int(per_layer(lowrank.get("v_window", 0), layer)) * num_kv_heads * r * value_bytes
        else:
            per_token += num_kv_heads * r * value_bytes
    return per_token, fixed


def kv_bytes(lowrank: dict, num_kv_heads: int, head_dim: int, tokens: int, float_bytes: int = 2,
             slidings: Sequence[int | None] = ()) -> dict[str, int]:
    """Bytes the K and V caches hold after one prefill of ``tokens`` tokens, from the stored shapes exactly as the
    runtime stores them (``runtime.kcache``): projected keys (quantised in whole groups older than the exact
    window), the exact window and sinks, values (quantised per token older than v_window). ``slidings``: per layer
    its sliding window W or None (``HeadLayout.sliding_windows``): such a layer keeps the last W - 1 positions
    (quantised keys leave in whole groups, their values with them) and no sinks, as a dense sliding layer keeps
    W - 1. {"k", "v", "dense"}: dense = one of K or V of a bf16 dense cache."""
    fb, k, v, dense_tokens = float_bytes, 0, 0, 0
    for layer, ranks in enumerate(lowrank["ranks"]):
        sliding = slidings[layer] if layer < len(slidings) else None
        r = num_kv_heads * max(ranks)
        window = layer_window(lowrank, layer)
        if lowrank.get("k_bits"):
            g = lowrank["k_group"]
            nq = max(0, (tokens - window) // g * g)
            dropped = min(tokens - sliding + 1, nq) // g * g if sliding and tokens >= sliding else 0
            kept_q = nq - dropped
            k += kept_q * r * lowrank["k_bits"] // 8 + (kept_q // g) * r * 2 * fb + (tokens - nq) * r * fb
        else:
            dropped = tokens - sliding + 1 if sliding and tokens >= sliding else 0
            k += (tokens - dropped) * r * fb
        sink = 0 if sliding else min(layer_sink(lowrank, layer), tokens)
        k += (min(window, tokens) + sink) * num_kv_heads * head_dim * fb
        kept = tokens - dropped  # values leave with their keys
        rv = num_kv_heads * (per_layer(lowrank.get("v_ranks"), layer) or head_dim)
        if lowrank.get("v_bits"):
            nq = max(0, kept - int(per_layer(lowrank.get("v_window", 0), layer)))
            group = value_group(rv // num_kv_heads, lowrank.get("v_group", 32))
            v += nq * rv * lowrank["v_bits"] // 8 + nq * (rv // group) * 2 * fb + (kept - nq) * rv * fb
        else:
            v += kept * rv * fb
        dense_tokens += min(tokens, sliding - 1) if sliding else tokens
    return {"k": k, "v": v, "dense": num_kv_heads * head_dim * DENSE_BYTES * dense_tokens}


def kv_fraction(lowrank: dict, num_kv_heads: int, head_dim: int, tokens: int,
                slidings: Sequence[int | None] = ()) -> dict[str, float]:
    """``kv_bytes`` as fractions of the bf16 dense cache: {"k", "v", "total"}."""
    b = kv_bytes(lowrank, num_kv_heads, head_dim, tokens, slidings=slidings)
    return {"k": b["k"] / b["dense"], "v": b["v"] / b["dense"], "total": (b["k"] + b["v"]) / (2 * b["dense"])}
