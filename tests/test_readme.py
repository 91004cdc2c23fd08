"""README.md is a user's document whose every command runs.

(a) Shape: at most 300 lines, no issue references (``#12``) and no references to documents outside the repository
    ("DESIGN"); the first ```bash block is the CI rule's two commands, the install part byte-identical to .ci/run.
(b) Every line of a ```bash block that starts with ``lowrank-attn`` or ``python`` is either run here on a tiny model
    (``TINY`` below: the README's line -> what this test runs) or listed verbatim in ``eval/readme_commands.sh``,
    the long check that runs the expensive ones as written. The README's ```python blocks run here on a tiny
    checkpoint (``PY_SUBS``), its ```yaml blocks must be valid recipes.
(c) ``lowrank-attn CMD --help`` for every command the README names: each flag the README gives it exists.

Substitutions (only these; everything else runs as written): the model ``smollm2-135m`` / ``qwen2.5-0.5b`` ->
``tiny-llama``; ``runs/`` -> a temporary directory; tiny token counts (``TINY_TOKENS``: 128-token windows, 1024
calibration + 256 held-out tokens; analyze ``--max-tokens 512`` and ``--no-plots``; passkey ``--max-length 512``);
the ``--text`` glob of the shared novels -> ``tests/data/public-domain.txt`` (shipped, small).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LONG_CHECK = ROOT / "eval" / "readme_commands.sh"
TINY_TOKENS = ["--seq-len", "128", "--max-tokens", "1024", "--heldout-tokens", "256"]

# README line -> the arguments this test runs (after `lowrank-attn`), on tiny-llama. "{runs}" is a temp directory.
TINY = {
    "lowrank-attn compress smollm2-135m --out runs/smollm2":
        ["compress", "tiny-llama", "--out", "{runs}/smollm2", *TINY_TOKENS],
    "lowrank-attn analyze smollm2-135m --max-tokens 8192 --out runs/smollm2-spectra":
        ["analyze", "tiny-llama", "--max-tokens", "512", "--out", "{runs}/smollm2-spectra", "--no-plots"],
    "lowrank-attn compress smollm2-135m --rank-ratio 0.75 --text '../shared/data/gutenberg-*.txt' --save-dtype float32 "
    "--out runs/smollm2-r75":
        ["compress", "tiny-llama", "--rank-ratio", "0.75", "--text", "tests/data/public-domain.txt", "--save-dtype",
         "float32", "--out", "{runs}/smollm2-r75", *TINY_TOKENS],
    "lowrank-attn compress qwen2.5-0.5b --max-kl 0.02 --v-bits 3,4 --out runs/qwen-kl":
        ["compress", "tiny-llama", "--max-kl", "0.02", "--v-bits", "3,4", "--out", "{runs}/qwen-kl", *TINY_TOKENS],
    "lowrank-attn compress qwen2.5-0.5b --max-kv-fraction 0.185 --v-bits 3,4 --k-group 64 --v-group 64 --out "
    "runs/qwen-kv0185":  # tiny: 16-dim heads, so 0.4 of the bytes and groups of 16
        ["compress", "tiny-llama", "--max-kv-fraction", "0.4", "--v-bits", "3,4", "--k-group", "16", "--v-group", "16",
         "--out", "{runs}/qwen-kv0185", *TINY_TOKENS],
    "lowrank-attn eval runs/smollm2 --task passkey --max-length 8192 --depths 8 --dense smollm2-135m":
        ["eval", "{runs}/smollm2", "--task", "passkey", "--max-length", "512", "--depths", "8", "--dense", "tiny-llama"],
}
# The ```python blocks: these substitutions, in order, then run (after the commands above wrote {runs}/smollm2).
PY_SUBS = [("runs/", "{runs}/"), ('"smollm2-135m"', '"tiny-llama"'),
           ("Recipe(rank_ratio=0.75)", "Recipe(rank_ratio=0.75, seq_len=128, max_tokens=1024, heldout_tokens=256)")]


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", _text(), re.S | re.M)


def _commands() -> list[str]:
    """Lines of ```bash blocks starting with lowrank-attn or python (continuations joined, trailing comments cut)."""
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if re.match(r"(lowrank-attn|python)\b", line):
                cmds.append(re.sub(r"\s+", " ", line))
    return cmds


def _ci_lines() -> tuple[str, str]:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install = next(line for line in ci if line.startswith("python -m venv"))
    test = next(line for line in ci if "python -m pytest" in line)
    return install, test


def _long_check() -> set[str]:
    return {line.strip() for line in LONG_CHECK.read_text().splitlines()}


# (a) ------------------------------------------------------------------------------------------------------------

def test_readme_shape():
    text = _text()
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300)"
    assert not re.search(r"#\d", text), re.findall(r".{0,40}#\d+.{0,20}", text)
    assert not re.search(r"\bissues?\b", text, re.I), "README names issues"
    assert "DESIGN" not in text, "README refers to DESIGN, which is not in the repository"


def test_first_lines_are_the_ci_commands():
    """The CI rule: the first lines give (1) install + the main job and (2) the test command; .ci/run installs
    exactly as (1)'s install part says and runs (2)."""
    lines = _text().splitlines()
    assert lines[0].startswith("# ") and lines[2] == "```bash", lines[:3]
    install, test = _ci_lines()
    first, second = lines[3], lines[4]
    assert first.startswith(install + " && "), f"README install part differs from .ci/run's:\n{first}\n{install}"
    assert first[len(install) + 4:] == "lowrank-attn compress smollm2-135m --out runs/smollm2"
    assert second == test.strip()


