"""Reliability (issue #7): fuzzed command lines and recipes, degenerate numerics, half precision,
determinism, and memory flat in the number of calibration tokens.

Fault injection (kills, Ctrl-C, a full disk) is in test_faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st
from typer.testing import CliRunner

from lowrank_attn.cli import app
from lowrank_attn.errors import LowrankAttnError
from lowrank_attn.recipe import Recipe

pytestmark = pytest.mark.usefixtures("single_thread", "compressed_prefill")
runner = CliRunner()
FIELDS = [f for f in Recipe.__dataclass_fields__]
D = 16  # head_dim of every tiny model


# ================================================================ fuzzing: files the generated arguments point at


SCRATCH: dict[str, Path] = {}


def _reset(root: Path) -> None:
    """(Re)create the scratch directory's bad inputs (a fuzzed --overwrite may have replaced some)."""
    for name in ("a_file", "no_text_dir", "full_dir", "bad_sweep", "empty.txt", "binary.txt"):
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x9c" * 50)
    (root / "a_file").write_text("not a directory\n")
    (root / "no_text_dir").mkdir()
    (root / "full_dir").mkdir()
    (root / "full_dir" / "x").write_text("x")
    (root / "bad_sweep").mkdir()
    (root / "bad_sweep" / "sweep.jsonl").write_text('{"method": "dense", "ratio": null}\n[1, 2]\n')


@pytest.fixture(scope="module")
def fz(tmp_path_factory, alice_text):
    """A scratch directory (the fuzzed commands run in it) with a tiny calibration text, bad inputs
    of every kind, and one small compressed checkpoint (for eval)."""
    root = tmp_path_factory.mktemp("fuzz")
    text = open(alice_text, encoding="utf-8").read()
    (root / "small.txt").write_text(text[20000:22500])  # ~2500 byte tokens: everything that succeeds is quick
    (root / "eval.txt").write_text(text[30000:31200])
    _reset(root)
    SCRATCH["root"] = root
    ck = root / "ckpt"
    res = runner.invoke(app, ["compress", "tiny-llama", "--text", str(root / "small.txt"), "--seq-len", "64",
                              "--max-tokens", "512", "--heldout-tokens", "64", "--exact-window", "8", "--out", str(ck)])
    assert res.exit_code == 0, res.output
    return root


@contextlib.contextmanager
def _cwd(path: Path):
    """Run one fuzzed command inside the scratch directory, its bad inputs fresh."""
    _reset(path)
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


INTS = ["0", "-1", "-7", "1", "16", "64", "2049", "99999999999999999999"]
FLOATS = ["0", "-1", "0.5", "1", "0.25", "1.5", "nan", "-nan", "inf", "-inf", "1e309", "1e-300", "-0.0"]
UNPARSEABLE = ["", " ", "abc", "0x10", "1_0", "--", "1,5"]
INT = st.one_of(st.sampled_from(INTS), st.sampled_from(INTS), st.sampled_from(INTS), st.sampled_from(UNPARSEABLE))
FLOAT = st.one_of(st.sampled_from(FLOATS), st.sampled_from(FLOATS), st.sampled_from(FLOATS), st.sampled_from(UNPARSEABLE))
PATHS = ["small.txt"] * 4 + ["missing.txt", "", "empty.txt", "binary.txt", "no_text_dir", "a_file/x", "*.nothing", "hf:",
         "/nonexistent/dir/file.txt"]
OUTS = ["out_new"] * 3 + ["a_file", "a_file/sub", "full_dir", "", "new_parent/out", "."]
DEVICES = ["cpu", "cpu", "cpu:0", "cuda", "cuda:7", "mps", "meta", "banana", "", "CPU"]
MODELS = ["tiny-llama"] * 6 + ["tiny-gpt2", "", "tiny-nope", "missing_dir/", "a_file", "no_text_dir", "a/b/c",
                               "hub/not-a-real-model-xyz"]
