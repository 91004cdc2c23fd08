"""lm-eval model type ``lowrank``: lm-eval's own ``HFLM`` around a model loaded by lowrank-attn.

``pretrained=`` takes a compressed checkpoint directory (one holding ``lowrank_attn.json``,
loaded with ``lowrank_attn.checkpoint.load_compressed``), a short name (``smollm2-135m``,
``tiny-llama``, ...), a .gguf file, a local HF directory or a hub id
(``lowrank_attn.models.load_model``). Everything else is HFLM's own behaviour and arguments
(``max_length``, ``batch_size``, ``add_bos_token``, ...); ``device`` and ``dtype`` apply when
loading. ``add_bos_token`` defaults to what the tokenizer does (``texts.bos_prefix``).

``kv_cache=<peer>`` (``quanto-4bit``, ``quanto-2bit``, ``hqq-4bit``, ``hqq-2bit``: ``lowrank_attn.peers``) makes
every ``generate()`` of the model run with a fresh transformers ``QuantizedCache`` of that peer, passed as
``past_key_values=make_cache(name, model)`` exactly as a user of QuantizedCache would; it applies to
generation tasks (``generate_until``: RULER, passkey-style retrieval), not to loglikelihood scoring, and only
to an uncompressed model (a compressed checkpoint keeps its own low-rank cache). An unknown name or a
missing backend package is refused when the model is made, in one line. ``prefill=`` (a compressed checkpoint;
``runtime.surgery.set_prefill``): by default the checkpoint's own, ``exact`` where post-rope — each prompt is
attended densely and stored compressed, as ``QuantizedCache`` runs, so a generation task (RULER) runs as served,
while a loglikelihood task, which scores each text in one forward, gets the dense model's score;
``prefill=compressed`` attends every token over what the cache stores (what ``lowrank-attn eval`` perplexity
measures).

RULER, offline (the six tasks that generate their data from a tokenizer; ``tokenizer=`` a directory with the
tokenizer files)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lowrank_attn.lm_eval_model --model lowrank \\
        --model_args pretrained=qwen2.5-0.5b,tokenizer=TOKDIR,kv_cache=quanto-4bit,max_length=4352 \\
        --tasks niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,ruler_cwe,ruler_fwe \\
        --metadata '{"max_seq_lengths":[4096]}' --limit 10 --batch_size 1 --device cpu

(TOKDIR: ``python eval/ruler.py --model qwen2.5-0.5b --tokenizer-dir`` prints it; ``eval/ruler.py`` runs the
same with resumable rows, KV bytes and a table.)

How lm-eval 0.4.13 finds models: only through its registry
(``lm_eval.api.registry.model_registry``), filled from the hard-coded
``lm_eval.models.MODEL_MAPPING`` plus whatever ``@register_model`` classes have been
*imported*. It reads no entry points (nothing in lm_eval 0.4.13 calls
``importlib.metadata.entry_points``; the registry merely accepts EntryPoint objects if someone
registers them), and ``--include_path`` is for task YAMLs only. So the plain ``lm-eval``
command cannot see ``lowrank``; run lm-eval's CLI through this module, which registers the
type and adds ``--include_path eval/tasks`` (the local perplexity tasks) unless given::

    python -m lowrank_attn.lm_eval_model --model lowrank \\
        --model_args pretrained=runs/smollm2-50pct,max_length=2048 \\
        --tasks wikitext2-local --batch_size 1 --device cpu

(arguments are exactly ``lm-eval``'s). From Python: ``import lowrank_attn.lm_eval_model`` before
``lm_eval.simple_evaluate(model="lowrank", ...)``.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m`: register through the real module (not a __main__ copy), run lm-eval
    import sys

    from lowrank_attn.lm_eval_model import main

    sys.exit(main())

import logging
import sys
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .errors import LowrankAttnError, ModelLoadError

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_device(device) -> str:
    if device is None or str(device) == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using cpu", device)
        return "cpu"
    return device


def _resolve_dtype(dtype):
    """torch dtype, or None for "keep what the loader gives" (None / "auto")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(_DTYPES)}") from None


def _unpack(loaded, source: str):
    """(model, tokenizer) from whatever a loader returned: an object with .model/.tokenizer,
    a (model, tokenizer) pair, or a bare model (tokenizer then read from ``source``)."""
    if hasattr(loaded, "model") and hasattr(loaded, "tokenizer"):
        return loaded.model, loaded.tokenizer
    if isinstance(loaded, (tuple, list)) and len(loaded) >= 2:
        return loaded[0], loaded[1]
    from transformers import AutoTokenizer

    return loaded, AutoTokenizer.from_pretrained(source)


