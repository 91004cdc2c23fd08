"""The sweep on a tiny model: runs end to end through lm-eval, resumes, and its byte accounting
orders as it must. (Perplexity orderings need a trained model: see the SmolLM2 sweep in the README.)"""

from __future__ import annotations

import json

import pytest

from lowrank_attn.errors import RecipeError
from lowrank_attn.recipe import Recipe
from lowrank_attn.sweep import load_points, run_sweep
from lowrank_attn.sweep_report import write_sweep_report

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, alice_text):
    out = tmp_path_factory.mktemp("sweep")
    evalf = out / "eval.txt"
    evalf.write_text(open(alice_text).read()[20000:26000])
    recipe = Recipe(model="tiny-llama", text=[alice_text], seq_len=128, max_tokens=1024, heldout_tokens=128,
                    exact_window=8)
    kw = dict(recipe=recipe, task=str(evalf), max_length=128, progress=False, log=lambda *_: None)
    points = run_sweep("tiny-llama", out, ratios=[0.5, 0.25], methods=["dense", "weight-svd", "ours", "kivi-4bit"], **kw)
    return out, points, kw


def test_sweep_points_and_files(swept):
    out, points, _ = swept
    by = {(p["method"], p["ratio"]): p for p in points}
    assert set(by) == {("dense", None), ("weight-svd", 0.5), ("weight-svd", 0.25), ("ours", 0.5), ("ours", 0.25),
                       ("kivi-4bit", 1.0)}
    dense = by[("dense", None)]["k_bytes_per_token"]
    # measured K-cache bytes: fewer with lower rank, quantisation smallest, dense largest
    assert by[("weight-svd", 0.25)]["k_bytes_per_token"] < by[("weight-svd", 0.5)]["k_bytes_per_token"] < dense
    assert by[("ours", 0.25)]["k_bytes_per_token"] < by[("ours", 0.5)]["k_bytes_per_token"] < dense
    assert by[("kivi-4bit", 1.0)]["k_bytes_per_token"] < 0.5 * dense
    for p in points:
        assert p["word_perplexity"] > 1 and p["documents"] >= 1
    files = write_sweep_report(points, out, title="tiny")
    for f in files:
        assert (out / f).stat().st_size > 0
    assert "weight-svd" in (out / "sweep.md").read_text()
    assert len(json.loads((out / "sweep.json").read_text())) == len(points)


def test_sweep_resumes_without_recomputing(swept):
    out, points, kw = swept
    before = (out / "sweep.jsonl").read_text()
    again = run_sweep("tiny-llama", out, ratios=[0.5, 0.25], methods=["dense", "weight-svd", "ours", "kivi-4bit"], **kw)
    assert (out / "sweep.jsonl").read_text() == before  # nothing recomputed or appended
    assert len(again) == len(points) == len(load_points(out / "sweep.jsonl"))


@pytest.mark.parametrize("ratios,methods", [([], ["ours"]), ([1.5], ["ours"]), ([0.5], ["nope"])])
def test_sweep_bad_input(tmp_path, ratios, methods):
    with pytest.raises(RecipeError):
        run_sweep("tiny-llama", tmp_path / "s", ratios=ratios, methods=methods, recipe=Recipe(model="tiny-llama"))
