"""Behaviour pinned across refactors: tiny models compressed with fixed seeds, single-threaded, give checkpoint
directories whose files hash to the values recorded below (first on the code before the ``h5-rooms`` refactor;
re-recorded once since, when the statistics forward began to use the attention output it computes anyway instead
of attending a second time: the same attention, summed in another order, so the maps moved at rounding level;
and when quantised values began to be cached in a rotated basis by default, ``v_rotation: output``; the sidecars again when the recipe gained ``max_kv_fraction``; the cards when they gained the serving note on ``set_prefill``, and when it said prompts attend exactly by default; config, sidecar and card when quantisation ranges became a recorded choice, ``quant_clip``: the weights did not move).

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
        'README.md': 'a5dcec1dbda87ce9bb71fa2a3331ff9e36c68b89f1d3e4e2a7b8e5c616ab92f1',
        'config.json': '09d005e1a20923eca626b85cbe7c864a1653e43e9098bd76fa03dae4e0bdfc7b',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'aae956b02ba01a4e673fc980d2710d7554dbc89b24c2e0f70abe175f5ff7700b',
        'model.safetensors': 'bf4feaf797f455be7db9e86d9630beb47b248129f8b6fa8172702dc9b822c6fe',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'gpt2-bilinear': {
        'README.md': '40556dc979efbb3da4ab5770f5de1e14abcffbc796b7ac76533c1dfa1e403267',
        'config.json': '1a8ba1f0d2ea0b96901bdedde5251e28c4a8cf496547b37e765cd39ae4368f61',
        'generation_config.json': '7935217cf7036f3b825348d658d42ee1d3fb802b06b480c9d620bc81c3ea42f6',
        'lowrank_attn.json': '858849303f9bce83f93930c0bb2dd04aa66fd3bdf2e135779528a84668602a78',
        'model.safetensors': '20fdc05f48d9c789c9b1655975bdc0c0aba0e7fc49c6275ab8036604712ede16',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-rope-pairs': {
        'README.md': '01621aadc46030f791b37e745482515941f6095c2ee88358326de487ccaf1db9',
        'config.json': 'f7ba29575ace02225839934e4326769f23428adc90ec3be702bf58872be6a0d9',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '49b9e821b6532fec8d6c7ac4deda573f3e29868245a0c4441ba19b6119d7b843',
        'model.safetensors': 'd45222c4ff0ac8b82de065e62bea121620d27716a5d58ac3290df2035ec81df8',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-values': {
        'README.md': '2d644c113fbac02268faa613e7008991f1ca4340c8abff16ff727019777df3d1',
        'config.json': '892965bb9f14a0e2b22783a909e1b394f099b6471c1188cc440a9edccee67d8a',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '008fe9ac02ee38cf8f7991c6b364963cb351f849cb050c9ae5520072f5a31baf',
        'model.safetensors': '48ae0e4f0882ec4564141b9a60247087e2e7e3f19c0150931eb2a491a54277bc',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-k4': {
        'README.md': '23ba9c2e673a6d86bd0ad921ec0bd29c3c25326044457c36e96ab4a21f3372d1',
        'config.json': 'f7914fc6827cd75a009bf0f92b61abc7aac8f8e33f36add26a7567684262ad26',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'd3ec9b2342d2c1a65638437052f64807cad0637053b18da61cdd23f55c2444e2',
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