YAML_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 5000), st.sampled_from([0.5, 1.0, 1e-6, 2.5, -1.0]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
              st.sampled_from(["tiny-llama", "cpu", "budget", "post-rope", "float16", "attention", "small.txt"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)
RECIPE_BODIES = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), YAML_JUNK, max_size=5)
    .map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    YAML_JUNK.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),  # often not a mapping
    st.text(max_size=60),  # often invalid YAML
    st.sampled_from(["{", "a: [1, 2\n", "!!python/object/apply:os.system ['true']", "\t- x", "seed: 1\nseed: 2\n",
                     "model: tiny-llama\ntext: small.txt\nseq_len: 64\nmax_tokens: 256\nexact_window: 8\n"]),
)


def _opts(table: dict, max_size: int = 3) -> st.SearchStrategy:
    """A list of up to ``max_size`` [--flag, value] pairs from ``table`` (few at a time, so that one
    bad value is often the only one and reaches deep)."""
    def pairs(names):
        return st.tuples(*[table[n].map(lambda v, n=n: [n] if v is True else [] if v is False else [n, v])
                           for n in names]).map(lambda ps: [p for p in ps if p])
    return st.lists(st.sampled_from(sorted(table)), max_size=max_size, unique=True).flatmap(pairs)


@st.composite
def _recipe_arg(draw):
    kind = draw(st.sampled_from(["file", "file", "missing", "dir", "empty-name"]))
    if kind == "missing":
        return "missing.yaml"
    if kind == "dir":
        return "no_text_dir"
    if kind == "empty-name":
        return ""
    body = draw(RECIPE_BODIES)
    path = SCRATCH["root"] / f"recipe_{abs(hash(body)) % 10**8}.yaml"
    path.write_text(body, encoding="utf-8")
    return str(path)


# cheap settings first; a fuzzed option given later overrides its value (click keeps the last)
CHEAP_COMPRESS = ["--seq-len", "64", "--max-tokens", "256", "--heldout-tokens", "64", "--exact-window", "8"]
COMPRESS = {
    "--text": st.sampled_from(PATHS), "--recipe": _recipe_arg(),
    "--mode": st.sampled_from(["auto", "post-rope", "rope-pairs", "bilinear", "sideways", ""]),
    "--policy": st.sampled_from(["budget", "energy", "bound", "uniform", "nope"]),
    "--weighting": st.sampled_from(["none", "attention", "x"]),
    "--rank-ratio": FLOAT, "--tau": FLOAT, "--epsilon": FLOAT, "--exact-window": INT,
    "--k-bits": st.one_of(INT, st.sampled_from(["2", "3", "4", "8"])), "--seq-len": INT, "--max-tokens": INT,
    "--heldout-tokens": INT,
    "--device": st.sampled_from(DEVICES), "--overwrite": st.booleans(),
}
ANALYZE = {
    "--text": st.sampled_from(PATHS), "--seq-len": INT, "--max-tokens": INT, "--device": st.sampled_from(DEVICES),
    "--batch-size": INT, "--overwrite": st.booleans(),
}
EVAL = {
    "--task": st.sampled_from(["eval.txt", "wikitext2-local", "lowrank_textppl", "wikitext", "nope", "", "missing.txt",
                               "no_text_dir", "empty.txt", "binary.txt"]),
    "--text-file": st.sampled_from(["eval.txt", "missing.txt", "", "empty.txt", "binary.txt", "no_text_dir"]),
    "--max-length": INT, "--limit": INT,
    "--dense": st.sampled_from(["tiny-llama", "tiny-qwen2", "", "missing_dir/", "ckpt"]),
    "--device": st.sampled_from(DEVICES), "--out": st.sampled_from(["res.json", "a_file/res.json", "no_text_dir", ""]),
}
SWEEP = {
    "--ratios": st.sampled_from(["0.5", "0.5,0.25", "", "a,b", "nan", "0", "-1", "1.5", "inf", ",,,", "0.5,,", "1e309"]),
    "--recipe": _recipe_arg(), "--seq-len": INT, "--max-tokens": INT, "--max-length": INT, "--limit": INT,
    "--device": st.sampled_from(DEVICES),
}


