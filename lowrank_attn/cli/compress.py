"""``lowrank-attn compress``: a recipe from YAML and flags → ``compression.compress`` → a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import typer

from .app import (
    DEVICE_MAP_HELP, MAX_MEMORY_HELP, MODEL_HELP, OFFLOAD_HELP, SAVE_DTYPE_DEFAULT, TEXT_HELP, RegistryHelp, app,
    run_command,
)


@app.command(cls=RegistryHelp)
def compress(
    model: Optional[str] = typer.Argument(None, show_default="the recipe's model, else smollm2-135m", help=MODEL_HELP + " Default: the recipe's model."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write (refused if it exists)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", show_default='none: built-in defaults (lowrank_attn/recipe.py)', help="Recipe YAML (see recipes/); flags override it."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", show_default='builtin:gutenberg', help=TEXT_HELP),
    mode: Optional[str] = typer.Option(None, show_default='auto, i.e. post-rope', help="<modes>"),
    policy: Optional[str] = typer.Option(None, show_default='budget', help="Rank allocation: <policies>"),
    rank_ratio: Optional[float] = typer.Option(None, show_default='0.75', help="Mean kept rank / head_dim (budget, uniform)."),
    tau: Optional[float] = typer.Option(None, show_default='0.9', help="Energy kept per head (energy policy)."),
    epsilon: Optional[float] = typer.Option(None, show_default='0.05', help="Max certificate, mean attention-TV bound (bound policy)."),
    max_kl: Optional[float] = typer.Option(None, show_default='none: not the fidelity policy', help="Max next-token KL to the dense model on the held-out tokens: "
                                           "the fewest K+V cache bytes meeting it (fidelity policy; implies it) while copying long-range (not 10+ points under dense)."),
    max_kv_fraction: Optional[float] = typer.Option(None, show_default='none: not the fidelity policy', help="Max total "
                                                    "K+V bytes as a share of a bf16 cache at the serving length (0.2: a fifth): the lowest next-token KL within it "
                                                    "among key budgets and --v-bits widths that copy long-range (try --v-bits 3,4 --k-group 64 --v-group 64; "
                                                    "add 2 where no 3/4-bit point copies, as on Gemma-3)."),
    weighting: Optional[str] = typer.Option(None, show_default='attention', help="none | attention"),
    exact_window: Optional[int] = typer.Option(None, show_default='auto: 256·k_bits/16 in post-rope (64 at the default 4 bits, 256 with --k-bits 16), at most seq_len/8; 0 in folded modes', help="Most recent keys kept exact in the K cache; sliding-window layers keep at most 1/8 of their window."),
    exact_sink: Optional[int] = typer.Option(None, show_default='auto: 1 in post-rope, 0 in folded modes', help="First keys kept exact in the K cache (attention sinks)."),
    k_bits: Optional[int] = typer.Option(None, show_default='4', help="Quantise projected keys: 2, 3, 4 or 8 bits; 16 = not quantised."),
    k_group: Optional[int] = typer.Option(None, show_default="32", help="Tokens per key quantisation group (a scale and zero-point per channel each): a multiple of 8; 64 halves their bytes."),
    k_clip: Optional[str] = typer.Option(None, show_default="minmax", help="Each key quantisation group's range: "
                                         "minmax (KIVI's) or mse (min/max shrunk to the least squared error, same bytes)."),
    v_rank_ratio: Optional[float] = typer.Option(None, show_default="the recipe's, 1.0: values not projected",
                                                 help="Mean kept value rank / head_dim: a closed-form map per KV head "
                                                 "keeping what o_proj sees; the V cache stores that many values per token."),
    v_bits: Optional[str] = typer.Option(None, show_default="4",
                                         help="Quantise cached values KIVI-style (per token, channel groups): 2, 3, 4 or 8 "
                                         "bits; 16 = not quantised; a list (3,4): the fidelity policy picks the width "
                                         "with the fewest total K+V bytes within --max-kl, other policies the widest."),
    v_group: Optional[int] = typer.Option(None, show_default="32", help="Channels per value quantisation group (a scale and zero-point per token each): 8, 16, 32, 64 or 128."),
    v_window: Optional[int] = typer.Option(None, show_default="auto: 256·v_bits/16 (4 bits: 64), at most seq_len/8",
                                           help="Most recent values kept unquantised (with --v-bits)."),
    v_rotation: Optional[str] = typer.Option(None, show_default="output", help="The basis quantised values are cached "
                                             "in (folded into two small maps per layer): <v-rotations>."),
    v_clip: Optional[str] = typer.Option(None, show_default="minmax", help="Each value quantisation group's range: "
                                         "minmax or mse (as --k-clip)."),
    seq_len: Optional[int] = typer.Option(None, show_default="auto: 2048 or the model's maximum", help="Calibration window length."),
    serve_len: Optional[int] = typer.Option(None, show_default="auto: the model's maximum positions", help="Longest context the checkpoint will serve: calibration windows "
                                            "are spread over positions [0, serve_len) so the maps hold for a long "
                                            "cache."),
    max_tokens: Optional[int] = typer.Option(None, show_default='32768', help="Calibration tokens."),
    heldout_tokens: Optional[int] = typer.Option(None, show_default='4096', help="Held-out tokens for the certificate and the output signal."),
    device: Optional[str] = typer.Option(None, show_default='cpu', help="cpu, cuda, …"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    dtype: Optional[str] = typer.Option(None, show_default="float32", help="bfloat16 | float16 | float32: the model "
                                        "is loaded and calibrated in it (statistics stay float64, the maps float32)."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", show_default=SAVE_DTYPE_DEFAULT,
                                             help="bfloat16 | float16 | float32: dtype of the saved weights (the maps "
                                             "stay float32); float32 roughly doubles the checkpoint."),
    device_map: Optional[str] = typer.Option(None, "--device-map", show_default='none: --device', help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", show_default='none: no cap', help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", show_default='none: no offloading', help=OFFLOAD_HELP),
    delta: bool = typer.Option(False, help="Save only what compression adds or changes (maps, folded q/k rows) "
                               "and the base model's identity: load_compressed(DIR) adds the base back."),
):
    """Calibrate, fit per-head low-rank query/key maps, certify them, and write a compressed checkpoint."""

    opts = SimpleNamespace(**locals())
    run_command(lambda: _compress(opts))


def _recipe(a: SimpleNamespace):
    """The recipe: --recipe (or the defaults) with the flags given; --max-kl sets the fidelity policy."""
    from ..recipe import Recipe

    for field, value in (("dtype", a.dtype), ("save_dtype", a.save_dtype)):
        if value is not None:
            from ..checkpoint import dtype_name

            dtype_name(value, field)  # refuse a bad --dtype/--save-dtype before calibrating
    r = Recipe.from_yaml(a.recipe) if a.recipe else Recipe()
    if a.max_kl is not None or a.max_kv_fraction is not None:  # a target flag replaces the recipe's target
        r = dataclasses.replace(r, max_kl=None, max_kv_fraction=None)
    pol = a.policy
    for name, value in (("max_kl", a.max_kl), ("max_kv_fraction", a.max_kv_fraction)):
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if a.policy not in (None, "fidelity"):
            from ..errors import RecipeError

            raise RecipeError(f"{name}: {flag} sets the fidelity policy; it cannot be combined with --policy {a.policy}")
        pol = "fidelity"
    return r.replace(model=a.model, text=list(a.text) if a.text else None, mode=a.mode, policy=pol,
                     rank_ratio=a.rank_ratio, tau=a.tau, epsilon=a.epsilon, max_kl=a.max_kl,
                     max_kv_fraction=a.max_kv_fraction, weighting=a.weighting,
                     exact_window=a.exact_window, exact_sink=a.exact_sink, k_bits=a.k_bits, k_group=a.k_group, k_clip=a.k_clip, v_rank_ratio=a.v_rank_ratio,
                     v_bits=_widths(a.v_bits), v_group=a.v_group, v_window=a.v_window, v_rotation=a.v_rotation, v_clip=a.v_clip, seq_len=a.seq_len,
                     serve_len=a.serve_len, max_tokens=a.max_tokens, heldout_tokens=a.heldout_tokens, device=a.device, dtype=a.dtype)


def _widths(text: str | None):
    """--v-bits: one width (4) or a comma-separated list (3,4)."""
    if text is None:
        return None
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        from ..errors import RecipeError

        raise RecipeError(f"v_bits: expected a width or a comma-separated list of widths (3,4), got {text!r}") from None
    return widths[0] if len(widths) == 1 else widths


def _compress(a: SimpleNamespace) -> None:
    from .. import compression as compress_mod
    from ..checkpoint import describe_checkpoint, save_compressed
    from ..fsutil import check_writable_target

    check_writable_target(a.out, a.overwrite)
    r = _recipe(a)
    source = r.model
    if a.device_map is not None or a.max_memory or a.offload_folder:  # placed by accelerate as it loads, in the recipe's dtype
        from ..models import load_model

        source = load_model(r.model, dtype=r.dtype, device_map=a.device_map, max_memory=a.max_memory,
                            offload_folder=a.offload_folder)
    lm, report = compress_mod.compress(source, r, progress=True)
    typer.echo(_layer_table(report))
    if "kl" in report.get("allocation", {}):
        al = report["allocation"]
        if al.get("max_kv_fraction") is not None:
            target = (f" (within {al['max_kv_fraction']:g}: the lowest KL of the points that fit and copy)"
                      if al.get("copy_kept", True) else f" (within {al['max_kv_fraction']:g}: no point that fits "
                      "keeps long-range copying; the one that copies best)")
            kl = f"{al['kl']:.4g}"
        else:
            target = ""
            missed = "" if al.get("max_kl_met", True) else " (no point meets it and copies: full key rank, widest values)"
            kl = f"{al['kl']:.4g} {'<=' if al['kl'] <= al['max_kl'] else '>'} {al['max_kl']:g}{missed}"
        typer.echo(f"fidelity: key budget {al['rank_ratio']:.3f}·d_h (mean rank {al['mean_rank_ratio']:.3f}), values "
                   f"{al.get('v_bits') or 16}-bit, K+V cache {al['kv_bytes_fraction']:.1%} of bf16 at "
                   f"{al['kv_bytes_at']} tokens{target}; next-token KL vs dense {kl} on "
                   f"{al['heldout_tokens']} held-out tokens ({len(al['probes'])} points measured); held-out ppl "
                   f"{al['heldout_ppl_dense']:.3f} -> {al['heldout_ppl']:.3f} ({al['heldout_ppl_change']:+.2%})")
    if report["calibration"]["sampled"]:
        typer.echo("note: calibrated on text sampled from the model itself; pass --text with real text for better fits")
    save_compressed(lm, report, a.out, overwrite=a.overwrite, dtype=a.save_dtype, delta=a.delta)
    typer.echo(describe_checkpoint(a.out))


def _layer_table(report: dict) -> str:
    lines = ["layer | ranks per KV head | retained E~ energy | held-out attention TV per row / its bound | sinks",
             "---|---|---|---|---"]
    for layer in report["layers"]:
        heads = layer["kv_heads"]
        ranks = " ".join(str(h["rank"]) for h in heads)
        energy = " ".join(f"{h['retained_energy']:.3f}" for h in heads)
        certs = [h.get("certificate") for h in heads]
        if all(certs):
            tv = max(c["tv_mean"] for c in certs)
            bound = max(c["tv_bound_mean"] for c in certs)
            sinks = sum(c["sink_fraction"] > 0.5 for c in certs)
            cert = f"{tv:.4f} / {bound:.4f}"
        else:
            cert, sinks = "n/a", "-"
        lines.append(f"{layer['layer']} | {ranks} | {energy} | {cert} | {sinks}")
    s = report["summary"]
    if "v_rank" in report["layers"][0]:
        lines.append("value rank per layer: " + " ".join(str(layer["v_rank"]) for layer in report["layers"])
                     + (f"; values quantised to {report['recipe']['v_bits']} bits" if report["recipe"].get("v_bits") else ""))
    if "kv_bytes_vs_bf16" in s:
        lines.append("KV cache vs a bf16 dense cache (K+V; K, V): " + "; ".join(
            f"{n} tokens {f['total']:.1%} ({f['k']:.1%}, {f['v']:.1%})" for n, f in s["kv_bytes_vs_bf16"].items()))
    if "long_range_copy" in s:
        lines.append(copy_line(s["long_range_copy"]))
    lines.append("")
    lines.append(f"mode {report['mode']}; mean rank {s['mean_rank_ratio']:.3f}·d_h (padded {s['padded_rank_ratio']:.3f}); "
                 + (f"held-out attention TV per row {s['tv_mean']:.4f}, certificate (mean TV bound) "
                    f"{s['tv_bound_mean']:.4f}, bound violations {s['violations']}; held-out attention KL per row "
                    f"(certificate) {s['kl_mean']:.4g}" if "tv_mean" in s else "no held-out certificate"))
    cal = report.get("calibration", {})
    if cal.get("serve_len"):
        lines.append(f"calibrated on {cal['fit_tokens']} tokens in {cal['seq_len']}-token windows spread over positions "
                     f"[0, {cal['serve_len']}) (serve_len)")
    flagged = [f"{layer['layer']}.{h['kv_head']}" for layer in report["layers"] for h in layer["kv_heads"]
               if h.get("unreliable")]
    if flagged:
        total = sum(len(layer["kv_heads"]) for layer in report["layers"])
        lines.append(f"note: {len(flagged)} KV head(s) flagged unreliable (layer.head {' '.join(flagged[:12])}"
                     f"{' …' if len(flagged) > 12 else ''}), {len(flagged)} of {total}: their fit or certificate says "
                     "little beyond the calibration text (reasons: unreliable_reasons in lowrank_attn.json). The "
                     "checkpoint works; to trust it on other text, calibrate on more or more varied text from the "
                     "domain you serve (--text, --max-tokens) and check with `lowrank-attn eval DIR --dense MODEL`.")
    return "\n".join(lines)


def copy_line(c: dict) -> str:
    """The compress summary's long-range copy line (``cachepath.copy_check``), with a warning line when the copy
    is lost (``cachepath.copy_lost``)."""
    from ..cachepath import copy_lost

    line = (f"long-range copy (a held-out passage of {c['tokens']} tokens repeated, the repeat read through the "
            f"cache): top-1 {c['accuracy']:.1%} (dense {c['dense_accuracy']:.1%}), next-token KL {c['kl']:.3g}")
    if copy_lost(c["accuracy"], c["dense_accuracy"]):
        line += ("\nwarning: the compressed cache loses long-range copying, so retrieval over long contexts (RULER's "
                 "needles) is likely lost: keep more key rank (a larger --max-kv-fraction or --rank-ratio, --v-bits 2)")
    return line
