"""The ``lowrank-attn`` command line: a thin layer over the Python API.

Errors of type ``LowrankAttnError`` print one line and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from .errors import LowrankAttnError

app = typer.Typer(
    add_completion=False,
    context_settings={"show_default": True},  # every option's default in --help; None defaults say what auto means
    no_args_is_help=True,
    help="Measure the low-rank structure of attention on real text and compress query/key maps and the K cache.",
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug


def _run(fn, *, interrupted: str = "interrupted; nothing was written"):
    """Run a command body: its errors print one line and exit 2, Ctrl-C prints ``interrupted`` and exits 130.
    Command bodies do their (slow) imports inside ``fn`` so that an early Ctrl-C is handled the same way."""
    try:
        return fn()
    except LowrankAttnError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        typer.echo(interrupted, err=True)
        raise typer.Exit(130)


def _registry_names() -> dict[str, str]:
    """What help texts list from the registries: modes (``runtime.modes.MODES``), allocation policies
    (``policies.POLICIES``) and sweep methods (``sweep``: ours, the baselines of ``fits.FITS``, …)."""
    from .policies import POLICIES
    from .runtime.modes import MODES
    from .sweep import BOUND, METHODS, QUANT_ONLY

    return {"<modes>": " | ".join(["auto", *MODES]), "<policies>": " | ".join(POLICIES),
            "<methods>": ", ".join(["dense", *METHODS]), "<bound>": ", ".join(BOUND), "<quant>": ", ".join(QUANT_ONLY)}


class _RegistryHelp(TyperCommand):
    """A command whose help reads its lists (``<modes>``, ``<policies>``, ``<methods>`` …) from the registries when
    the help is shown: importing them at start-up would cost every command the torch import."""

    def format_help(self, ctx, formatter):
        names = _registry_names()
        for param in self.params:
            text = getattr(param, "help", None)
            if text and "<" in text:
                for key, value in names.items():
                    text = text.replace(key, value)
                param.help = text
        return super().format_help(ctx, formatter)


MODEL_HELP = ("Short name (smollm2-135m, qwen2.5-0.5b, gemma3-270m, tiny-llama, tiny-gpt2, …), "
              "a local HF model directory, a .gguf file, or a hub id (online only).")
DTYPE_HELP = "Weights dtype, loaded directly: float32, bfloat16 or float16 (statistics stay float64)."
DEVICE_MAP_HELP = ("Place the model with accelerate as it loads (auto, cpu, …), for models larger than one device "
                   "or host RAM; overrides --device.")
MAX_MEMORY_HELP = ("With --device-map: the most each device may hold, e.g. cpu=8GiB or 0=20GiB,cpu=30GiB; what does "
                   "not fit is offloaded to --offload-folder and streamed in layer by layer for each forward.")
OFFLOAD_HELP = ("With --device-map: where weights that do not fit (--max-memory) are offloaded, for models bigger than "
                "host RAM. Such a model compresses in post-rope mode and saves a --delta checkpoint.")
SAVE_DTYPE_DEFAULT = ("auto: the dtype the model was published in, its config's: bfloat16 for smollm2-135m, qwen2.5-*, "
                      "gemma3-270m and other GGUFs, float32 for tiny-*; --dtype's when that is bfloat16/float16")
TEXT_HELP = ("Text to calibrate on: files, globs, directories, a JSONL with a 'text' field, hf:NAME[:CONFIG[:SPLIT]], "
             "builtin:gutenberg (public-domain excerpts shipped with the package) or sampled (text sampled from the "
             "model itself: data-free, measured much worse). Repeatable. Default: builtin:gutenberg; text from the "
             "domain you serve is better.")


@app.command()
def analyze(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", show_default='builtin:gutenberg', help=TEXT_HELP),
    out: Path = typer.Option(Path("runs/spectra"), "--out", "-o", help="Directory for spectra.json, summary.csv/md and plots."),
    seq_len: Optional[int] = typer.Option(None, show_default="auto: 1024 or the model's maximum", help="Tokens per window (default: 1024 or the model's maximum)."),
    max_tokens: Optional[int] = typer.Option(None, show_default='none: all of the text', min=1, help="Cap on the total number of tokens, shared across texts (at least one window per text)."),
    device: str = typer.Option("cpu", help="Torch device: cpu, cuda, cuda:1, …"),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    device_map: Optional[str] = typer.Option(None, "--device-map", show_default='none: --device', help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", show_default='none: no cap', help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", show_default='none: no offloading', help=OFFLOAD_HELP),
    batch_size: int = typer.Option(1, min=1, help="Windows per forward pass."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    plots: bool = typer.Option(True, help="Write PNG plots (matplotlib)."),
):
    """Measure the spectra of the row-centred logit field E~ and of W_Q^T W_K for every head."""

    def go():
        from . import analysis as analyze_mod
        from .fsutil import check_writable_target
        from .report import summary_markdown, write_analysis

        check_writable_target(out, overwrite)
        report = analyze_mod.analyze(model, text, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                     batch_size=batch_size, progress=True, dtype=dtype, device_map=device_map,
                                     max_memory=max_memory, offload_folder=offload_folder)
        write_analysis(report, out, overwrite=overwrite, plots=plots)
        typer.echo(summary_markdown(report))
        typer.echo(f"wrote {out}/spectra.json, summary.csv, summary.md" + (", *.png" if plots else ""))

    _run(go)


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


@app.command(cls=_RegistryHelp)
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
                                           "the smallest budget meeting it (implies --policy fidelity)."),
    weighting: Optional[str] = typer.Option(None, show_default='attention', help="none | attention"),
    exact_window: Optional[int] = typer.Option(None, show_default='auto: 256·k_bits/16 in post-rope (64 at the default 4 bits, 256 with --k-bits 16), at most seq_len/8; 0 in folded modes', help="Most recent keys kept exact in the K cache; sliding-window layers keep at most 1/8 of their window."),
    exact_sink: Optional[int] = typer.Option(None, show_default='auto: 1 in post-rope, 0 in folded modes', help="First keys kept exact in the K cache (attention sinks)."),
    k_bits: Optional[int] = typer.Option(None, show_default='4', help="Quantise projected keys: 2, 3, 4 or 8 bits; 16 = not quantised."),
    v_rank_ratio: Optional[float] = typer.Option(None, show_default="the recipe's, 1.0: values not projected",
                                                 help="Mean kept value rank / head_dim: a closed-form map per KV head "
                                                 "keeping what o_proj sees; the V cache stores that many values per token."),
    v_bits: Optional[int] = typer.Option(None, show_default="4",
                                         help="Quantise cached values KIVI-style (per token, channel groups): 2, 3, 4 or 8 "
                                         "bits; 16 = not quantised."),
    v_window: Optional[int] = typer.Option(None, show_default="auto: 256·v_bits/16 (4 bits: 64), at most seq_len/8",
                                           help="Most recent values kept unquantised (with --v-bits)."),
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

    def go():
        from . import compression as compress_mod
        from .checkpoint import save_compressed
        from .fsutil import check_writable_target
        from .recipe import Recipe

        check_writable_target(out, overwrite)
        for value in (dtype, save_dtype):
            if value is not None:
                from .checkpoint import dtype_name

                dtype_name(value)  # refuse a bad --dtype/--save-dtype before calibrating
        r = Recipe.from_yaml(recipe) if recipe else Recipe()
        pol = policy
        if max_kl is not None:
            if policy not in (None, "fidelity"):
                from .errors import RecipeError

                raise RecipeError(f"max_kl: --max-kl sets the fidelity policy; it cannot be combined with --policy {policy}")
            pol = "fidelity"
        r = r.replace(model=model, text=list(text) if text else None, mode=mode, policy=pol, rank_ratio=rank_ratio,
                      tau=tau, epsilon=epsilon, max_kl=max_kl, weighting=weighting, exact_window=exact_window, exact_sink=exact_sink,
                      k_bits=k_bits, v_rank_ratio=v_rank_ratio, v_bits=v_bits, v_window=v_window,
                      seq_len=seq_len, serve_len=serve_len, max_tokens=max_tokens, heldout_tokens=heldout_tokens,
                      device=device, dtype=dtype)
        source = r.model
        if device_map is not None or max_memory or offload_folder:  # placed by accelerate as it loads, in the recipe's dtype
            from .models import load_model

            source = load_model(r.model, dtype=r.dtype, device_map=device_map, max_memory=max_memory,
                                offload_folder=offload_folder)
        lm, report = compress_mod.compress(source, r, progress=True)
        typer.echo(_layer_table(report))
        if "kl" in report.get("allocation", {}):
            a = report["allocation"]
            typer.echo(f"fidelity: budget {a['rank_ratio']:.3f}·d_h (mean rank {a['mean_rank_ratio']:.3f}), next-token KL vs dense "
                       f"{a['kl']:.4g} <= {a['max_kl']:g} on {a['heldout_tokens']} held-out tokens; held-out ppl "
                       f"{a['heldout_ppl_dense']:.3f} -> {a['heldout_ppl']:.3f} ({a['heldout_ppl_change']:+.2%})")
        if report["calibration"]["sampled"]:
            typer.echo("note: calibrated on text sampled from the model itself; pass --text with real text for better fits")
        save_compressed(lm, report, out, overwrite=overwrite, dtype=save_dtype, delta=delta)
        from .checkpoint import describe_checkpoint

        typer.echo(describe_checkpoint(out))

    _run(go)


def _load_any(model: str, device: str, dtype: Optional[str] = None, device_map: Optional[str] = None, **placed):
    """A compressed checkpoint directory (has lowrank_attn.json; default dtype: its own; a delta's base placed by
    ``device_map``/``placed``) or anything load_model accepts (default dtype: float32)."""
    from .checkpoint import SIDECAR, load_compressed
    from .models import load_model

    if (Path(model) / SIDECAR).is_file():
        return load_compressed(model, device=device, dtype=dtype, device_map=device_map, **placed)
    return load_model(model, device=device, dtype=dtype or "float32", device_map=device_map, **placed)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="A compressed checkpoint directory, or " + MODEL_HELP),
    task: str = typer.Option("wikitext2-local", help="wikitext2-local (offline, ../shared/data), textppl (perplexity of "
                             "--text FILE), a path to any text file, wikitext (lm-eval's stock task, online), passkey "
                             "(key retrieval from synthetic prompts of --max-length tokens at --depths), or cache-ppl "
                             "(token perplexity through the KV cache: windows of --max-length tokens of --text fed in "
                             "--chunk-token chunks, so later tokens attend to what the cache stored; K+V bytes measured)."),
    text_file: Optional[str] = typer.Option(None, "--text-file", "--text", show_default='../shared/data/wikitext2-test.raw for wikitext2-local', help="Text file for wikitext2-local (default "
                                            "../shared/data/wikitext2-test.raw) or textppl."),
    max_length: int = typer.Option(2048, help="Context length of lm-eval's rolling windows; for passkey, the prompt length in tokens."),
    limit: Optional[int] = typer.Option(None, show_default='none: every document', help="Only the first N documents."),
    depths: str = typer.Option("8", help="passkey: a number of evenly spaced depths in [0, 1], or comma-separated fractions."),
    samples: int = typer.Option(1, help="passkey: prompts (keys) per depth."),
    seed: int = typer.Option(0, help="passkey: seed of the keys (and of the filler offset in --filler)."),
    filler: Optional[str] = typer.Option(None, show_default='neutral sentences repeated', help="passkey: filler text file (default: neutral sentences repeated)."),
    dense: Optional[str] = typer.Option(None, show_default='none: no comparison', help="Dense model to compare with: adds its perplexity, and on one window "
                                        "of the text (at most 2048 tokens) the next-token KL vs dense and the attention "
                                        "KL per row (the certificate's quantity, measured on this text)."),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = typer.Option(None, show_default="auto: a checkpoint's own dtype, float32 otherwise", help=DTYPE_HELP + " Default: a checkpoint's own dtype, float32 otherwise."),
    device_map: Optional[str] = typer.Option(None, "--device-map", show_default='none: --device', help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", show_default='none: no cap', help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", show_default='none: no offloading', help=OFFLOAD_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", show_default='none: print only', help="Write the results JSON here."),
    chunk: int = typer.Option(512, help="cache-ppl: tokens per forward through the cache."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", show_default="none: the model's own cache",
                                           help="cache-ppl: evaluate a peer cache on MODEL instead (quanto-4bit, "
                                           "quanto-2bit, hqq-4bit, hqq-2bit: transformers' QuantizedCache)."),
):
    """Perplexity through lm-eval's own harness (HFLM over the model object), or through the KV cache (cache-ppl)."""

    def go():
        from .evaluate import perplexity
        from .fsutil import check_writable_target

        if out is not None:  # refuse an unusable --out before evaluating, not after
            if out.is_dir():
                raise LowrankAttnError(f"--out {out} is a directory; give a file name for the results JSON")
            check_writable_target(out, overwrite=True)  # its parent must be, or can become, a directory
        if task == "passkey":
            from .longctx import parse_depths

            parse_depths(depths)  # refuse bad depths before loading anything
            if max_length < 2:
                raise LowrankAttnError(f"--max-length must be at least 2 tokens, got {max_length}")
            if samples < 1:
                raise LowrankAttnError(f"--samples: need at least 1 prompt per depth, got {samples}")
        lm = _load_any(model, device, dtype, device_map, max_memory=max_memory, offload_folder=offload_folder)
        ref = None
        if dense:  # refuse a mismatched pair before any evaluation
            from .checkpoint import SIDECAR, check_same_source

            if (Path(dense) / SIDECAR).is_file():
                raise LowrankAttnError(f"--dense {dense} is a compressed checkpoint; pass the dense model it was made from")

            ref = _load_any(dense, device, dtype or str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                            device_map, max_memory=max_memory,
                            offload_folder=offload_folder / "dense" if offload_folder else None)  # its own offload
            check_same_source(lm, ref)
        if task == "passkey":
            return _passkey_eval(model, lm, ref, max_length, depths, samples, seed, filler, out)
        if task == "cache-ppl":
            return _cache_ppl_eval(model, lm, ref, text_file, max_length, limit, chunk, kv_cache, out)
        if task == "textppl":
            if not text_file:
                raise LowrankAttnError("--task textppl needs --text FILE")
            from .evaluate import TEXTPPL_TASK

            task_name = TEXTPPL_TASK
        else:
            task_name = task
        res = perplexity(lm.model, lm.tokenizer, task=task_name, text_file=text_file, max_length=max_length, limit=limit,
                         progress=True, desc="compressed" if (Path(model) / "lowrank_attn.json").is_file() else model)
        summary = {"model": model, "task": res["task"], "word_perplexity": res["word_perplexity"],
                   "byte_perplexity": res["byte_perplexity"], "bits_per_byte": res["bits_per_byte"],
                   "documents": res["documents"], "tokens": res["tokens"], "token_perplexity": res["token_perplexity"],
                   "max_length": max_length, "forward": res["forward"]}
        line = f"{model}: word perplexity {res['word_perplexity']:.4f} on {res['task']} ({res['documents']} documents)"
        if ref is not None:
            from .heldout import attention_kl, next_token_kl

            dres = perplexity(ref.model, ref.tokenizer, task=task_name, text_file=text_file, max_length=max_length,
                              limit=limit, progress=True, desc="dense")
            kl_file = res.get("text_file") or text_file
            kl_len = min(max_length, 2048)
            tok_kl, kl_tokens = next_token_kl(ref, lm, text_file=kl_file, max_length=kl_len)
            att_kl = attention_kl(ref, lm, text_file=kl_file, max_length=kl_len)
            summary.update(dense_word_perplexity=dres["word_perplexity"], next_token_kl=tok_kl,
                           attention_kl_per_row=att_kl, kl_tokens=kl_tokens)
            line += (f"; dense {dres['word_perplexity']:.4f} ({100 * (res['word_perplexity'] / dres['word_perplexity'] - 1):+.2f}%)"
                     f"\non the first {kl_tokens} tokens: next-token KL vs dense {tok_kl:.5f}; attention KL per row "
                     f"vs dense {att_kl:.5f} (the certificate's quantity, which compress measured on held-out "
                     "calibration text)")
        typer.echo(line)
        _write_json(out, {"summary": summary, "lm_eval": res["lm_eval"]})

    _run(go)