def _check(res, out: Path | None = None, existed: bool = True):
    """Exit 0, or 2 with one 'error:' line (or a typer usage error); never an uncaught exception."""
    assert "Traceback" not in res.output, res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"uncaught {type(res.exception).__name__}: {res.exception}") from res.exception
    assert res.exit_code in (0, 2), (res.exit_code, res.output)
    event("success" if res.exit_code == 0 else "usage error" if "Usage:" in res.output else "error")
    if res.exit_code == 2 and "Usage:" not in res.output:
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and len(errors[0]) > len("error: "), res.output
    if res.exit_code != 0 and out is not None and not existed:
        assert not out.exists(), f"a failed run left {out}"


# LOWRANK_ATTN_FUZZ=N multiplies every fuzz test's examples by N (a longer hunt than the default run)
SCALE = int(os.environ.get("LOWRANK_ATTN_FUZZ", "1"))
FUZZ = settings(max_examples=40 * SCALE, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(model=st.sampled_from(MODELS), out=st.sampled_from(OUTS), opts=_opts(COMPRESS), text=st.sampled_from(PATHS))
def test_fuzz_cli_compress(fz, model, out, opts, text):
    with _cwd(fz):
        args = ["compress", model, "--out", out, "--text", text, *CHEAP_COMPRESS] + [a for o in opts for a in o]
        existed = Path(out).exists() if out else True
        res = runner.invoke(app, args)
        _check(res, Path(out) if out else None, existed)
        if res.exit_code == 0 and out not in ("", "."):
            assert (Path(out) / "lowrank_attn.json").is_file()
            shutil.rmtree(out)


@FUZZ
@given(model=st.sampled_from(MODELS), out=st.sampled_from(OUTS), opts=_opts(ANALYZE))
def test_fuzz_cli_analyze(fz, model, out, opts):
    with _cwd(fz):
        args = ["analyze", model, "--out", out, "--no-plots", "--seq-len", "64"] + [a for o in opts for a in o]
        if "--text" not in args:
            args += ["--text", "small.txt"]  # never the (slow) model-sampled default
        existed = Path(out).exists() if out else True
        res = runner.invoke(app, args)
        _check(res, Path(out) if out else None, existed)
        if res.exit_code == 0 and out not in ("", "."):
            assert (Path(out) / "spectra.json").is_file()
            shutil.rmtree(out)


@settings(FUZZ, max_examples=25 * SCALE)
@given(model=st.sampled_from(MODELS + ["ckpt", "ckpt", "ckpt"]), opts=_opts(EVAL))
def test_fuzz_cli_eval(fz, model, opts):
    with _cwd(fz):
        args = ["eval", model, "--max-length", "64"] + [a for o in opts for a in o]
        task = dict(o for o in opts if len(o) == 2).get("--task")
        if task is None:
            args += ["--task", "eval.txt"]
        elif task == "wikitext2-local" and "--text-file" not in args:
            args += ["--text-file", "eval.txt"]  # never the (slow) full WikiText-2 test set
        res = runner.invoke(app, args)
        _check(res)


@settings(FUZZ, max_examples=25 * SCALE)
@given(model=st.sampled_from(MODELS), out=st.sampled_from(OUTS + ["bad_sweep"]), opts=_opts(SWEEP),
       methods=st.sampled_from(["dense", "weight-svd", "nope", "", ",", "dense,nope", "ours-uniform", "kivi-4bit"]),
       text=st.sampled_from(PATHS),
       task=st.sampled_from([["--task", "eval.txt"]] * 3 + [["--task", "wikitext2-local", "--text-file", f]
                                                             for f in ("eval.txt", "missing.txt", "", "empty.txt")]))
def test_fuzz_cli_sweep(fz, model, out, opts, methods, text, task):
    with _cwd(fz):
        args = ["sweep", model, "--out", out or "sweep_out", "--methods", methods, "--text", text, *task,
                *CHEAP_COMPRESS[:4], "--max-length", "64"] + [a for o in opts for a in o]
        res = runner.invoke(app, args)
        _check(res)
        if res.exit_code == 0:
            done = Path(out or "sweep_out")
            assert (done / "sweep.jsonl").is_file()
            for f in done.glob("sweep*"):  # (--out . is a sweep in the scratch directory itself)
                f.unlink()


# ================================================================ fuzzing the Python API


@settings(max_examples=60 * SCALE, deadline=None, database=None)
@given(body=st.one_of(RECIPE_BODIES, st.binary(max_size=40).map(lambda b: b)))
def test_fuzz_recipe_from_yaml(tmp_path_factory, body):
    p = tmp_path_factory.mktemp("y") / "r.yaml"
    p.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    try:
        r = Recipe.from_yaml(p)
    except LowrankAttnError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(r, Recipe) and Recipe.from_dict(r.to_dict()) == r


RECIPE_FIELDS = dict(
    model=st.sampled_from(["tiny-llama", "tiny-gpt2", "tiny-gemma3", "tiny-qwen2"]),
    mode=st.sampled_from(["auto", "post-rope", "rope-pairs", "bilinear"]),
    policy=st.sampled_from(["budget", "energy", "bound", "uniform"]), signal=st.sampled_from(["energy", "output"]),
    rank_ratio=st.floats(1e-6, 1.0), tau=st.floats(1e-6, 1.0), epsilon=st.floats(1e-9, 1.0),
    min_rank=st.integers(1, 20), max_rank=st.one_of(st.none(), st.integers(1, 20)),
    granularity=st.sampled_from([1, 2, 4, 8, 16]), fit=st.sampled_from(["closed-form", "weight-svd", "key-pca", "think"]),
    ridge=st.sampled_from([0.0, 1e-12, 1e-6, 0.5, 0.999]), weighting=st.sampled_from(["none", "attention"]),
    exact_window=st.integers(0, 70), k_bits=st.sampled_from([None, 2, 3, 4, 8]), k_group=st.sampled_from([8, 16, 32, 1, 1000]),
    seq_len=st.integers(16, 130), max_tokens=st.integers(1, 600), heldout_tokens=st.integers(0, 200),
    seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)


@settings(max_examples=40 * SCALE, deadline=None, database=None)
@given(fields=st.fixed_dictionaries({}, optional=RECIPE_FIELDS))
def test_fuzz_compress_api(fz, fields):
    """Any valid recipe compresses a tiny model or fails with a LowrankAttnError; a success has finite maps."""
    from lowrank_attn import compress

    try:
        recipe = Recipe(**{"model": "tiny-llama", "seq_len": 64, "max_tokens": 256, "heldout_tokens": 64,
                           "exact_window": 8, **fields,
                           "text": [str(fz / "small.txt")]})
        lm, report = compress(recipe.model, recipe, progress=False)
    except LowrankAttnError as e:
        assert str(e) and "\n" not in str(e)
        event(f"{type(e).__name__}: {str(e).split(':')[0]}")
        return
    event("success")
    _assert_finite_model(lm.model)
    assert report["summary"]["violations"] == 0 if "violations" in report["summary"] else True


# ================================================================ numerics


def _assert_finite_model(model):
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name


def _degenerate_llama(scale_rank1=1.0):
    """tiny-llama with layer 0 KV head 0 keys identically zero (zero variance) and layer 1 KV head 1
    keys of rank 1 before RoPE, in one frequency plane (so rank 2 after it)."""
    from lowrank_attn.models import load_model

    lm = load_model("tiny-llama")
    layers = lm.model.model.layers
    with torch.no_grad():
        layers[0].self_attn.k_proj.weight[:D] = 0
        u = torch.zeros(D)
        u[3], u[3 + D // 2] = 1.0, 0.5
        v = torch.linspace(-1, 1, layers[1].self_attn.k_proj.weight.shape[1])
        layers[1].self_attn.k_proj.weight[D : 2 * D] = scale_rank1 * torch.outer(u, v)
    return lm


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, alice_text):
    p = tmp_path_factory.mktemp("txt") / "small.txt"
    p.write_text(open(alice_text, encoding="utf-8").read()[20000:24000])
    return str(p)


def _recipe(text, **kw):
    return Recipe(**{"model": "tiny-llama", "text": [text], "seq_len": 64, "max_tokens": 512, "heldout_tokens": 128,
                     "exact_window": 8, **kw})


@pytest.mark.parametrize("policy", ["budget", "energy", "bound", "uniform"])
def test_degenerate_heads_fit_finitely_and_are_flagged(small_text, policy):
    from lowrank_attn.compression import compress

    lm, report = compress(_degenerate_llama(), _recipe(small_text, policy=policy), progress=False)
    _assert_finite_model(lm.model)
    for mod in lm.model.model.layers:
        plan = mod.self_attn.lowrank_plan
        assert torch.isfinite(plan.q_map).all() and torch.isfinite(plan.k_map).all()
    heads = {(layer["layer"], h["kv_head"]): h for layer in report["layers"] for h in layer["kv_heads"]}
    zero, low = heads[(0, 0)], heads[(1, 1)]
    assert zero["key_rank"] == 0 and zero["unreliable"] and "constant keys" in zero["unreliable_reasons"][0]
    # no key variance: no logit energy, nothing to lose, and the certificate sees no change
    assert zero["retained_energy"] == 1.0 and zero["predicted_error_per_pair"] == 0.0
    assert zero["certificate"]["tv_max"] == 0.0
    assert low["key_rank"] == 2 and low["unreliable"] and "span 2 of 16" in low["unreliable_reasons"][0]
    for key in [(0, 1), (1, 0)]:  # untouched heads: full-rank keys, not flagged
        assert heads[key]["key_rank"] == D and not heads[key]["unreliable"] and heads[key]["unreliable_reasons"] == []
    assert report["summary"]["unreliable_heads"] == 2
    assert report["summary"]["violations"] == 0
    # the compressed model's logits stay finite
    with torch.no_grad():
        assert torch.isfinite(lm.model(input_ids=torch.arange(100)[None] % 250).logits).all()


@pytest.mark.parametrize("ridge", [0.0, 1e-12, 1e-6, 0.5])
def test_rank_deficient_fit_is_finite_for_any_ridge(ridge):
    """fit_head on key Grams of rank 0, 1, 2 and d−1 (float64): finite maps and energies, for every allowed
    ridge including 0; on the keys' own span the rank-d maps reproduce the logits."""
    from lowrank_attn.fit import fit_head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, D))
    gq = x.T @ x
    for rank in (0, 1, 2, D - 1):
        k = rng.standard_normal((400, rank)) @ rng.standard_normal((rank, D)) if rank else np.zeros((400, D))
        hf = fit_head(gq, k.T @ k, scale=0.25, ridge=ridge)
        for a in (hf.q_map, hf.k_map, hf.eigvals):
            assert np.isfinite(a).all() and np.isfinite(a.astype(np.float32)).all(), (rank, ridge)
        if rank == 0:
            assert (hf.eigvals == 0).all()
        elif ridge <= 1e-6:  # exact on the calibration keys at full rank
            np.testing.assert_allclose(x[:20] @ hf.q_map.T @ hf.k_map @ k[:20].T, x[:20] @ k[:20].T,
                                       rtol=1e-4, atol=1e-6 * np.abs(x[:20] @ k[:20].T).max())


