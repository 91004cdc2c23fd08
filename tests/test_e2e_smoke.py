"""End-to-end smoke path on the real SmolLM2-135M, through the installed console script:
analyze → compress (50%) → load with stock transformers (trust_remote_code) and generate →
lm-eval perplexity of the checkpoint. Prints the time of each stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _cli(*args, timeout=900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lowrank-attn")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "lowrank_attn.cli"]), *args]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"[stage] lowrank-attn {args[0]}: {time.time() - t:.1f} s")
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_smoke_analyze_compress_load_eval(smollm2, gutenberg_files, shared_data, tmp_path):
    alice = str(shared_data / "gutenberg-alice-in-wonderland.txt")
    res = _cli("analyze", "smollm2-135m", "--text", alice, "--max-tokens", "2048", "--seq-len", "512",
               "--out", str(tmp_path / "spectra"), "--no-plots")
    assert "r90 of E~" in res.stdout and (tmp_path / "spectra" / "spectra.json").is_file()

    ckpt = tmp_path / "ckpt"
    res = _cli("compress", "smollm2-135m", "--rank-ratio", "0.5", "--text", alice, "--seq-len", "512",
               "--max-tokens", "2048", "--heldout-tokens", "512", "--out", str(ckpt))
    assert "bound violations 0" in res.stdout
    side = json.loads((ckpt / "lowrank_attn.json").read_text())
    assert abs(side["summary"]["mean_rank_ratio"] - 0.5) < 0.02

    import torch
    from transformers import AutoModelForCausalLM

    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    ids = smollm2.tokenizer("The Queen of Hearts, she made some tarts,", return_tensors="pt").input_ids
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    print(f"[stage] stock transformers load + generate: {time.time() - t:.1f} s")
    assert gen.shape[1] == ids.shape[1] + 12
    assert type(model).__name__ == "LowRankLlamaForCausalLM"

    text = tmp_path / "eval.txt"
    text.write_text((shared_data / "wikitext2-test.raw").read_text()[:6000])
    res = _cli("eval", str(ckpt), "--task", str(text), "--max-length", "512", "--out", str(tmp_path / "eval.json"))
    ppl = json.loads((tmp_path / "eval.json").read_text())["summary"]["word_perplexity"]
    assert 1 < ppl < 500, ppl
