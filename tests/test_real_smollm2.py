"""SmolLM2-135M on the shared Gutenberg novels: structural facts of the analysis (no
hard-coded spectra), and the installed console script end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(smollm2, gutenberg_files):
    from lowrank_attn.analysis import analyze

    return analyze(smollm2, [str(f) for f in gutenberg_files], seq_len=512, max_tokens=8192, progress=False)


def _kv_heads(rep):
    return [h for layer in rep["layers"] for h in layer["kv_heads"]]


def test_structure(report, gutenberg_files):
    lay = report["model"]["layout"]
    assert (lay["num_layers"], lay["num_kv_heads"], lay["num_heads"], lay["head_dim"]) == (30, 3, 9, 64)
    assert report["model"]["model_type"] == "llama"
    assert len(report["layers"]) == 30
    assert all(len(layer["kv_heads"]) == 3 for layer in report["layers"])
    assert all(len(h["query_heads"]) == 3 for h in _kv_heads(report))
    assert report["seq_len"] == 512 and report["tokens"] <= 8192
    names = [f.stem for f in gutenberg_files]
    assert len(names) == 8
    assert [t["name"] for t in report["texts"]] == names
    assert all(t["tokens"] >= 512 for t in report["texts"])
    assert sum(t["tokens"] for t in report["texts"]) == report["tokens"]
    for h in _kv_heads(report):
        assert set(h["per_text"]) == set(names)
    assert [r["text"] for r in report["summary"]] == names + ["pooled"]


def test_energy_spectra_sum_to_one(report):
    for h in _kv_heads(report):
        for key in ("logit_field", "weights"):
            e = h[key]["energy"]
            assert len(e) == 64
            assert min(e) >= 0 and abs(sum(e) - 1.0) < 1e-9
            assert all(a >= b - 1e-12 for a, b in zip(e, e[1:]))  # descending
            assert 1 <= h[key]["r90"] <= h[key]["r99"] <= 64


def test_logit_field_lower_rank_than_weights(report):
    """The paper's finding, as a fraction rather than numbers: E~ needs fewer components
    than W_Q^T W_K for 90% of its energy in (nearly) every KV head."""
    heads = _kv_heads(report)
    below = sum(h["logit_field"]["r90"] < h["weights"]["r90"] for h in heads)
    assert below >= 0.8 * len(heads), f"{below}/{len(heads)}"
    assert report["summary"][-1]["heads_below_weights"] == below


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "lowrank-attn"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lowrank-attn")
    return [found] if found else [sys.executable, "-c", "from lowrank_attn.cli import entry; entry()"]


def test_console_script(smollm2, gutenberg_files, tmp_path):
    text = min(gutenberg_files, key=lambda f: f.stat().st_size)
    out = tmp_path / "res"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*_cli(), "analyze", "smollm2-135m", "--text", str(text), "--max-tokens", "2048", "--seq-len", "512",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("spectra.json", "summary.csv", "summary.md", "energy_curves.png", "r90_heatmap.png",
                 "r90_per_text.png"):
        assert (out / name).is_file(), name
    assert "| text | tokens |" in proc.stdout and f"| {text.stem} |" in proc.stdout and "| pooled |" in proc.stdout
    rep = json.loads((out / "spectra.json").read_text())
    assert rep["tokens"] == 2048 and rep["model"]["name"] == "smollm2-135m"
