"""``analyze``: stream text through a model, measure the E~ and W_Q^T W_K spectra of every head.

Python API: ``collect_grams`` (the statistics pass) and ``analyze`` (everything,
returning a JSON-ready report). ``report.write_analysis`` writes files.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .runtime import adapters, placement
from . import spectra
from .calibrate import GramStats, attention_hook, statistics_forward_kwargs
from .errors import TextError
from .models import LoadedModel, load_model
from .vfit import fit_value_head
from .texts import SAMPLED_NAME, Text, Window, calibration_texts, token_windows

SCHEMA = "lowrank-attn/spectra"
SCHEMA_VERSION = 1
DEFAULT_SEQ_LEN = 1024


def _batches(windows: list[Window], batch_size: int) -> Iterable[list[Window]]:
    """Batches of equal-length windows from one text (so per-text statistics stay separable)."""
    groups: dict[tuple[str, int], list[Window]] = defaultdict(list)
    for w in windows:
        groups[(w.text_name, len(w.input_ids))].append(w)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def collect_grams(model: torch.nn.Module, windows: list[Window], *, batch_size: int = 1,
                  progress: bool = True) -> dict[str, GramStats]:
    """One forward pass over every window with the attention hook: per-text Gram statistics."""
    layout = adapters.head_layout(model)
    device = placement.input_device(model)  # where the inputs go (the first of a device_map)
    stats: dict[str, GramStats] = {}
    current: list[GramStats] = []

    def on_qk(layer, query, key, mask, scaling):
        current[0].add(layer, query, key, scaling)

    n_tokens = sum(len(w.input_ids) for w in windows)
    bar = tqdm(total=n_tokens, unit="tok", desc="statistics", disable=not progress)
    kw = statistics_forward_kwargs(model)
    try:
        with attention_hook(model, on_qk, on_output=lambda layer, out: current[0].add_output(layer, out)), \
                torch.inference_mode():
            for batch in _batches(windows, batch_size):
                name = batch[0].text_name
                if name not in stats:
                    stats[name] = GramStats(layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim)
                current[:] = [stats[name]]
                ids = torch.stack([w.input_ids for w in batch]).to(device)
                model(input_ids=ids, **kw)
                bar.update(ids.numel())
    finally:
        bar.close()
    for s in stats.values():
        s.check_finite()
    return stats


def pooled(stats: dict[str, GramStats]) -> GramStats:
    it = iter(stats.values())
    first = next(it)
    total = GramStats(*first.shape)
    total += first
    for s in it:
        total += s
    return total


def _measures(sv2: np.ndarray, keep_spectrum: bool = True) -> dict:
    m = spectra.rank_measures(sv2)
    out = {"r90": m.r90, "r99": m.r99, "entropy_rank": round(m.entropy_rank, 4), "stable_rank": round(m.stable_rank, 4)}
    if keep_spectrum:
        # 10 significant digits: the stored spectrum still sums to 1 within ~1e-10 (6 gave ~1e-6)
        out["energy"] = [float(f"{x:.10g}") for x in spectra.energy(sv2)]
    return out


@spectra.single_threaded_blas()
def head_spectra(model: torch.nn.Module, stats: GramStats, per_text: dict[str, GramStats] | None = None) -> list[dict]:
    """Per layer, per KV head (GQA group pooled) and per query head: spectra and rank measures."""
    layout = adapters.head_layout(model)
    d, g = layout.head_dim, layout.group_size
    layers = []
    for layer in range(layout.num_layers):
        wq, wk = (w.detach().to(torch.float64).cpu().numpy() for w in adapters.qk_weights(model, layer))
        wo = adapters.o_weight(model, layer).to(torch.float64).cpu().numpy()  # (D, H·d)
        scale = float(stats.scale[layer])
        gk = stats.key_gram_centred(layer)
        text_gk = {n: s.key_gram_centred(layer) for n, s in (per_text or {}).items()}
        kv_heads = []
        for j in range(layout.num_kv_heads):
            heads = range(j * g, (j + 1) * g)
            e_sv2 = spectra.logit_field_sv2(stats.gq[layer, heads].sum(0), gk[j], scale)
            w_sv2 = spectra.weight_sv2(wq[j * g * d : (j + 1) * g * d], wk[j * d : (j + 1) * d], scale)
            m = sum(wo[:, h * d : (h + 1) * d].T @ wo[:, h * d : (h + 1) * d] for h in heads)
            v_sv2 = fit_value_head(stats.go[layer, heads].mean(0), m, ridge=0.0).eigvals  # output energy per value dim
            entry = {"kv_head": j, "logit_field": _measures(e_sv2), "weights": _measures(w_sv2),
                     "value_output": _measures(v_sv2)}
            e90 = entry["logit_field"]["r90"]
            entry["gap"] = round(entry["weights"]["r90"] / e90, 4) if e90 else None
            entry["per_text"] = {
                n: _measures(spectra.logit_field_sv2(s.gq[layer, heads].sum(0), text_gk[n][j], scale), keep_spectrum=False)
                for n, s in (per_text or {}).items()
            }
            entry["query_heads"] = [
                {"head": h,
                 "logit_field": _measures(spectra.logit_field_sv2(stats.gq[layer, h], gk[j], scale), keep_spectrum=False),
                 "weights": _measures(spectra.weight_sv2(wq[h * d : (h + 1) * d], wk[j * d : (j + 1) * d], scale),
                                      keep_spectrum=False)}
                for h in heads
            ]
            kv_heads.append(entry)
        layers.append({"layer": layer, "scale": scale, "kv_heads": kv_heads})
    return layers


def _range(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    return {"min": min(v), "median": float(np.median(v)), "max": max(v)} if v else {"min": None, "median": None, "max": None}


def summarize(layers: list[dict], text_names: list[str]) -> list[dict]:
    """Paper-style rows: per text and pooled, the range over KV heads of r90(E~), r90(W), and the gap."""
    heads = [h for layer in layers for h in layer["kv_heads"]]
    w90 = [h["weights"]["r90"] for h in heads]
    rows = []
    for name in text_names + ["pooled"]:
        e90 = [h["logit_field"]["r90"] if name == "pooled" else h["per_text"][name]["r90"] for h in heads]
        gaps = [w / e if e else None for w, e in zip(w90, e90)]
        rows.append({"text": name, "kv_heads": len(heads), "r90_logit_field": _range(e90),
                     "r90_weights": _range(w90), "gap": _range(gaps),
                     "heads_below_weights": sum(e < w for e, w in zip(e90, w90))})
    rows[-1]["r90_value_output"] = _range([h["value_output"]["r90"] for h in heads])  # pooled text only
    return rows


def analyze(model: str | LoadedModel = "smollm2-135m", text: list[str] | tuple[str, ...] | None = None, *,
            seq_len: int | None = None, max_tokens: int | None = None, device: str = "cpu",
            batch_size: int = 1, progress: bool = True, dtype: str = "float32", device_map: str | None = None,
            max_memory=None, offload_folder=None) -> dict:
    """Measure spectra of every head; returns the JSON-ready report (see ``SCHEMA``)."""
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype, device_map=device_map,
                                                                 max_memory=max_memory, offload_folder=offload_folder)
    layout = adapters.head_layout(lm.model)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, layout.max_positions)
    if seq_len > layout.max_positions:
        raise TextError(f"--seq-len {seq_len} exceeds the model's maximum of {layout.max_positions} positions")
    texts: list[Text] = calibration_texts(text or [], lm.model, lm.tokenizer, n_tokens=min(max_tokens or 4096, 4096))
    windows = token_windows(lm.tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens)
    n_tokens = sum(len(w.input_ids) for w in windows)
    if n_tokens < 2 * layout.head_dim:
        raise TextError(f"text too short: {n_tokens} tokens; at least {2 * layout.head_dim} (twice the head dimension) are needed")
    per_text = collect_grams(lm.model, windows, batch_size=batch_size, progress=progress)
    stats = pooled(per_text)
    text_names = list(per_text)
    layers = head_spectra(lm.model, stats, per_text if len(per_text) > 1 else None)
    if len(per_text) == 1:
        for layer in layers:
            for h in layer["kv_heads"]:
                h["per_text"] = {text_names[0]: {k: v for k, v in h["logit_field"].items() if k != "energy"}}
    return {
        "schema": SCHEMA, "version": SCHEMA_VERSION,
        "model": {"name": lm.name, "source": lm.source, "model_type": adapters.model_type(lm.model),
                  "layout": layout.__dict__},
        "seq_len": seq_len, "tokens": n_tokens,
        "texts": [{"name": n, "tokens": int(s.n[0])} for n, s in per_text.items()],
        "sampled_text": texts[0].name == SAMPLED_NAME,
        "centring": "keys centred by their mean over all calibration tokens (pooled field)",
        "layers": layers,
        "summary": summarize(layers, text_names),
    }
