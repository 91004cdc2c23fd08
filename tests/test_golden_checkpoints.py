"""Behaviour pinned across refactors: tiny models compressed with fixed seeds, single-threaded, give checkpoint
directories whose files hash to the values recorded below (first on the code before the ``h5-rooms`` refactor;
re-recorded once since, when the statistics forward began to use the attention output it computes anyway instead
of attending a second time: the same attention, summed in another order, so the maps moved at rounding level).

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
        'README.md': 'cd4093f8e8fd984186663a6e3738a0b36e0260db51a53e43e12d8de3bba65da4',
        'config.json': '11251c767230dfd21cddc2bcd159c6ebd5c0f2d138592b20cda04d338a2ec019',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '150141e342f3fd92f920e4c9cc460cc1b13de7a062e9f8620ab5317674009b44',
        'model.safetensors': 'c222320d07466c2bf9d7551236d9d0c5cf50a6ca2723afe13be268c6752f74c8',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'gpt2-bilinear': {
        'README.md': 'd4de6d8ef6f5ac2a10dc1eb8c89fd801882d9f41ffbe315ba40c68d50cafface',
        'config.json': '3d46968438da4aa07a51a0714a14b8299b35bb9006c7b418b655cebb758da677',
        'generation_config.json': '7935217cf7036f3b825348d658d42ee1d3fb802b06b480c9d620bc81c3ea42f6',
        'lowrank_attn.json': '9a71262ea04a30f4cae1a73863f2a69757c0917796182aaf729c0e6c72ad2144',
        'model.safetensors': 'a03f3ac9f212aab459ed02f2f4e94bb06c86cd78468874dc0753cce06e2f861d',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-rope-pairs': {
        'README.md': '0a6ada22214cff8e9ef5a1c979c69f731ef38c4a0a38baf6babbbbfbc8ed136d',
        'config.json': '1e32f7bddf4ccba572f0cfb7278cf0550d6c3e6a6842a0c4e7c682213f4fbfe9',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'b4d7ff847e9dc1cc6b65bda2de7972853d91a5ea6adb36cedb346829411504eb',
        'model.safetensors': '3ee120a58ec9022053b9a87a4cd0953e24672cd1a5827f8883f5122928a1ee92',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-values': {
        'README.md': 'c604a8f11bf020b4c0bf246e6672b152a96f980ebfbae23e7d052b131d1c953c',
        'config.json': '67dc74059cf9e004ccf1fe8f58c10817615518e941f2bf5f4779193ac03d433c',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'a14fbfe91c0c0616acc586dc6e540d5a30b4f06273aeb0ac09f69550737e4f1b',
        'model.safetensors': 'e0a32391f00700291697917e6260544102373e4cb50c66b825bd775d1385f12e',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-k4': {
        'README.md': '15006abd23280bded6600c14dedcaa7af9d9e921806100ff9f4cb22239811694',
        'config.json': '9d1f0d323cb25d1634f315bcfcddc30bb94268221ac521bba3d92bfbc41d8441',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'af7edc004255ec0dad520d385acc1daf263aa353f5c02d2ab5e272b5c46b4bb8',
        'model.safetensors': 'c222320d07466c2bf9d7551236d9d0c5cf50a6ca2723afe13be268c6752f74c8',
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
