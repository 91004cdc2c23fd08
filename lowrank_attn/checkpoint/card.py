"""The model card (README.md) every checkpoint carries: method, mode, ranks, measured fidelity, K and V cache
bytes against a bf16 dense cache, and how to load it (both routes)."""

from __future__ import annotations


from ..kvbytes import DENSE_BYTES, key_bytes_per_token, kv_fraction, value_bytes_per_token  # noqa: F401 (re-exported)
from ..runtime.modes import mode_of
from ..runtime.surgery import serving_prefill
from ..vrotation import ROTATIONS


def _per_layer_text(low: dict, field: str) -> str:
    """A config field that is one int for every layer, or one per layer (``window``, ``sink``)."""
    value = low.get(field, 0)
    return "/".join(map(str, value)) + " per layer" if isinstance(value, list) else str(value)


def _growing_text(n_growing: int, n_layers: int, slidings) -> str:
    """Which layers the per-token bytes cover: all, or those without a sliding window (which stop growing)."""
    if n_growing == n_layers:
        return f"all {n_layers} layers"
    windows = sorted({w for w in slidings if w})
    return (f"the {n_growing} of {n_layers} layers that keep every token (the others keep their last "
            f"{'/'.join(str(w - 1) for w in windows)} tokens)")


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def base_model_text(src: dict) -> str:
    """``SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct), dequantised from a Q4_1 GGUF …``: the model
    a checkpoint was made from and how its weights reached lowrank-attn."""
    origin = src.get("origin") or {}
    name = src.get("name", "?")
    text = origin.get("base_model", name)
    if origin.get("gguf"):
        quant = origin.get("quantization")
        text += (f", dequantised from a {quant + ' ' if quant else ''}GGUF ({origin['gguf']}"
                 f"{', PyPI ' + origin['package'] if origin.get('package') else ''}), published in "
                 f"{origin.get('dtype', '?')}")
    elif origin.get("dtype"):
        text += f", published in {origin['dtype']}"
    return text + f" — `{name}`, {src.get('model_type', '?')}"


_CLIP_TEXT = {"minmax": "each group's min and max (KIVI)",
              "mse": "each group's min/max shrunk to the least squared error (same bytes)"}


def _ranges_text(low: dict) -> str:
    """How each quantised side picks a group's range (``k_clip``/``v_clip``; absent in older configs: min/max)."""
    sides = [f"{side}: {_CLIP_TEXT[low.get(clip, 'minmax')]}" for side, bits, clip in
             (("keys", "k_bits", "k_clip"), ("values", "v_bits", "v_clip")) if low.get(bits)]
    return "; ".join(sides) or "nothing quantised"


def _values_text(low: dict, head_dim: int) -> str:
    ranks = low.get("v_ranks")
    per_layer = [r or head_dim for r in ranks] if isinstance(ranks, list) else [ranks or head_dim]
    rank = "not projected" if all(r == head_dim for r in per_layer) else (
        f"rank {'/'.join(map(str, per_layer))} per layer" if isinstance(ranks, list) else f"rank {ranks}")
    rotation = low.get("v_rotation", "none")
    if not low.get("v_bits"):
        return rank + ", not quantised"
    return (rank + f", {low['v_bits']} bits per token in groups of {low.get('v_group', 32)} channels, last "
            f"{low.get('v_window')} unquantised"
            + (f"; quantised after a rotation ({rotation}: {ROTATIONS[rotation].doc})" if rotation != "none" else ""))


