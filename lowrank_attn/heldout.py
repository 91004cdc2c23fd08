"""Measurements on held-out tokens: the per-head certificate and the per-layer attention-output error.

Both use the dense model's own post-RoPE q, k (and v) of held-out windows (``calibrate.QKSample``),
so each layer is judged on the inputs the dense model gives it. Query rows are subsampled evenly
(``CERT_ROWS`` per window); every row keeps all its keys.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from .bound import Certificate, certify
from .calibrate import QKSample
from .runtime import placement
from .runtime.kcache import prefill_keys
from .runtime.surgery import prefill_as

CERT_ROWS = 256  # query rows per held-out window used for the certificate (evenly spaced)


def _approx_logits(q, k, q_map, k_map, scale, window, quantizer, rows, sink=0, k_mean=None):
    # q: (g, S, d) queries of one group; k: (S, d); rows: (R,) query positions → exact, approx logits (g, R, S)
    q = q[:, rows]
    exact = scale * q @ k.T
    return exact, _approx_given_exact(q, k, exact, q_map, k_map, scale, window, quantizer, rows, sink, k_mean)


def _approx_given_exact(q, k, exact, q_map, k_map, scale, window, quantizer, rows, sink=0, k_mean=None):
    # q: (g, R, d) the query rows; exact: their exact logits (g, R, S) → approx logits (g, R, S).
    # k_mean (d,): keys cached centred (runtime ``_cached_attend``): projected logits are s·q'ᵀB(k − k̄) + s·qᵀk̄
    # up to the row constant softmax ignores
    kc = k if k_mean is None else k - k_mean
    k_low = prefill_keys((kc @ k_map.T)[None, None], window, quantizer)[0, 0]
    approx = scale * (q @ q_map.T) @ k_low.T
    if k_mean is not None:
        approx = approx + scale * (q @ k_mean)[..., None]
    if window or sink:
        k_pos = torch.arange(k.shape[0])[None, :]
        exact_pairs = ((rows[:, None] - k_pos) < window) | (k_pos < sink)
        approx = torch.where(exact_pairs, exact, approx)
    return approx


def _valid_mask(rows: torch.Tensor, s: int, sliding: int | None) -> torch.Tensor:
    dist = rows[:, None] - torch.arange(s)[None, :]
    valid = dist >= 0
    if sliding:
        valid &= dist < sliding
    return valid


def head_certificate(sample: QKSample, layer: int, kv_head: int, group: int, q_map, k_map, *, window: int,
                     quantizer, sliding=None, sink: int = 0, max_rows: int = CERT_ROWS, k_mean=None) -> Certificate:
    """Certificate of one KV head (its whole query group) on the held-out windows, float32,
    on up to ``max_rows`` evenly spaced query rows per window."""
    qs, ks, scale = sample.q[layer], sample.k[layer], sample.scale[layer]
    q_map, k_map = torch.as_tensor(q_map, dtype=torch.float32), torch.as_tensor(k_map, dtype=torch.float32)
    results = []
    for q, k in zip(qs, ks):  # one held-out window at a time: q (1,H,S,d), k (1,Hkv,S,d)
        qg = q[0, kv_head * group : (kv_head + 1) * group].float()
        kj = k[0, kv_head].float()
        s = qg.shape[1]
        rows = torch.linspace(0, s - 1, min(max_rows, s)).round().long().unique()
        exact, approx = _approx_logits(qg, kj, q_map, k_map, scale, window, quantizer, rows, 0 if sliding else sink,
                                       None if k_mean is None else torch.as_tensor(k_mean, dtype=torch.float32))
        results.append(certify(exact, approx, _valid_mask(rows, s, sliding)))
    if len(results) == 1:
        return results[0]
    # combine windows: means weighted by rows, maxima by max, counts summed
    total = sum(r.rows for r in results)
    vals = {}
    for f in fields(results[0]):
        xs = [getattr(r, f.name) for r in results]
        if f.name in ("rows", "violations"):
            vals[f.name] = sum(xs)
        elif f.name.endswith("_max"):
            vals[f.name] = max(xs)
        else:
            vals[f.name] = sum(x * r.rows for x, r in zip(xs, results)) / total
    return replace(results[0], **vals)




def layer_output_error(sample: QKSample, layer: int, maps: list[tuple[torch.Tensor, torch.Tensor]], o_weight: torch.Tensor,
                       *, group: int, window: int, quantizer, sliding=None, sink: int = 0,
                       max_rows: int = CERT_ROWS) -> float:
    """Mean squared change of the layer's attention output (after o_proj), relative to the typical
    (median) squared norm of the residual stream entering the layer, over held-out rows.

    maps: per KV head (q_map (r,d), k_map (r,d)); o_weight: (D, H·d)."""
    return layer_output_errors(sample, layer, [maps], o_weight, group=group, window=window, quantizer=quantizer,
                               sliding=sliding, sink=sink, max_rows=max_rows)[0]


def sample_rows(s: int, max_rows: int = CERT_ROWS) -> torch.Tensor:
    """The query rows a held-out window of ``s`` tokens is judged on: up to ``max_rows``, evenly spaced. (R,)"""
    return torch.linspace(0, s - 1, min(max_rows, s)).round().long().unique()


# how a per-row output change Δo (R, D) is scored, given the loss gradient g (R, D) at the output (or none)
OUTPUT_SCORES = {
    "squared": lambda delta, g: (delta**2).sum(),  # ‖Δo‖²
    "fisher-diag": lambda delta, g: (g**2 * delta**2).sum(),  # Σ_D g² Δo²: diagonal empirical Fisher
    "fisher": lambda delta, g: ((g * delta).sum(-1) ** 2).sum(),  # (g·Δo)²: per-row empirical Fisher g gᵀ
}


def _on_device_of(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` computed where ``fn``'s parameters live (a norm module of a GPU model), returned on x's device."""
    if not isinstance(fn, torch.nn.Module) or next(iter(fn.parameters()), None) is None:
        return fn(x)
    return fn(x.to(placement.execution_device(fn))).to(x.device, torch.float32)