def test_ridge_zero_compresses_degenerate_heads(small_text):
    """ridge: 0 is allowed; rank-deficient keys must not turn the float32 maps into inf."""
    from lowrank_attn.compression import compress

    lm, report = compress(_degenerate_llama(), _recipe(small_text, ridge=0.0), progress=False)
    _assert_finite_model(lm.model)
    assert report["summary"]["violations"] == 0 and report["summary"]["unreliable_heads"] == 2


def test_almost_constant_keys_fit_finitely(small_text):
    """Keys scaled by 1e-7 (variance ~1e-14, far below the ridge of a normal head): the ridge is relative,
    so the fit is the same as at scale 1 up to round-off, and stays finite."""
    from lowrank_attn.compression import compress

    outs = []
    for s in (1.0, 1e-7):
        lm = _degenerate_llama(scale_rank1=s)
        with torch.no_grad():
            lm.model.model.layers[0].self_attn.k_proj.weight[D:] *= s
        lm, report = compress(lm, _recipe(small_text, policy="uniform", weighting="none"), progress=False)
        _assert_finite_model(lm.model)
        outs.append(report)
    for la, lb in zip(outs[0]["layers"], outs[1]["layers"]):
        for ha, hb in zip(la["kv_heads"], lb["kv_heads"]):
            assert ha["key_rank"] == hb["key_rank"]
            assert ha["retained_energy"] == pytest.approx(hb["retained_energy"], abs=1e-3)