def _write_json(out: Path | None, doc: dict) -> None:
    """An eval command's results JSON at ``out`` (nothing when None); a failure is one line."""
    import json

    if out:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        except OSError as e:
            raise LowrankAttnError(f"cannot write {out}: {e.strerror or e}") from e


def _cache_ppl_eval(name, lm, ref, text_file, length, limit, chunk, kv_cache, out) -> None:
    """``eval --task cache-ppl``: token perplexity through the cache and its K/V bytes; with --dense, the dense
    model through its own cache on the same windows (the bytes reference)."""

    from .cachepath import cache_perplexity
    from .evaluate import WIKITEXT_DEFAULT_FILE, resolve_text_file
    from .peers import make_cache
    from .texts import load_texts, token_windows

    if chunk < 1:
        raise LowrankAttnError(f"--chunk must be at least 1 token, got {chunk}")
    factory = (lambda m: make_cache(kv_cache, m)) if kv_cache else None
    if factory is not None:
        factory(lm.model)  # an unknown peer or a missing backend: one line before any work
    wins = [w.input_ids for w in token_windows(lm.tokenizer, load_texts([str(resolve_text_file(text_file or WIKITEXT_DEFAULT_FILE))]), seq_len=length)
            if len(w.input_ids) == length][: limit or None]
    if not wins:
        raise LowrankAttnError(f"the text holds no full window of {length} tokens; lower --max-length")
    label = kv_cache or ("compressed" if (Path(name) / "lowrank_attn.json").is_file() else name)
    res = cache_perplexity(lm.model, wins, chunk=chunk, cache_factory=factory, progress=True, desc=f"{label} (cache)")
    doc = {"summary": {"model": name, "task": "cache-ppl", "kv_cache": kv_cache, "max_length": length, **res}}
    b = res["bytes_per_token"]
    line = (f"{name}{' with ' + kv_cache if kv_cache else ''}: token perplexity through the cache "
            f"{res['token_perplexity']:.4f} ({res['windows']} windows of {length} tokens, chunks of {chunk}); "
            f"KV bytes per token (bf16 floats) K {b['k']:.0f} + V {b['v']:.0f}")
    if ref is not None:
        dres = cache_perplexity(ref.model, wins, chunk=chunk, progress=True, desc="dense (cache)")
        db = dres["bytes_per_token"]
        doc["summary"]["dense"] = dres
        line += (f"\ndense {dres['token_perplexity']:.4f} ({100 * (res['token_perplexity'] / dres['token_perplexity'] - 1):+.2f}%); "
                 f"KV bytes vs the dense bf16 cache {b['total'] / db['total']:.1%} (K {b['k'] / db['k']:.1%}, "
                 f"V {b['v'] / db['v']:.1%})")
    typer.echo(line)
    _write_json(out, doc)


