"""Behaviour pinned across refactors: tiny models compressed with fixed seeds, single-threaded, give checkpoint
directories whose files hash to the values recorded below (first on the code before the ``h5-rooms`` refactor;
re-recorded once since, when the statistics forward began to use the attention output it computes anyway instead
of attending a second time: the same attention, summed in another order, so the maps moved at rounding level;
and when quantised values began to be cached in a rotated basis by default, ``v_rotation: output``; the sidecars again when the recipe gained ``max_kv_fraction``; the cards when they gained the serving note on ``set_prefill``, and when it said prompts attend exactly by default; config, sidecar and card when quantisation ranges became a recorded choice, ``k_clip``/``v_clip``: the weights did not move; and when the weights and the sidecar became prints compared within ``FLOAT_RTOL``: on another CPU (AMD EPYC, no AMX) with a fresh install, tiny-gpt2's bilinear weights and every sidecar's float64 statistics moved in their last bits, all else byte-identical; a head's ``predicted_error_per_pair`` was divided by its group's query heads at the same time; the sidecars when the summary gained the long-range copy probe).

Two things in a checkpoint legitimately follow the package's source, not its behaviour, and are checked
differently: the runtime modules it carries verbatim (``runtime/*.py``: the directory must hold exactly the
package's current runtime files, byte for byte) and the model card's total-size row (it adds those files' sizes),
which is dropped from README.md before hashing. Two hold floats that the BLAS build and the CPU move at rounding
level: the weights (their tensor layout exact, Σx² and a weighted sum within ``FLOAT_RTOL``) and the sidecar (its
structure, strings and integers exact, its floats' sum of magnitudes within ``FLOAT_RTOL``). Everything else —
config.json, tokenizer files, the rest of the card — must hash as recorded.

To re-record after an intended behaviour change: ``LOWRANK_ATTN_RECORD_GOLDEN=1 pytest tests/test_golden_checkpoints.py -s``
prints the new table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from lowrank_attn.checkpoint import save_compressed
from lowrank_attn.compression import compress
from lowrank_attn.models import load_model
from lowrank_attn.recipe import Recipe
from lowrank_attn.runtime.modeling_lowrank import runtime_files

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(seq_len=64, max_tokens=512, heldout_tokens=64, seed=0)
CASES = {  # name -> (tiny model, recipe fields)
    "llama-post-rope-default": ("tiny-llama", dict()),
    "gpt2-bilinear": ("tiny-gpt2", dict(mode="bilinear", policy="uniform", rank_ratio=0.5)),
    "llama-rope-pairs": ("tiny-llama", dict(mode="rope-pairs", policy="uniform", rank_ratio=0.5)),
    "llama-values": ("tiny-llama", dict(v_rank_ratio=0.5, v_bits=4)),
    "llama-k4": ("tiny-llama", dict(k_bits=4, k_group=8)),
}
CARD_SIZE_ROW = re.compile(r"^\| checkpoint \|.*\n", re.M)  # total size: includes the runtime files

GOLDEN: dict[str, dict[str, object]] = {
    'llama-post-rope-default': {
        'README.md': 'eaa855dec4c73594b42b2935fa7dfcaa424e9d86116649c893f3ebaca81e540c',
        'config.json': '3624a669d8fe383c16dfa2ffbe6e8753dc82e264740b58d3497317d1e8a90c95',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': {'structure': '592d0830f99e7747', 'floats': 77, 'abs_sum': 12.821188497413038},
        'model.safetensors': {'layout': '1acd8d78ed7fb11f', 'sumsq': 1879.1148598225332, 'wsum': 7.558606742781247},
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'gpt2-bilinear': {
        'README.md': '99ca4ee1cae7960d8934472e6d7565aaa90c5ec8ffaa091bee683419c191ae66',
        'config.json': 'd2b6667d3bb42293cdd1aa54b5519c6dda7ff2c1d7ffcb71bf2807b2e135f50d',
        'generation_config.json': '7935217cf7036f3b825348d658d42ee1d3fb802b06b480c9d620bc81c3ea42f6',
        'lowrank_attn.json': {'structure': '34f094ac455668bf', 'floats': 128, 'abs_sum': 15.133886147622063},
        'model.safetensors': {'layout': 'e872b10b2f39c82f', 'sumsq': 26618.587351038088, 'wsum': -191.33406998442697},
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-rope-pairs': {
        'README.md': 'da992b1546dca9b862a9116be404555122d34b7bf36638e08e5fd9629cce33ce',
        'config.json': 'e5226499e5b44d9559101733a2facc9d2daf2b20d12b54156d290934cefc54ea',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': {'structure': '52f596fca218a824', 'floats': 76, 'abs_sum': 10.062557679293123},
        'model.safetensors': {'layout': 'ecc7d67b406fb92b', 'sumsq': 4112.070671809535, 'wsum': 50.4628338997012},
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-values': {
        'README.md': '43e324030c1e6bd6e2cb581bf14012215e3181b196f08f61704ec5db7e448a03',
        'config.json': '2cf22b6b7e3af67d1ea8518638c53ca0e200c31ef3be46053b95cc1bf5d24000',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': {'structure': '75fa617dc8e8a310', 'floats': 81, 'abs_sum': 15.138150497413042},
        'model.safetensors': {'layout': '04d7d438479c8b14', 'sumsq': 1116.9365071448715, 'wsum': 3.8746354801504017},
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-k4': {
        'README.md': '78448ed02670ef2e4374a094b0743ef362ef1c85970690ed9f89a46f1fe82948',
        'config.json': 'bca5fa83e03a69ebc7e906d60dbaa34d41ed9ee3718a7ea3d0a47dc388cb23b5',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': {'structure': '9dc127e20d81f0b8', 'floats': 77, 'abs_sum': 13.441991837413035},
        'model.safetensors': {'layout': '1acd8d78ed7fb11f', 'sumsq': 1879.1148598225332, 'wsum': 7.558606742781247},
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
}


SIDECAR, WEIGHTS = "lowrank_attn.json", "model.safetensors"
FLOAT_RTOL = 1e-5  # float64 statistics and float32 weights may move at rounding level with the BLAS build and CPU


def _floats(x, out: list) -> object:
    """``x`` with every float replaced by 0.0, the floats appended to ``out`` in order."""
    if isinstance(x, float):
        out.append(x)
        return 0.0
    if isinstance(x, dict):
        return {k: _floats(v, out) for k, v in x.items()}
    if isinstance(x, list):
        return [_floats(v, out) for v in x]
    return x


def _sidecar_print(data: str) -> dict:
    """The sidecar less the hashes of the files pinned on their own: its structure, strings and integers exactly
    (a hash), its floats (the report's float64 statistics) as a count and a sum of magnitudes."""
    doc = {k: v for k, v in json.loads(data).items() if k not in ("weights_sha256", "files_sha256")}
    floats: list[float] = []
    shape = json.dumps(_floats(doc, floats), sort_keys=True)
    return {"structure": hashlib.sha256(shape.encode("utf-8")).hexdigest()[:16], "floats": len(floats),
            "abs_sum": sum(abs(f) for f in floats)}


def _weights_print(path: Path) -> dict:
    """The tensors' names, shapes and dtypes exactly (a hash); their values as Σx² and Σ x_i·cos(i) (float64)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    layout = json.dumps([(k, list(t.shape), str(t.dtype)) for k, t in sorted(tensors.items())])
    sumsq = wsum = 0.0
    for _, t in sorted(tensors.items()):
        x = t.double().flatten()
        sumsq += float((x * x).sum())
        wsum += float((x * torch.cos(torch.arange(x.numel(), dtype=torch.float64))).sum())
    return {"layout": hashlib.sha256(layout.encode("utf-8")).hexdigest()[:16], "sumsq": sumsq, "wsum": wsum}


def _prints(directory: Path, text: str) -> dict[str, object]:
    """Per file: the sha256 of its bytes, or for the weights and the sidecar a print that is exact where behaviour
    is and compared within ``FLOAT_RTOL`` where rounding may move it."""
    runtime = {p.name for p in runtime_files()}
    out = {}
    for p in sorted(directory.iterdir()):
        if p.name in runtime:
            continue
        if p.name == WEIGHTS:
            out[p.name] = _weights_print(p)
            continue
        data = p.read_bytes()
        if p.suffix in (".json", ".md"):  # the recipe records the text's path: where this checkout is
            data = data.decode("utf-8").replace(text, "TEXT")
            data = (CARD_SIZE_ROW.sub("", data) if p.name == "README.md" else data).encode("utf-8")
        out[p.name] = _sidecar_print(data.decode("utf-8")) if p.name == SIDECAR else hashlib.sha256(data).hexdigest()
    return out


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in got.items():
        w = want[name]
        if not isinstance(w, dict):
            assert g == w, name
            continue
        exact = {k: v for k, v in w.items() if isinstance(v, (str, int))}
        assert {k: g[k] for k in exact} == exact, name
        if "sumsq" in w:  # a weighted sum of values: its scale is the values' norm
            assert g["sumsq"] == pytest.approx(w["sumsq"], rel=FLOAT_RTOL), name
            assert abs(g["wsum"] - w["wsum"]) <= FLOAT_RTOL * w["sumsq"] ** 0.5, name
        else:
            assert g["abs_sum"] == pytest.approx(w["abs_sum"], rel=FLOAT_RTOL), name


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_bytes_unchanged(name, alice_text, tmp_path):
    kind, fields = CASES[name]
    recipe = Recipe(model=kind, text=[alice_text], **SMALL, **fields)
    lm, report = compress(load_model(kind), recipe, progress=False)
    out = save_compressed(lm, report, tmp_path / name)
    for f in runtime_files():  # the runtime travels verbatim, and nothing else named like it
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    got = _prints(out, alice_text)
    if os.environ.get("LOWRANK_ATTN_RECORD_GOLDEN") == "1":
        print(f"    {name!r}: {{")
        for k, v in got.items():
            print(f"        {k!r}: {v!r},")
        print("    },")
        return
    _same(got, GOLDEN[name])
