"""Behaviour pinned across refactors: tiny models compressed with fixed seeds, single-threaded, give checkpoint
directories whose files hash to the values recorded below (on the code before the ``h5-rooms`` refactor).

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
        'README.md': '5f25e88b6de16b9fcb4cf067390e951c95ea821c08396b4240d1a9b59f96ddcf',
        'config.json': '237c04bc881bbf124649cdfd099b4f186fb53645d222d145574a270306dc71d9',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'd7deb5665eef1ba2f4fca68e9b520eadc6dc26b16c1d80342340256b114d36c8',
        'model.safetensors': '70cdfda125ed71526ac3341d00a0a660459ed1f609366d9015f3e88ccdecf5b4',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'gpt2-bilinear': {
        'README.md': '5ce083f730e4cabfcc892ab87f016e8ca03d7489a60a2aa2d2dcbb985ab688d8',
        'config.json': '68e48c7c0f12adcf1ac16a3a8d79cb903190b8e115fbef8eeec7bf26efce014e',
        'generation_config.json': '7935217cf7036f3b825348d658d42ee1d3fb802b06b480c9d620bc81c3ea42f6',
        'lowrank_attn.json': 'e4f20e086a23ae8326fa009a41951f29d33c5589aad0b60fd185d9931e4f889b',
        'model.safetensors': '68db971246d3cab08a312d8a456fe942ad41f415b4b22a8c5a3e8db6351484bc',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-rope-pairs': {
        'README.md': '86770019b43328e3ff345d90a63d4560166ebfc4e66e43cf824ccbd27bae06f0',
        'config.json': '161deee095d940ea6a470cfbc17efe408dea6d108300f8d7980f6935757ae552',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '4f73d0e09fbf43269f1c7e73e31210f5cecfaa4cd5bdc3fecc642f1efeab5d36',
        'model.safetensors': '3ee120a58ec9022053b9a87a4cd0953e24672cd1a5827f8883f5122928a1ee92',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-values': {
        'README.md': '700e3f12fa253241894c7a989f2dadb60ac0871ab7e05748f7e048f8d288a5f1',
        'config.json': '09668740877c0c86588b785206a6bff756a14361c3f7da2faead7dbe4600f415',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': 'fc598616b3b3dbf9118932aaad4dd1b3ada1536b02043c708f299c7068c7646e',
        'model.safetensors': 'cfa044077fbb83c8e1c12d2c179a09075810e622ef3d32858efa294a9f7ed72d',
        'tokenizer.json': 'bea2e79349ab521c9c009d0e9a6f37b9c899d0eb8e327aca3528fb4d5d2e31e8',
        'tokenizer_config.json': '8f6eac11903033bfce80864a81a569038f461d8f0a792294fb27eeb34f213900',
    },
    'llama-k4': {
        'README.md': '60b8633b1afd261def2001a7943bea2e31607662b89dfe1de7f6cbf54b3e4255',
        'config.json': 'f0c0a5fda0bf4bad4212a22d2c363f7e7126ed6313a621281fedfcc7e35830dd',
        'generation_config.json': '994c63f78da578edc6656f96d18e6835c268530f1283d279c298217787d97096',
        'lowrank_attn.json': '8fb05297e6f8a763bffd0ee9c7eaf3c3eeebf276c1bb1fbc697f20d33ccf6391',
        'model.safetensors': '70cdfda125ed71526ac3341d00a0a660459ed1f609366d9015f3e88ccdecf5b4',
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