def layer_output_errors(sample: QKSample, layer: int, candidates: list[list[tuple[torch.Tensor, torch.Tensor]]],
                        o_weight: torch.Tensor, *, group: int, window: int, quantizer, sliding=None, sink: int = 0,
                        max_rows: int = CERT_ROWS, grads: list[torch.Tensor] | None = None,
                        score: str = "squared", out_norm=None) -> list[float]:
    """``layer_output_error`` of each candidate set of maps (e.g. a grid of ranks), the exact logits and
    attention of every head computed once and shared by all candidates.

    With ``grads`` (per held-out window, the loss gradient at the layer's attention output on the
    ``sample_rows`` rows, (R, D); see ``output_gradients``) each row's change is scored by ``score``
    (an ``OUTPUT_SCORES`` name) and averaged over rows, without the residual normalisation: an
    estimate of the next-token loss change in loss units, comparable across layers.

    ``out_norm`` (the block's norm between the attention output and the residual stream, e.g. gemma3's
    post_attention_layernorm): the change is measured after it, norm(o + Δo) − norm(o), which is what the
    residual stream receives: a raw Δo misjudges each layer by its output norm's gain / rms(o)."""
    score_fn = OUTPUT_SCORES[score]
    errs = [0.0] * len(candidates)
    rows_total = 0
    d = sample.q[layer][0].shape[-1]
    scale = sample.scale[layer]
    sink = 0 if sliding else sink
    neg = torch.tensor(float("-inf"))
    for w, (q, k, v) in enumerate(zip(sample.q[layer], sample.k[layer], sample.v[layer])):  # (1,H,S,d), (1,Hkv,S,d), (1,Hkv,S,dv)
        q, k, v = q.float(), k.float(), v.float()  # one window at a time (a half model's sample is kept half)
        s = q.shape[2]
        rows = sample_rows(s, max_rows)
        g = grads[w] if grads is not None else None  # (R, D)
        valid = _valid_mask(rows, s, sliding)
        delta_out = [0.0] * len(candidates)
        o_exact = 0.0  # (R, D) the dense attention output on the rows (needed only with out_norm)
        for j in range(len(candidates[0])):
            qr = q[0, j * group : (j + 1) * group][:, rows]  # (g, R, d)
            kj = k[0, j]
            exact = scale * qr @ kj.T
            p_exact = torch.softmax(torch.where(valid, exact, neg), -1)
            w_o = o_weight[:, j * group * d : (j + 1) * group * d].float()  # (D, g·d)
            if out_norm is not None:
                o_exact = o_exact + (p_exact @ v[0, j]).transpose(0, 1).reshape(len(rows), -1) @ w_o.T
            for c, maps in enumerate(candidates):
                qm, km = maps[j][:2]
                k_mean = maps[j][2].float() if len(maps[j]) > 2 else None  # (d,), see _approx_given_exact
                approx = _approx_given_exact(qr, kj, exact, qm.float(), km.float(), scale, window, quantizer, rows, sink,
                                             k_mean)
                dout = (torch.softmax(torch.where(valid, approx, neg), -1) - p_exact) @ v[0, j]  # (g, R, dv)
                delta_out[c] = delta_out[c] + dout.transpose(0, 1).reshape(len(rows), -1) @ w_o.T  # (R, D)
        if out_norm is not None:
            with torch.no_grad():
                normed = _on_device_of(out_norm, o_exact)
                delta_out = [_on_device_of(out_norm, o_exact + dl) - normed if torch.is_tensor(dl) else dl
                             for dl in delta_out]
        for c, delta in enumerate(delta_out):
            errs[c] += float(score_fn(delta, g)) if torch.is_tensor(delta) else 0.0
        rows_total += len(rows)
    norm = max(rows_total, 1) * (1.0 if grads is not None else max(sample.resid_sq[layer], 1e-30))
    return [e / norm for e in errs]