def _passkey_eval(name, lm, ref, length, depths, samples, seed, filler, out) -> None:
    """``eval --task passkey``: score ``lm`` (and the dense ``ref``) on the same seeded prompts; print, write --out."""

    from .longctx import format_passkey, run_passkey

    kw = dict(samples=samples, seed=seed, filler=filler)
    res = run_passkey(lm.model, lm.tokenizer, length, depths, desc=f"passkey {name}", **kw)
    line = f"{name}: passkey at {length} tokens {format_passkey(res['summary'])}"
    doc = {"summary": {"model": name, "task": "passkey", **res["summary"]}, "passkey": res}
    if ref is not None:
        dres = run_passkey(ref.model, ref.tokenizer, length, depths, desc="passkey dense", **kw)
        line += f"; dense {format_passkey(dres['summary'])}"
        doc["summary"]["dense"] = dres["summary"]
        doc["dense_passkey"] = dres
    typer.echo(line)
    _write_json(out, doc)


@app.command(cls=_RegistryHelp)
def sweep(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="Directory for sweep.jsonl/csv/md/json and plots; "
                             "an existing one is resumed."),
    ratios: str = typer.Option("0.75,0.5,0.25", help="Comma-separated mean rank ratios in (0, 1]."),
    methods: str = typer.Option("dense,weight-svd,key-pca,think,ours-uniform,ours,ours+4bit", help="Comma-separated: <methods>; one point each: <bound> (certificate policy), "
                                "<quant> (K-cache quantisation alone)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", show_default='none: built-in defaults', help="Recipe for calibration settings (text, seq_len, …)."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", show_default='builtin:gutenberg', help=TEXT_HELP),
    seq_len: Optional[int] = typer.Option(None, show_default="the recipe's; auto: 2048 or the model's maximum", help="Calibration window length (overrides the recipe)."),
    max_tokens: Optional[int] = typer.Option(None, show_default="the recipe's, 32768", help="Calibration tokens (overrides the recipe)."),
    task: str = typer.Option("wikitext2-local", help="Evaluation task (see eval --help)."),
    text_file: Optional[str] = typer.Option(None, show_default="the task's default file", help="Text file for the evaluation task."),
    max_length: int = typer.Option(2048, help="lm-eval context length."),
    limit: Optional[int] = typer.Option(None, show_default='none: every document', help="Only the first N evaluation documents (faster)."),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = typer.Option(None, show_default="the recipe's, float32", help=DTYPE_HELP + " Default: the recipe's (float32)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", show_default='none: --device', help=DEVICE_MAP_HELP),
):
    """Perplexity (lm-eval), attention KL and K-cache bytes versus rank, for ours and the baselines."""

    def go():
        from .recipe import Recipe
        from .sweep import run_sweep
        from .sweep_report import sweep_markdown, write_sweep_report

        try:
            rlist = [float(x) for x in ratios.split(",") if x.strip()]
        except ValueError:
            raise LowrankAttnError(f"--ratios: expected comma-separated numbers, got {ratios!r}") from None
        r = Recipe.from_yaml(recipe) if recipe else Recipe()
        r = r.replace(model=model, text=list(text) if text else None, device=device, seq_len=seq_len,
                      max_tokens=max_tokens, dtype=dtype)
        mlist = [m.strip() for m in methods.split(",") if m.strip()]
        points = run_sweep(r.model, out, ratios=rlist, methods=mlist, recipe=r, task=task, text_file=text_file,
                           max_length=max_length, limit=limit, log=typer.echo, device_map=device_map)
        files = write_sweep_report(points, out, title=model)
        typer.echo(sweep_markdown(points))
        typer.echo(f"wrote {', '.join(str(out / f) for f in files)}")

    _run(go, interrupted=f"interrupted; the points so far are kept in {out / 'sweep.jsonl'}: rerun to resume")


def entry() -> None:  # pragma: no cover - console script wrapper
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