def test_constant_nonzero_keys_are_rank_zero(small_text):
    """GPT-2 with a key projection of zero weights and a non-zero bias: every key is the same non-zero
    vector. Its centred second moment is round-off only; it must count as rank 0, not as full rank."""
    from lowrank_attn.compression import compress
    from lowrank_attn.models import load_model

    lm = load_model("tiny-gpt2")
    attn = lm.model.transformer.h[0].attn
    with torch.no_grad():  # c_attn: (in, 3·E) Conv1D = [q | k | v]; KV head 0 = key columns E .. E+D
        e = attn.c_attn.weight.shape[0]
        attn.c_attn.weight[:, e : e + D] = 0
        attn.c_attn.bias[e : e + D] = torch.linspace(1.0, 3.0, D)
    lm, report = compress(lm, _recipe(small_text, exact_window=0, policy="uniform"), progress=False)
    _assert_finite_model(lm.model)
    h = report["layers"][0]["kv_heads"][0]
    assert h["key_rank"] == 0 and h["unreliable"], h
    assert report["layers"][0]["kv_heads"][1]["key_rank"] == D


def test_vacuous_certificate_is_flagged(small_text):
    """Huge logits (q/k weights ×30) and rank 1: the TV bound min(1, osc/4) is trivial on most rows."""
    from lowrank_attn.compression import compress
    from lowrank_attn.models import load_model

    lm = load_model("tiny-llama")
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.self_attn.q_proj.weight *= 30
            layer.self_attn.k_proj.weight *= 30
    lm, report = compress(lm, _recipe(small_text, policy="uniform", rank_ratio=1 / D, weighting="none"), progress=False)
    heads = [h for layer in report["layers"] for h in layer["kv_heads"]]
    assert all(h["certificate"]["vacuous_fraction"] >= 0.5 for h in heads), [h["certificate"] for h in heads]
    assert all(h["unreliable"] and any("vacuous" in r for r in h["unreliable_reasons"]) for h in heads)
    assert report["summary"]["violations"] == 0
    # and an ordinary compression is not flagged
    _, ok = compress(load_model("tiny-llama"), _recipe(small_text), progress=False)
    assert ok["summary"]["unreliable_heads"] == 0