def quality_lines(side: dict) -> list[str]:
    """The card's quality section: what the compression report measured on held-out text (tokens of the
    calibration text not used for the fit)."""
    summ, alloc, cal = side.get("summary") or {}, side.get("allocation") or {}, side.get("calibration") or {}
    if "tv_mean" not in summ and "kl" not in alloc:
        return []
    texts = ", ".join(cal.get("texts") or []) or "?"
    lines = ["", "## Quality on held-out text (from the compression report)", "",
             f"Measured on {cal.get('heldout_tokens', '?')} held-out tokens of the calibration text ({texts}), "
             "not used for the fit:", ""]
    if "kl" in alloc:
        by_bytes = alloc.get("max_kv_fraction") is not None  # the fidelity policy's byte target, else max_kl
        if by_bytes:
            target = f"the lowest measured within {alloc['max_kv_fraction']:g} of the bf16 K+V cache"
            if "copy_kept" in alloc:  # the fidelity policy's long-range copy check
                target += (" that keeps long-range copying" if alloc["copy_kept"] else
                           "; none that fits keeps long-range copying: the one that copies best")
        else:
            missed = "" if alloc.get("max_kl_met", True) else ", not met: no measured point reached it and kept copying"
            target = f"target {alloc.get('max_kl', float('nan')):g}{missed}"
        lines.append(f"* next-token KL vs dense {alloc['kl']:.4g} ({target}); "
                     f"held-out token perplexity {alloc['heldout_ppl_dense']:.3f} dense -> {alloc['heldout_ppl']:.3f} "
                     f"compressed ({alloc['heldout_ppl_change']:+.2%})")
        if alloc.get("probes"):
            chosen = "the lowest KL within the bytes" if by_bytes else "the fewest K+V cache bytes within the target"
            lines.append(f"* chosen by the fidelity policy: {chosen} among "
                         f"{len(alloc['probes'])} measured points (key budget, value width; lowrank_attn.json, "
                         "allocation.probes)")
    if "long_range_copy" in summ:
        c = summ["long_range_copy"]
        lines.append(f"* long-range copy (a held-out passage of {c['tokens']} tokens repeated, the repeat read through "
                     f"the cache): top-1 {c['accuracy']:.1%} compressed, {c['dense_accuracy']:.1%} dense; next-token KL "
                     f"{c['kl']:.3g}. Retrieval over long contexts (RULER's needles) needs this; held-out perplexity "
                     "barely sees it")
    if "tv_mean" in summ:
        lines += [f"* held-out attention KL per row (certificate) {summ['kl_mean']:.4g}: KL(dense ‖ compressed) of each "
                  "attention row, mean over rows and heads",
                  f"* held-out attention TV per row (certificate) {summ['tv_mean']:.4f} (max {summ['tv_max']:.4f}); "
                  f"its guaranteed bound (mean TV bound) {summ['tv_bound_mean']:.4f}, bound violations "
                  f"{summ['violations']}",
                  f"* heads flagged unreliable: {summ.get('unreliable_heads', 0)} (their fit or certificate says "
                  "little beyond the calibration text; see unreliable_reasons in lowrank_attn.json)"]
    lines += ["", "`lowrank-attn eval DIR --dense BASE` measures perplexity on other text."]
    return lines


def model_card(side: dict, layout, *, files: dict[str, int], out_name: str = "DIR") -> str:
    """The card's text; nothing run-specific (the same checkpoint gives the same bytes under any name)."""
    low, summ = side["lowrank"], side.get("summary") or {}
    src = side.get("source") or {}
    base = side.get("base") or {}
    ranks = low["ranks"]
    d, hkv, n_layers = layout.head_dim, layout.num_kv_heads, layout.num_layers
    slidings = layout.sliding_windows
    per_tok, fixed = key_bytes_per_token(low, hkv, d, slidings=slidings)
    n_growing = sum(1 for i in range(n_layers) if not (i < len(slidings) and slidings[i]))
    dense = n_growing * hkv * d * DENSE_BYTES
    lines = [
        f"# {src.get('name', 'model')} with low-rank attention (lowrank-attn)", "",
        "Per-head low-rank query/key maps and a low-rank K cache, fitted by lowrank-attn "
        f"{side.get('lowrank_attn_version', '')}: queries and keys are projected to r dims per KV head "
        "(closed-form fit on calibration statistics, certified on held-out tokens); the K cache stores the "
        "projected keys.", "",
        "| | |", "|---|---|",
        f"| base model | {base_model_text(src)} |",
        f"| mode | {low['mode']} |",
        f"| ranks | mean {summ.get('mean_rank_ratio', float('nan')):.3f}·d_h (d_h = {d}), "
        f"min {min(min(r) for r in ranks)}, max {max(max(r) for r in ranks)}, padded per layer "
        f"{'/'.join(str(max(r)) for r in ranks)} |",
        f"| exact keys | last {_per_layer_text(low, 'window')} (window), first {_per_layer_text(low, 'sink')} (sinks) |",
        f"| key quantisation | {str(low['k_bits']) + ' bits, groups of ' + str(low['k_group']) if low.get('k_bits') else 'none'} |",
        f"| values | {_values_text(low, d)} |",
        f"| quantisation ranges | {_ranges_text(low)} |",
        f"| weights dtype | {side.get('dtype')} (maps float32) |",
        f"| checkpoint | {'delta (only what compression changed; needs its base)' if side.get('delta') else 'full'}, "
        f"{_fmt_size(sum(files.values()))} |",
    ]
    lines += quality_lines(side)
    v_tok, v_fixed = value_bytes_per_token(low, hkv, d, slidings=slidings)
    at = {n: kv_fraction(low, hkv, d, n, layout.sliding_windows) for n in (2048, 8192, 32768)}
    lines += ["", "## KV cache", "",
              "Total K+V bytes vs a bf16 dense cache, from the stored shapes (padded ranks, codes, scales, exact "
              "windows and sinks): " + "; ".join(f"{n} tokens **{f['total']:.1%}** (K {f['k']:.1%}, V {f['v']:.1%})"
                                                   for n, f in at.items()) + ".", "",
              f"Per token beyond the exact windows, over {_growing_text(n_growing, n_layers, slidings)}, at 2 bytes "
              f"per stored float: keys {per_tok:.0f} bytes and values {v_tok:.0f} bytes vs {dense} bytes each for a "
              f"bf16 dense cache; plus {fixed} bytes fixed for the exact keys and {v_fixed} for the unquantised recent "
              "values. `lowrank_attn.runtime.kcache.kv_cache_bytes(cache)` measures a live cache."]
    lines += ["", "## Load", ""] + _load_lines(side, base, out_name)
    lines += ["", "`generate()`: greedy, sampling, beam search, `num_return_sequences` and left-padded batches "
              "are supported; static, offloaded and quantised caches and assisted decoding are refused.", "",
              _prefill_text(low, remote=not side.get("delta")), ""]
    return "\n".join(lines)