def load_for_eval(pretrained: str, *, device=None, dtype=None):
    """(model, tokenizer): a compressed checkpoint (``checkpoint.load_compressed``) if ``pretrained``
    is a directory with ``lowrank_attn.json``, else whatever ``models.load_model`` resolves
    ``pretrained`` to (fp32 unless ``dtype`` says otherwise)."""
    device, dtype = _resolve_device(device), _resolve_dtype(dtype)
    from . import checkpoint

    path = Path(str(pretrained))
    if checkpoint.is_checkpoint(path):
        model, tok = _unpack(checkpoint.load_compressed(str(path), device=device), str(path))
        if dtype is not None:
            model = model.to(dtype)
        return model.eval(), tok
    from .models import load_model

    lm = load_model(str(pretrained), device=device, dtype=dtype or torch.float32)
    return lm.model, lm.tokenizer


@register_model("lowrank")
class LowrankLM(HFLM):
    """HFLM over a model loaded by lowrank-attn (see the module docstring)."""

    def __init__(self, pretrained, tokenizer=None, device=None, dtype=None, add_bos_token=None, kv_cache=None,
                 prefill=None, **kwargs):
        kv_cache = check_kv_cache(kv_cache)  # refuse a bad name before loading anything
        if isinstance(pretrained, str):
            model, tok = load_for_eval(pretrained, device=device, dtype=dtype)
            self.lowrank_source = pretrained
        else:  # already a model object: as HFLM, but with our add_bos_token default
            model, tok = pretrained, tokenizer
            if tok is None:
                raise ModelLoadError("LowrankLM(pretrained=<model object>) needs tokenizer=")
            self.lowrank_source = type(pretrained).__name__
        if tokenizer is not None and not isinstance(tokenizer, str):
            tok = tokenizer
        if add_bos_token is None:
            from .texts import bos_prefix

            add_bos_token = bool(bos_prefix(tok))
        if kv_cache and any(getattr(m, "lowrank_plan", None) is not None for m in model.modules()):
            raise ModelLoadError(f"kv_cache={kv_cache}: {self.lowrank_source} is a compressed model, which keeps its "
                                 "own low-rank K cache; use kv_cache= with an uncompressed model")
        if kv_cache:  # a model the peer cannot take (sliding-window layers): refused before any request
            from .peers import check_model

            check_model(kv_cache, model)
        self.kv_cache = kv_cache
        if prefill:
            from .runtime.surgery import set_prefill

            try:
                set_prefill(model, prefill)
            except ValueError as e:
                raise ModelLoadError(f"prefill={prefill}: {self.lowrank_source}: {e}") from None
        super().__init__(pretrained=model, tokenizer=tok, add_bos_token=add_bos_token, **kwargs)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.kv_cache:  # a fresh peer cache per generate() call, as a QuantizedCache user passes it
            from .peers import make_cache

            generation_kwargs["past_key_values"] = make_cache(self.kv_cache, self.model)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        info = {**super().get_model_info(), "lowrank_attn_source": self.lowrank_source}
        if self.kv_cache:
            info["kv_cache"] = self.kv_cache
        from .runtime.surgery import prefill_of

        if prefill := prefill_of(self.model):  # None: not a compressed model
            info["prefill"] = prefill
        return info


def check_kv_cache(name) -> str | None:
    """``kv_cache=`` as a known peer name whose backend package is installed (None / "" / "none": no peer);
    anything else is refused in one line (``PeerUnavailableError``)."""
    if name is None or str(name).strip().lower() in ("", "none", "dense"):
        return None
    from .peers import check_peer

    name = str(name).strip()
    check_peer(name, any_length=True)  # it generates from lm-eval's prompts, of any length
    return name


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line with the ``lowrank`` model type registered and
    ``--include_path eval/tasks`` added (unless an --include_path is given)."""
    from lm_eval.__main__ import cli_evaluate

    from .evaluate import TASKS_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    wants_tasks = not args or args[0] in ("run", "ls", "validate") or args[0].startswith("-")
    if wants_tasks and not {"-h", "--help"} & set(args) and not any(a.startswith("--include_path") for a in args) and TASKS_DIR.is_dir():
        args += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except LowrankAttnError as e:  # ours (bad kv_cache=, missing backend, unloadable model): one line, no traceback
        print(f"lowrank-attn-lm-eval: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0