def test_cli_prints_unreliable_note(small_text, tmp_path, monkeypatch):
    import lowrank_attn.compression as comp

    real = comp.load_model
    monkeypatch.setattr(comp, "load_model", lambda *a, **k: _degenerate_llama() if a[0] == "tiny-llama" else real(*a, **k))
    res = runner.invoke(app, ["compress", "tiny-llama", "--text", small_text, "--seq-len", "64", "--max-tokens", "512",
                              "--heldout-tokens", "64", "--exact-window", "8", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "note: 2 KV head(s) flagged unreliable (layer.head 0.0 1.1)" in res.output
    side = json.loads((tmp_path / "c" / "lowrank_attn.json").read_text())
    assert side["summary"]["unreliable_heads"] == 2 and side["layers"][0]["kv_heads"][0]["unreliable"] is True


def test_save_refuses_nan_before_anything_is_written(small_text, tmp_path):
    from lowrank_attn.checkpoint import save_compressed
    from lowrank_attn.compression import compress
    from lowrank_attn.errors import CheckpointError
    from lowrank_attn.models import load_model

    lm, report = compress(load_model("tiny-llama"), _recipe(small_text), progress=False)
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.lowrank_k_map[0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save: tensor model.layers.1.self_attn.lowrank_k_map has NaN"):
        save_compressed(lm, report, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor a temp directory


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_half_precision_compress(small_text, dtype, kind):
    """A half-precision model: statistics in float64, finite maps, finite logits, close to fp32's fit."""
    from lowrank_attn.compression import compress, prepare_calibration
    from lowrank_attn.models import load_model

    kw = dict(exact_window=0, mode="auto") if kind == "tiny-gpt2" else {}
    recipe = _recipe(small_text, model=kind, dtype=dtype, **kw)
    lm = load_model(kind, dtype=getattr(torch, dtype))
    cal = prepare_calibration(lm, recipe, progress=False)
    stats = cal.stats(lm.model, recipe.weighting, recipe.exact_window)
    for arr in (stats.gq, stats.skk, stats.sk, stats.sa):
        assert arr.dtype == np.float64 and np.isfinite(arr).all()
    # the certificate's sample is kept as the model computed it (upcast per window where used)
    assert all(q.dtype == getattr(torch, dtype) for q in cal.sample.q[0])
    lm, report = compress(lm, recipe, calibration=cal, progress=False)
    assert next(lm.model.parameters()).dtype == getattr(torch, dtype)
    _assert_finite_model(lm.model)
    with torch.no_grad():
        logits = lm.model(input_ids=(torch.arange(200)[None] * 7) % 250).logits
    assert torch.isfinite(logits).all()
    assert report["summary"]["violations"] == 0 and report["summary"]["unreliable_heads"] == 0
    _, ref = compress(kind, recipe.replace(dtype="float32"), progress=False)
    assert report["summary"]["tv_mean"] == pytest.approx(ref["summary"]["tv_mean"], rel=0.2)


# ================================================================ determinism


def test_compress_twice_is_byte_identical(small_text, tmp_path):
    """Same recipe and text → identical directories, file by file (weights, config, sidecar, code)."""
    dirs = []
    for i in range(2):
        out = tmp_path / f"c{i}"
        res = runner.invoke(app, ["compress", "tiny-llama", "--text", small_text, "--seq-len", "64", "--max-tokens",
                                  "512", "--heldout-tokens", "128", "--exact-window", "8", "--out", str(out)])
        assert res.exit_code == 0, res.output
        dirs.append(out)
    names = sorted(p.name for p in dirs[0].iterdir())
    assert names == sorted(p.name for p in dirs[1].iterdir())
    assert {"model.safetensors", "lowrank_attn.json", "config.json"} <= set(names)
    for n in names:
        assert (dirs[0] / n).read_bytes() == (dirs[1] / n).read_bytes(), f"{n} differs between identical runs"
    side = (dirs[0] / "lowrank_attn.json").read_text()
    assert str(tmp_path) not in side  # no output path (nor anything else run-specific) in the sidecar


def test_checkpoint_files_are_as_readable_as_any_new_file(small_text, tmp_path):
    """safetensors writes its file 0600; a checkpoint (and an analysis) must be readable like the rest."""
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "c"
    res = runner.invoke(app, ["compress", "tiny-llama", "--text", small_text, "--seq-len", "64", "--max-tokens", "256",
                              "--heldout-tokens", "64", "--exact-window", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)


def test_analyze_twice_is_identical(small_text, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"a{i}"
        res = runner.invoke(app, ["analyze", "tiny-llama", "--text", small_text, "--seq-len", "64", "--no-plots",
                                  "--out", str(out)])
        assert res.exit_code == 0, res.output
        outs.append(out)
    for n in ("spectra.json", "summary.csv", "summary.md"):
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n


def test_compress_is_deterministic_across_processes(small_text, tmp_path):
    """A fresh interpreter (other hash seed, other allocation) writes the same bytes as this one."""
    args = ["--text", small_text, "--seq-len", "64", "--max-tokens", "512", "--heldout-tokens", "128",
            "--exact-window", "8", "--policy", "bound", "--epsilon", "0.02"]
    res = runner.invoke(app, ["compress", "tiny-llama", *args, "--out", str(tmp_path / "here")])
    assert res.exit_code == 0, res.output
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="12345")
    proc = subprocess.run([sys.executable, "-m", "lowrank_attn.cli", "compress", "tiny-llama", *args,
                           "--out", str(tmp_path / "there")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for n in ("model.safetensors", "lowrank_attn.json", "config.json", "modeling_lowrank.py"):
        assert (tmp_path / "here" / n).read_bytes() == (tmp_path / "there" / n).read_bytes(), n


# ================================================================ memory flat in tokens

_MEM_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, sys
    import torch
    torch.set_num_threads(1)
    from lowrank_attn.analysis import collect_grams
    from lowrank_attn.compression import prepare_calibration
    from lowrank_attn.models import load_model
    from lowrank_attn.recipe import Recipe
    from lowrank_attn.texts import load_texts, token_windows

    def status(key):  # kiB, from /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    def peak_growth(run):
        run(warm=True)  # every code path once, on one window
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so new allocations show in the RSS
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        run(warm=False)
        return status("VmHWM") - before

    path, tokens = sys.argv[1], int(sys.argv[2])
    lm = load_model("tiny-llama")
    windows = token_windows(lm.tokenizer, load_texts([path]), seq_len=512, max_tokens=tokens)
    cal = prepare_calibration(lm, Recipe(model="tiny-llama", text=[path], seq_len=512, max_tokens=tokens,
                                         heldout_tokens=512, exact_window=8), progress=False)
    fit_windows = cal.fit_windows

    def grams(warm):
        collect_grams(lm.model, windows[:1] if warm else windows, progress=False)

    def fit_stats(warm):
        cal.fit_windows, cal.stats_cache = fit_windows[:1] if warm else fit_windows, {}
        cal.stats(lm.model, "attention", 8, progress=False)

    print(json.dumps({"tokens": sum(len(w.input_ids) for w in windows), "fit_tokens": cal.fit_tokens,
                      "grams_kib": peak_growth(grams), "fit_stats_kib": peak_growth(fit_stats)}))
""")


@pytest.mark.slow
def test_calibration_memory_is_flat_in_tokens(long_text):
    """Peak memory of the calibration statistics (analysis Grams; compression's attention-weighted
    fit statistics) for 4k and 32k tokens, each size in a fresh interpreter, the peak (VmHWM) reset
    just before: 8× the tokens may cost at most 5 MiB more. (Keeping the keys of every token, the
    smallest per-token tensor, measured +10 MiB; the queries would be twice that.)"""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = {}
    for n in (4096, 32768):
        proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, long_text, str(n)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, big = runs[4096], runs[32768]
    assert big["tokens"] >= 7 * small["tokens"] and big["fit_tokens"] >= 7 * small["fit_tokens"], runs
    for key in ("grams_kib", "fit_stats_kib"):
        assert big[key] - small[key] < 5 * 1024, (key, runs)