def test_runtime_files_listed():
    """The checkpoint's runtime files are every *.py of lowrank_attn/runtime/ except __init__.py."""
    row = next(line for line in _text().splitlines() if "every `*.py` of `lowrank_attn/runtime/`" in line)
    listed = set(re.findall(r"`(\w+\.py)`", row.split("| every")[0]))
    actual = {p.name for p in (ROOT / "lowrank_attn" / "runtime").glob("*.py")} - {"__init__.py"}
    assert listed == actual


# (b) ------------------------------------------------------------------------------------------------------------

def test_every_command_is_checked():
    install, _ = _ci_lines()
    listed = _long_check()
    unchecked = []
    for cmd in _commands():
        if cmd.startswith(install + " && "):
            cmd = cmd[len(install) + 4:]  # the install part is what .ci/run runs
        if cmd not in TINY and cmd not in listed:
            unchecked.append(cmd)
    assert not unchecked, ("README commands neither run by tests/test_readme.py (TINY) nor listed verbatim in "
                           f"eval/readme_commands.sh: {unchecked}")
    stale = set(TINY) - set(_commands()) - {"lowrank-attn compress smollm2-135m --out runs/smollm2"}
    assert not stale, f"TINY names commands the README no longer has: {stale}"


def test_long_check_lists_only_readme_commands():
    cmds = set(_commands()) | {c.split(" && ")[-1] for c in _commands()}
    inline = set(re.findall(r"`((?:lowrank-attn|python) [^`]+)`", _text()))
    for line in _long_check():
        if re.match(r"(lowrank-attn|python eval/)", line):
            assert line in cmds or line in inline, f"eval/readme_commands.sh runs {line!r}, which the README lacks"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def cli(runs):
    import os

    from typer.testing import CliRunner

    from lowrank_attn.cli import app

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def invoke(args):
        args = [a.replace("{runs}", str(runs)) for a in args]
        res = CliRunner().invoke(app, args, catch_exceptions=False)
        assert res.exit_code == 0, f"lowrank-attn {' '.join(args)} -> {res.exit_code}\n{res.output[-3000:]}"
        return res.output

    return invoke


@pytest.fixture(scope="module")
def tiny_runs(cli, runs, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)
    outputs = {}
    for line, args in TINY.items():  # in order: the first writes the checkpoint the last evaluates
        outputs[line] = cli(args)
    return outputs


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tiny_commands_run(tiny_runs, runs):
    out = tiny_runs["lowrank-attn compress smollm2-135m --out runs/smollm2"]
    assert f"wrote checkpoint {runs}/smollm2" in out  # what the README says compress ends with
    assert "fidelity:" in tiny_runs["lowrank-attn compress qwen2.5-0.5b --max-kl 0.02 --v-bits 3,4 --out runs/qwen-kl"]
    assert "the lowest KL of the points that fit" in tiny_runs[next(c for c in TINY if "--max-kv-fraction" in c)]
    assert "weights float32" in tiny_runs[next(c for c in TINY if "--save-dtype float32" in c)]
    assert (runs / "smollm2-spectra" / "spectra.json").is_file()
    assert "KV cache vs a bf16 dense cache" in out  # the K + V size the README says compress prints


def test_python_blocks_run(tiny_runs, runs):
    blocks = _blocks("python")
    assert blocks, "README has no python block"
    for code in blocks:
        for old, new in PY_SUBS:
            code = code.replace(old, new)
        code = code.replace("{runs}", str(runs))
        exec(compile(code, "README.md python block", "exec"), {})


def test_yaml_blocks_are_recipes():
    import yaml

    from lowrank_attn import Recipe

    blocks = _blocks("yaml")
    assert blocks
    for block in blocks:
        Recipe.from_dict(yaml.safe_load(block))


# (c) ------------------------------------------------------------------------------------------------------------

def _help(cmd: str | None) -> str:
    from typer.testing import CliRunner

    from lowrank_attn.cli import app

    res = CliRunner().invoke(app, ([cmd] if cmd else []) + ["--help"], terminal_width=250,
                             env={"COLUMNS": "250", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    return res.output


def test_flags_exist():
    text = _text()
    named = set(re.findall(r"lowrank-attn (analyze|compress|eval|sweep)\b", text))
    helps = {cmd: _help(cmd) for cmd in named}
    helps[None] = _help(None)
    assert named == {"analyze", "compress", "eval", "sweep"}
    missing = []
    for cmd in _commands():  # flags on a command line: that command's
        m = re.search(r"lowrank-attn (analyze|compress|eval|sweep) (.*)$", cmd)
        if m:
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
                if flag not in helps[m.group(1)]:
                    missing.append((m.group(1), flag))
    # flags in the prose (outside code blocks): some command's, or pip's --no-deps
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    prose = re.sub(r"`python [^`]*`", "", prose)  # inline eval/ script commands: their own flags
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", prose)) - {"--no-deps"}:
        if not any(flag in h for h in helps.values()):
            missing.append(("any", flag))
    assert not missing, f"flags the README mentions but --help lacks: {missing}"


def test_help_keeps_bracketed_text():
    """typer renders help as rich markup, where ``[word]`` is a style tag and vanishes ('pip install -e .[ruler]'
    printed as '.'): every bracketed word a command's or an option's help holds must reach the rendered --help."""
    import typer.main

    from lowrank_attn.cli import app

    group = typer.main.get_command(app)
    lost = []
    for name, cmd in group.commands.items():
        shown = " ".join(_help(name).split())
        texts = [("the command", cmd.help)] + [(p.name, getattr(p, "help", None)) for p in cmd.params]
        for what, text in texts:
            for tag in re.findall(r"\[[A-Za-z_/][^\]\s]*\]", text or ""):
                if tag not in shown:
                    lost.append((name, what, tag))
    assert group.commands
    assert not lost, f"help text that rich markup swallows (write it without [word]): {lost}"
