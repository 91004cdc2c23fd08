"""How many bytes a compressed KV cache holds, from a checkpoint's ``lowrank_attn`` config (``surgery.plans_config``),
exactly as ``runtime.kcache`` stores them — tested equal to the bytes measured from a live cache. Floats are counted
at 2 bytes (what a bf16 cache holds), packed codes at their size.
"""

from __future__ import annotations

from .runtime.modes import layer_sink, layer_window, per_layer
from .runtime.values import value_group

DENSE_BYTES = 2  # a bf16 dense K cache: 2 bytes per value


def key_bytes_per_token(lowrank: dict, num_kv_heads: int, head_dim: int, value_bytes: int = 2) -> tuple[float, int]:
    """(bytes per token of the compressed K cache beyond its exact window and sinks, fixed bytes of the exact
    window + sinks), summed over layers, from the stored shapes: r_max projected dims per KV head (padded),
    ``value_bytes`` each, or k_bits/8 plus a min and a step per channel per group when quantised."""
    per_token = 0.0
    for ranks in lowrank["ranks"]:
        dims = num_kv_heads * max(ranks)
        if lowrank.get("k_bits"):
            per_token += dims * (lowrank["k_bits"] / 8 + 2 * value_bytes / lowrank["k_group"])
        else:
            per_token += dims * value_bytes
    n_layers = len(lowrank["ranks"])
    exact = sum(layer_window(lowrank, i) + layer_sink(lowrank, i) for i in range(n_layers)) * num_kv_heads * head_dim
    return per_token, exact * value_bytes


def value_bytes_per_token(lowrank: dict, num_kv_heads: int, head_dim: int, value_bytes: int = 2) -> tuple[float, int]:
    """As ``key_bytes_per_token`` for the V cache: r_v values per KV head and layer (head_dim where values are not
    projected), ``value_bytes`` each, or v_bits/8 plus a min and a step per token per channel group when quantised
    (the last v_window values stay unquantised: the fixed part)."""
    per_token, fixed = 0.0, 0
    for layer in range(len(lowrank["ranks"])):
        r = per_layer(lowrank.get("v_ranks"), layer) or head_dim
        if lowrank.get("v_bits"):
            group = value_group(r, lowrank.get("v_group", 32))
            per_token += num_kv_heads * r * (lowrank["v_bits"] / 8 + 2 * value_bytes / group)
            fixed += int(per_layer(lowrank.get("v_window", 0), layer)) * num_kv_heads * r * value_bytes
        else:
            per_token += num_kv_heads * r * value_bytes
    return per_token, fixed


def kv_bytes(lowrank: dict, num_kv_heads: int, head_dim: int, tokens: int, float_bytes: int = 2) -> dict[str, int]:
    """Bytes the K and V caches hold after ``tokens`` tokens, from the stored shapes exactly as the runtime stores
    them (``runtime.kcache``): projected keys (quantised in whole groups older than the exact window), the exact
    window and sinks, values (quantised per token older than v_window); every layer holding every token (a
    sliding-window layer holds less). {"k", "v", "dense"}: dense = one of K or V of a bf16 dense cache."""
    fb, k, v = float_bytes, 0, 0
    for layer, ranks in enumerate(lowrank["ranks"]):
        r = num_kv_heads * max(ranks)
        window = layer_window(lowrank, layer)
        if lowrank.get("k_bits"):
            g = lowrank["k_group"]
            nq = max(0, (tokens - window) // g * g)
            k += nq * r * lowrank["k_bits"] // 8 + (nq // g) * r * 2 * fb + (tokens - nq) * r * fb
        else:
            k += tokens * r * fb
        k += (min(window, tokens) + min(layer_sink(lowrank, layer), tokens)) * num_kv_heads * head_dim * fb
        rv = num_kv_heads * (per_layer(lowrank.get("v_ranks"), layer) or head_dim)
        if lowrank.get("v_bits"):
            nq = max(0, tokens - int(per_layer(lowrank.get("v_window", 0), layer)))
            group = value_group(rv // num_kv_heads, lowrank.get("v_group", 32))
            v += nq * rv * lowrank["v_bits"] // 8 + nq * (rv // group) * 2 * fb + (tokens - nq) * rv * fb
        else:
            v += tokens * rv * fb
    return {"k": k, "v": v, "dense": len(lowrank["ranks"]) * num_kv_heads * head_dim * DENSE_BYTES * tokens}


def kv_fraction(lowrank: dict, num_kv_heads: int, head_dim: int, tokens: int) -> dict[str, float]:
    """``kv_bytes`` as fractions of the bf16 dense cache: {"k", "v", "total"}."""
    b = kv_bytes(lowrank, num_kv_heads, head_dim, tokens)
    return {"k": b["k"] / b["dense"], "v": b["v"] / b["dense"], "total": (b["k"] + b["v"]) / (2 * b["dense"])}
