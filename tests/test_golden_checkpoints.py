"""Behaviour pinned across refactors: tiny models compressed with fixed seeds, single-threaded, give checkpoint
directories whose files hash to the values recorded below (first on the code before the ``h5-rooms`` refactor;
re-recorded once since, when the statistics forward began to use the attention output it computes anyway instead
of attending a second time: the same attention, summed in another order, so the maps moved at rounding level;
and when quantised values began to be cached in a rotated basis by default, ``v_rotation: output``; the sidecars again when the recipe gained ``max_kv_fraction``; the cards when they gained the serving note on ``set_prefill``, and when it said prompts attend exactly by default; config, sidecar and card when quantisation ranges became a recorded choice, ``k_clip``/``v_clip``: the weights did not move).

Two things in a checkpoint legitimately follow the package's source, not its behaviour, and are checked
differently: the runtime modules it carries verbatim (``runtime/*.py``: the directory must hold exactly the
package's current runtime files, byte for byte) and the model card's total-size row (it adds those files' sizes),
which is dropped from README.md before hashing. Everything else — weights, config.json, the sidecar with the
report, tokenizer files, the rest of the card — must hash as recorded.

To re-record after an intended behaviour change: ``LOWRANK_ATTN_RECORD_GOLDEN=1 pytest tests/test_golden_checkpoints.py -s``
prints the new table.
"""

from __future__ import annotations

import hashlib
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

GOLDEN: dict[str, dict[str, str]] = {
    'llama-post-rope-default': {
        'README.md': '8b777795f210ae23b552de8983d6f6ffdb287ba817779b4e51a1606e819f4cbe',
        'config.json': '3624a669d8fe383c16dfa2ffbe6e8753dc82e264740b58d3497317d1e8a90c95',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'e0dfcc095bf05d763d424385bc100258e8eaaeadd08de8b1622ec0927010476c',
        'model.safetensors': 'bf4feaf797f455be7db9e86d9630beb47b248129f8b6fa8172702dc9b822c6fe',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'gpt2-bilinear': {
        'README.md': 'ad03d00ce489ffe35eee3c41a232ccf945079f0fa0ec3928311c7762cf0332d6',
        'config.json': 'd2b6667d3bb42293cdd1aa54b5519c6dda7ff2c1d7ffcb71bf2807b2e135f50d',
        'generation_config.json': '7935217cf7036f3b825348d658d42ee1d3fb802b06b480c9d620bc81c3ea42f6',
        'lowrank_attn.json': '499bb8ff0ff9841e69139f458f7ed4e5f35235f423ef696445f85b9f40591f74',
        'model.safetensors': '20fdc05f48d9c789c9b1655975bdc0c0aba0e7fc49c6275ab8036604712ede16',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-rope-pairs': {
        'README.md': '4996297778bc08608f2257185a84e4b1a4a59afa084a1993beece15d78342512',
        'config.json': 'e5226499e5b44d9559101733a2facc9d2daf2b20d12b54156d290934cefc54ea',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '9f937544cabeeff2a401d2aca1ceadfa29599d2c2ced58da7a57ff6fbcd6ec44',
        'model.safetensors': 'd45222c4ff0ac8b82de065e62bea121620d27716a5d58ac3290df2035ec81df8',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-values': {
        'README.md': 'a203e5ecdc5b7c13d2222b77e0c8c12ce02b72c734cc839d2f5e8e7de99bc2b8',
        'config.json': '2cf22b6b7e3af67d1ea8518638c53ca0e200c31ef3be46053b95cc1bf5d24000',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '7e29524b43580d801ea49995823cd2f47724604043c37dad70dcf3f189f35e3c',
        'model.safetensors': '48ae0e4f0882ec4564141b9a60247087e2e7e3f19c0150931eb2a491a54277bc',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-k4': {
        'README.md': 'bb1974b8147d8bd6057d17bfb99e8e68d2b9215daca50947fc74878b66ea4d6f',
        'config.json': 'bca5fa83e03a69ebc7e906d60dbaa34d41ed9ee3718a7ea3d0a47dc388cb23b5',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '507af44f2525b3d648cf2c68e8bad7a131b372cf2a7c257965b24331bd22eb27',
        'model.safetensors': 'bf4feaf797f455be7db9e86d9630beb47b248129f8b6fa8172702dc9b822c6fe',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
}


def _hashes(directory: Path, text: str) -> dict[str, str]:
    runtime = {p.name for p in runtime_files()}
    out = {}
    for p in sorted(directory.iterdir()):
        if p.name in runtime:
            continue
        data = p.read_bytes()
        if p.suffix in (".json", ".md"):  # the recipe records the text's path: where this checkout is
            data = data.decode("utf-8").replace(text, "TEXT")
            data = (CARD_SIZE_ROW.sub("", data) if p.name == "README.md" else data).encode("utf-8")
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_bytes_unchanged(name, alice_text, tmp_path):
    kind, fields = CASES[name]
    recipe = Recipe(model=kind, text=[alice_text], **SMALL, **fields)
    lm, report = compress(load_model(kind), recipe, progress=False)
    out = save_compressed(lm, report, tmp_path / name)
    for f in runtime_files():  # the runtime travels verbatim, and nothing else named like it
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    got = _hashes(out, alice_text)
    if os.environ.get("LOWRANK_ATTN_RECORD_GOLDEN") == "1":
        print(f"    {name!r}: {{")
        for k, v in got.items():
            print(f"        {k!r}: {v!r},")
        print("    },")
        return
    assert got == GOLDEN[name]