def attention_kl(dense, compressed, *, text_file: str | None, max_length: int = 2048) -> float:
    """Attention KL per row: mean KL(dense ‖ compressed) of attention rows, over every layer and head, on one
    window of ``text_file``, each layer fed the dense model's own q/k, keys centred on the mean the runtime
    centres them on (the certificate's measurement, on other text)."""
    from .runtime import adapters
    from .calibrate import run_hooked
    from .runtime.coded import key_quantizer
    from .runtime.modes import head_maps
    from .texts import load_texts, token_windows

    plans = [getattr(m, "lowrank_plan", None) for m in adapters.attention_modules(compressed.model)]
    if any(p is None for p in plans):
        return 0.0
    layout = adapters.head_layout(dense.model)
    windows = token_windows(dense.tokenizer, load_texts([text_file]), seq_len=max_length, max_tokens=max_length)[:1]
    sample = QKSample()
    run_hooked(dense.model, windows, sample, "attention KL", False)
    slidings = adapters.sliding_windows(dense.model)
    kls = []
    for layer, plan in enumerate(plans):
        quant = key_quantizer(plan)
        for j in range(layout.num_kv_heads):
            qm, km = head_maps(plan, j, layout.head_dim)
            kls.append(head_certificate(sample, layer, j, layout.group_size, qm, km, window=plan.window, sink=plan.sink,
                                        quantizer=quant, sliding=slidings[layer],
                                        k_mean=None if plan.k_mean is None else plan.k_mean[j]).kl_mean)
    return float(sum(kls) / len(kls))


def next_token_kl(dense, compressed, *, text_file: str | None, max_length: int = 2048) -> tuple[float, int]:
    """(next-token KL vs dense, tokens): mean over positions of KL(dense ‖ compressed) of the next-token
    distribution on the window of ``text_file`` that ``attention_kl`` reads (end-to-end fidelity)."""
    from .texts import load_texts, token_windows

    window = token_windows(dense.tokenizer, load_texts([text_file]), seq_len=max_length, max_tokens=max_length)[0]
    ids = window.input_ids
    return output_kl(next_token_logprobs(dense.model, ids), compressed.model, ids), int(len(ids))