def _prefill_text(low: dict, remote: bool) -> str:
    """How prompts attend (``set_prefill``), with the remote-code route where the checkpoint loads that way."""
    if serving_prefill(mode_of(low["mode"])) != "exact":
        return "A prompt attends over what the cache stores (the compression measured above)."
    route = (" — or, through `trust_remote_code`, setting `lowrank_prefill = \"compressed\"` on every module that "
             "has a `lowrank_plan` —" if remote else "")
    return ("A prompt attends its own tokens densely and is stored compressed, as transformers' `QuantizedCache` "
            "runs: every later token reads what the cache stores. `lowrank_attn.set_prefill(model, \"compressed\")`"
            f"{route} makes prompts attend over what the cache stores too (how the fidelity above is measured).")


def _load_lines(side: dict, base: dict, out_name: str) -> list[str]:
    """The card's "Load" section: a delta onto its base, or a full checkpoint (lowrank-attn or transformers)."""
    if side.get("delta"):
        return ["```python", "from lowrank_attn import load_compressed",
                f"lm = load_compressed({out_name!r})  # adds its base {base.get('name')!r}; refuses any other base",
                f"lm = load_compressed({out_name!r}, base={base.get('name')!r})", "```", "",
                f"Base identity: q/k fingerprint {base.get('qk_fingerprint')}, weights sha256 "
                f"{base.get('weights_sha256')}."]
    return ["```python", "from lowrank_attn import load_compressed",
            f"lm = load_compressed({out_name!r})  # verifies hashes, shapes, finiteness; runs no code from the directory",
            "model, tok = lm.model, lm.tokenizer",
            "", "from transformers import AutoModelForCausalLM, AutoTokenizer  # no lowrank-attn needed: runs the bundled runtime",
            f"model = AutoModelForCausalLM.from_pretrained({out_name!r}, trust_remote_code=True)",
            f"tok = AutoTokenizer.from_pretrained({out_name!r}, trust_remote_code=False)  # a stock tokenizer: no code runs",
            "```", "",
            "Without `trust_remote_code=True` transformers refuses the `lowrank_attn` model type (it never "
            "loads the dense model in its place). The tokenizer files are the base model's, stock: "
            "`trust_remote_code=False` only stops transformers 5 from asking whether to run this directory's "
            "code, which it does because `AutoTokenizer` reads config.json (model type `lowrank_attn`) to pick "
            f"a tokenizer class; `PreTrainedTokenizerFast.from_pretrained({out_name!r})` loads it too."]