def next_token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(S, V) float32 log-probabilities of the next token at every position of one window."""
    device = placement.input_device(model)
    with torch.inference_mode(), prefill_as(model, "compressed"):
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1).cpu()


def output_kl(dense_logp: torch.Tensor, model, ids: torch.Tensor) -> float:
    """Mean over positions of KL(dense ‖ model) of the next-token distribution: end-to-end fidelity
    that every method has (including ones whose error is not a post-RoPE projection)."""
    return float(logprob_kl(dense_logp, next_token_logprobs(model, ids)).mean())


def logprob_kl(ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ logp) per position of two (S, V) next-token log-probability tensors: (S,). The one KL the
    package and eval/ measure (its mean over positions: :func:`output_kl`)."""
    return (ref.exp() * (ref - logp)).sum(-1)


def _window_kwargs(window, device) -> dict:
    """input_ids (and position_ids when the window sits at an absolute position) of one token window."""
    ids = window.input_ids[None].to(device)
    pos = getattr(window, "position", 0)
    kw = {"input_ids": ids, "use_cache": False}
    if pos:
        kw["position_ids"] = torch.arange(pos, pos + ids.shape[1], device=device)[None]
    return kw


def output_gradients(model, windows, *, max_rows: int = CERT_ROWS) -> dict[int, list[torch.Tensor]]:
    """Per layer, per window: the gradient of the mean next-token loss with respect to the layer's
    attention output (after o_proj), on the ``sample_rows`` rows, (R, D) float32 on the CPU.

    One forward+backward per window; the weights are frozen for it (no parameter gradients), and a zero
    tensor added to each attention output is what the gradient is taken against."""
    from functools import partial

    from .runtime import adapters

    device = placement.input_device(model)
    mods = adapters.attention_modules(model)
    taps: dict[int, torch.Tensor] = {}

    def tap(mod, args, out, layer):
        o = out[0] if isinstance(out, tuple) else out  # (B, S, D)
        taps[layer] = torch.zeros_like(o, requires_grad=True)
        o = o + taps[layer]
        return (o, *out[1:]) if isinstance(out, tuple) else o

    trainable = [p for p in model.parameters() if p.requires_grad]
    handles = [m.register_forward_hook(partial(tap, layer=i)) for i, m in enumerate(mods)]
    grads: dict[int, list[torch.Tensor]] = {}
    try:
        for p in trainable:
            p.requires_grad_(False)
        # also when called under inference_mode; the compressed attention is what is measured
        with torch.inference_mode(False), torch.enable_grad(), prefill_as(model, "compressed"):
            for w in windows:
                kw = _window_kwargs(w, device)
                loss = model(**kw, labels=kw["input_ids"]).loss
                layers = sorted(taps)
                gs = torch.autograd.grad(loss, [taps[i] for i in layers])
                rows = sample_rows(kw["input_ids"].shape[1], max_rows).to(device)
                for i, g in zip(layers, gs):
                    grads.setdefault(i, []).append(g[0, rows].float().cpu())
                taps.clear()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    return grads


def window_logprobs(model, window) -> torch.Tensor:
    """(S, V) float32 log-probabilities of the next token at every position of one token window
    (at its absolute position)."""
    device = placement.input_device(model)
    with torch.inference_mode(), prefill_as(model, "compressed"):
        logits = model(**_window_kwargs(window, device)).logits[0]
    return torch.log_softmax(logits.float(), -1).cpu()


def heldout_fidelity(model, windows, dense_logps: list[torch.Tensor]) -> dict:
    """Next-token fidelity of ``model`` on held-out ``windows``: mean KL(dense ‖ model) over positions and
    the perplexity of the windows' own next tokens, for the model and for the dense log-probabilities."""
    kl_sum, nll, nll_dense, n = 0.0, 0.0, 0.0, 0
    for w, dense in zip(windows, dense_logps):
        logp = window_logprobs(model, w)  # (S, V)
        kl_sum += float(logprob_kl(dense, logp).sum())
        nxt = w.input_ids[1:, None]
        nll -= float(logp[:-1].gather(-1, nxt).sum())
        nll_dense -= float(dense[:-1].gather(-1, nxt).sum())
        n += len(w.input_ids)
    m = max(sum(len(w.input_ids) - 1 for w in windows), 1)
    return {"kl": kl_sum / max(n, 1), "ppl": float(torch.exp(torch.tensor(nll / m))),
            "dense_ppl": float(torch.exp(torch.tensor(nll_dense / m)))}
