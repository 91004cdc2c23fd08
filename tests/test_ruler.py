"""eval/ruler.py (``lowrank_attn.harness``: ``ruler``, ``ruler_run``, ``ruler_report``) and eval/kvpress/run_ruler.py
without a model: argument validation, resumable row keys, the table and plot from a synthetic JSONL; and the lm-eval model's ``kv_cache=`` argument (plumbing on a tiny
model with a stand-in peer; the real quanto peer where optimum-quanto is installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_attn.harness import ruler, ruler_report, ruler_run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval" / "kvpress"))
import run_ruler  # noqa: E402
from conftest import limited_threads  # noqa: E402


# ------------------------------------------------------------------ arguments


def test_methods_parse_dense_ours_and_peers(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "lowrank_attn.json").write_text("{}")
    ms = ruler_run.parse_methods(["dense", f"ours:50pct={ckpt}", "quanto-4bit"], check_files=False)
    assert [(m.label, m.kind) for m in ms] == [("dense", "dense"), ("ours:50pct", "ours"), ("quanto-4bit", "peer")]
    assert ms[1].path == str(ckpt) and ms[2].peer == "quanto-4bit"
    assert ruler_run.parse_method(f"ours:x={ckpt}").path == str(ckpt)  # a real checkpoint dir passes the file check
    exact = ruler_run.parse_method(f"ours-exact:x={ckpt}")
    assert (exact.label, exact.kind, exact.prefill, exact.path) == ("ours-exact:x", "ours", "exact", str(ckpt))
    assert ms[1].prefill == "compressed"


@pytest.mark.parametrize("spec, words", [
    ("kivi-8bit", "unknown method"),
    ("ours:50pct", "ours:<label>=<checkpoint dir>"),
    ("ours:=dir", "ours:<label>=<checkpoint dir>"),
    ("ours:a=/no/such/dir", "not a compressed checkpoint"),
    ("ours-exact:a", "ours-exact:<label>=<checkpoint dir>"),
    ("ours-fast:a=dir", "unknown method"),
])
def test_bad_methods_are_one_line(spec, words):
    with pytest.raises(ruler.RulerError) as e:
        ruler_run.parse_method(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_duplicate_method_labels_refused():
    with pytest.raises(ruler.RulerError, match="given twice"):
        ruler_run.parse_methods(["dense", "dense"], check_files=False)


def test_missing_peer_package_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("hqq") else real(name, *a))
    with pytest.raises(ruler.RulerError) as e:
        ruler_run.parse_method("hqq-4bit")
    assert "pip install hqq" in str(e.value) and "\n" not in str(e.value)


def test_tasks_only_the_six_offline_ones():
    assert ruler.parse_tasks(None) == list(ruler.OFFLINE_TASKS)
    assert ruler.parse_tasks("ruler_vt, niah_single_1,ruler_vt") == ["ruler_vt", "niah_single_1"]
    for t, what in [("niah_single_2", "Paul Graham"), ("ruler_qa_squad", "SQuAD"), ("ruler", "whole group")]:
        with pytest.raises(ruler.RulerError, match="needs a download") as e:
            ruler.parse_tasks([t])
        assert what in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ruler.RulerError, match="unknown RULER task"):
        ruler.parse_tasks("niah_single_9")
    with pytest.raises(ruler.RulerError, match="no RULER task"):
        ruler.parse_tasks(" , ")


def test_lengths_and_limit():
    assert ruler.parse_lengths("4096,8192") == [4096, 8192]
    assert ruler.parse_lengths([4096]) == [4096]
    for bad in ("4k", "512", ""):
        with pytest.raises(ruler.RulerError):
            ruler.parse_lengths(bad)
    with pytest.raises(ruler.RulerError, match="at least 1"):
        ruler.check_limit(0)


def test_cli_errors_exit_2_with_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "eval" / "ruler.py"), *args, "--results", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)

    for args, words in [(["--tasks", "ruler_qa_hotpot"], "needs a download"), (["--methods", "foo"], "unknown method"),
                        (["--limit", "0"], "at least 1")]:
        r = run(*args)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------ rows


def _row(method, task, length=4096, score=0.5, n=10, model="m", **kw):
    return {"model": model, "method": method, "task": task, "length": length, "score": score, "n": n,
            "kv_bytes": kw.pop("kv_bytes", 1000), "dense_kv_bytes": 1000, "kv_fraction": kw.pop("kv_fraction", 1.0),
            "commit": "abc1234", "machine": {"device": "cpu", "cpu_count": 2, "torch_threads": 1}, "wall_s": 60.0,
            "prompts_sha": kw.pop("prompts_sha", "s"), **kw}


def test_rows_resume_by_key_and_sample_count(tmp_path):
    path = ruler.rows_path("qwen2.5-0.5b", tmp_path)
    assert path.name == "qwen2.5-0.5b.jsonl"
    assert ruler.rows_path("/a/b/ckpt dir/", tmp_path).name == "ckpt_dir.jsonl"
    store = ruler.rows_store(path)
    store.append(_row("dense", "ruler_vt", n=2, model="qwen2.5-0.5b"))
    store.append(_row("dense", "niah_single_1", n=10, model="qwen2.5-0.5b"))
    with open(path, "a") as f:
        f.write('{"model": "qwen2.5-0.5b", "method": "dense", "ta')  # a run killed mid-write
    rows = store.rows()
    assert len(rows) == 2
    done = store.latest()
    assert list(done)[0] == ("qwen2.5-0.5b", "dense", "ruler_vt", 4096)
    assert ruler.is_done(done, ("qwen2.5-0.5b", "dense", "niah_single_1", 4096), 10)
    assert ruler.is_done(done, ("qwen2.5-0.5b", "dense", "ruler_vt", 4096), 2)
    assert not ruler.is_done(done, ("qwen2.5-0.5b", "dense", "ruler_vt", 4096), 10)  # smoke row: rerun with more
    assert not ruler.is_done(done, ("qwen2.5-0.5b", "quanto-4bit", "ruler_vt", 4096), 1)
    # another checkpoint under the same label (its weights' identity), or another setting: measured again
    store.append(_row("ours:x", "ruler_vt", n=10, model="qwen2.5-0.5b", checkpoint="weights-1"))
    key = ("qwen2.5-0.5b", "ours:x", "ruler_vt", 4096)
    assert ruler.is_done(store.latest(), key, 10, {"checkpoint": "weights-1", "dtype": "float32"})
    assert not ruler.is_done(store.latest(), key, 10, {"checkpoint": "weights-2"})
    done = store.latest()
    # a later row of the same key supersedes the earlier one (the torn line stays alone on its line)
    store.append(_row("dense", "ruler_vt", n=10, score=0.9, model="qwen2.5-0.5b"))
    assert len(store.rows()) == 4
    assert store.latest()[("qwen2.5-0.5b", "dense", "ruler_vt", 4096)]["score"] == 0.9


@pytest.fixture(scope="module")
def half_ckpt(tmp_path_factory, alice_text):
    """tiny-llama compressed at half rank, saved."""
    from lowrank_attn.checkpoint import save_compressed
    from lowrank_attn.compression import compress
    from lowrank_attn.models import load_model
    from lowrank_attn.recipe import Recipe

    recipe = Recipe(model="tiny-llama", mode="post-rope", policy="uniform", rank_ratio=0.5, seq_len=64,
                    max_tokens=512, heldout_tokens=64, weighting="none", text=[alice_text], exact_window=8)
    with limited_threads():
        lm, rep = compress(load_model("tiny-llama"), recipe, progress=False)
        return save_compressed(lm, rep, tmp_path_factory.mktemp("ruler-ck") / "half")


def test_run_loop_writes_rows_and_resumes(tmp_path, half_ckpt, single_thread):
    """``ruler_run.run`` (what eval/ruler.py calls) on tiny-llama and a checkpoint of it, through lm-eval's own
    niah_single_1: one row per (method, task, length), the same prompt for both, the checkpoint's bytes against
    dense's; a rerun runs nothing; a row asked with another generation cap is measured again."""
    kw = dict(model="tiny-llama", methods=["dense", f"ours-exact:half={half_ckpt}"], tasks="niah_single_1",
              lengths="1024", limit=1, results=tmp_path)
    store = ruler.rows_store(ruler.rows_path("tiny-llama", tmp_path))
    assert ruler_run.run(**kw) == 0
    dense, ours = store.rows()
    assert [(r["method"], r["task"], r["length"], r["n"]) for r in (dense, ours)] == [
        ("dense", "niah_single_1", 1024, 1), ("ours-exact:half", "niah_single_1", 1024, 1)]
    assert dense["kv_fraction"] == 1.0 and ours["dense_kv_bytes"] == dense["kv_bytes"]
    assert 0 < ours["kv_bytes"] < dense["kv_bytes"] and ours["kv_fraction"] == ours["kv_bytes"] / dense["kv_bytes"]
    assert ours["prompts_sha"] == dense["prompts_sha"] and len(ours["responses"]) == 1 and 0 <= ours["score"] <= 1
    assert ours["source"] == str(half_ckpt) and ours["checkpoint"] and ours["dtype"] == "float32"
    assert ours["commit"] and ours["machine"]
    assert ruler_run.run(**kw) == 0 and len(store.rows()) == 2  # resumed: nothing left
    assert ruler_run.run(**{**kw, "methods": ["dense"], "max_gen_toks": 8}) == 0
    rows = store.rows()
    assert len(rows) == 3 and rows[-1]["method"] == "dense" and rows[-1]["max_gen_toks"] == 8


def test_a_row_of_fewer_docs_is_extended_not_rerun():
    key = ("m", "dense", "ruler_vt", 4096)
    prompts = ["p0", "p1", "p2", "p3"]
    old = _row("dense", "ruler_vt", n=2, score=1.0, limit=2, prompt_shas=ruler.prompt_shas(prompts[:2]),
               responses=["a", "b"], commit="old1234", max_gen_toks=None)
    latest = {key: old}
    assert ruler.extendable(latest, key, 4) is old and ruler.extends_prompts(old, prompts)
    assert ruler.extendable(latest, key, 2) is None  # already enough docs
    assert ruler.extendable(latest, key, 4, {"max_gen_toks": 16}) is None  # other settings: run again
    assert not ruler.extends_prompts(old, ["q0", "q1", "p2", "p3"])  # other docs first: run again
    for broken in ({"score": None}, {"responses": ["a"]}, {"prompt_shas": None}):
        assert ruler.extendable({key: {**old, **broken}}, key, 4) is None
    new = _row("dense", "ruler_vt", n=2, score=0.25, limit=4, prompt_shas=ruler.prompt_shas(prompts[2:]),
               responses=["c", "d"], commit="new5678", wall_s=30.0)
    row = ruler.extended_row(old, new, prompts)
    assert row["n"] == 4 and row["limit"] == 4 and row["score"] == pytest.approx(0.625)  # the mean over 4 docs
    assert row["responses"] == ["a", "b", "c", "d"] and row["prompt_shas"] == ruler.prompt_shas(prompts)
    assert row["prompts_sha"] == ruler.prompts_sha(prompts) and row["wall_s"] == 90.0
    assert row["commit"] == "new5678" and row["extends"] == [{"commit": "old1234", "n": 2}]
    with pytest.raises(ruler.RulerError):
        ruler.extended_row(old, new, prompts[:3])


def test_extending_a_real_run_equals_running_all_docs(tmp_path, single_thread):
    """lm-eval's own niah_single_1 on tiny-llama: 1 doc, then asked for 2, runs only the second and gives the row a
    fresh 2-doc run gives (the same prompts, responses and score)."""
    kw = dict(model="tiny-llama", methods=["dense"], tasks="niah_single_1", lengths="1024")
    assert ruler_run.run(**kw, limit=1, results=tmp_path / "a") == 0
    assert ruler_run.run(**kw, limit=2, results=tmp_path / "a") == 0
    assert ruler_run.run(**kw, limit=2, results=tmp_path / "b") == 0
    rows = ruler.rows_store(ruler.rows_path("tiny-llama", tmp_path / "a")).rows()
    fresh = ruler.rows_store(ruler.rows_path("tiny-llama", tmp_path / "b")).rows()[-1]
    extended = rows[-1]
    assert [r["n"] for r in rows] == [1, 2] and extended["extends"] == [{"commit": rows[0]["commit"], "n": 1}]
    for field in ("n", "score", "prompts_sha", "prompt_shas", "responses", "kv_bytes"):
        assert extended[field] == fresh[field], field


def test_prompts_sha_is_order_and_boundary_sensitive():
    assert ruler.prompts_sha(["ab", "c"]) != ruler.prompts_sha(["a", "bc"])
    assert ruler.prompts_sha(["a", "b"]) != ruler.prompts_sha(["b", "a"])
    assert ruler.prompts_sha(["a"]) == ruler.prompts_sha(["a"])


# ------------------------------------------------------------------ table


def _synthetic(tmp_path) -> Path:
    path = tmp_path / "m.jsonl"
    for r in [_row("dense", "niah_single_1", score=1.0), _row("dense", "ruler_vt", score=0.5),
              _row("quanto-4bit", "niah_single_1", score=0.5, kv_bytes=281, kv_fraction=0.281),
              _row("quanto-4bit", "ruler_vt", score=0.0, kv_bytes=281, kv_fraction=0.281),
              _row("kvpress:SnapKVPress@0.5", "niah_single_1", score=1.0, kv_bytes=500, kv_fraction=0.5,
                   bytes_how="nominal: (1 - compression_ratio) x dense"),
              _row("dense", "niah_single_1", length=8192, score=0.5, n=2, prompts_sha="x"),
              _row("quanto-4bit", "niah_single_1", length=8192, score=0.0, n=2, prompts_sha="y")]:
        ruler.rows_store(path).append(r)
    return path


def test_table_renders_scores_means_bytes_and_smoke(tmp_path):
    md = ruler_report.render_table(ruler.rows_store(_synthetic(tmp_path)).rows())
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert "niah_single_1 | ruler_vt | mean | KV bytes | fraction of dense" in header
    assert "niah_multikey_2" not in header  # only the tasks that have rows
    dense = next(line for line in lines if line.startswith("| dense | 4096"))
    assert "| 100.0 | 50.0 | 75.0 |" in dense and "| 1.000 |" in dense
    q = next(line for line in lines if line.startswith("| quanto-4bit | 4096"))
    assert "| 50.0 | 0.0 | 25.0 |" in q and "| 0.281 |" in q
    kp = next(line for line in lines if line.startswith("| kvpress:SnapKVPress@0.5 | 4096"))
    assert "| 100.0 | – | 100.0 (1 of 2 tasks) |" in kp and "≈0.500" in kp  # nominal bytes marked
    smoke = next(line for line in lines if line.startswith("| dense *smoke* | 8192 | 2 |"))
    assert "| 50.0 |" in smoke
    assert "Smoke run (n=2" in md
    assert "different prompts for niah_single_1@8192 (n=2)" in md  # prompts_sha differs between methods
    # rows come ordered: length, then dense, ours, peers, kvpress
    order = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "4096" in line]
    assert order == ["dense", "quanto-4bit", "kvpress:SnapKVPress@0.5"]


def test_table_without_smoke_rows_says_nothing_of_smoke(tmp_path):
    path = tmp_path / "m.jsonl"
    ruler.rows_store(path).append(_row("dense", "ruler_vt"))
    md = ruler_report.render_table(ruler.rows_store(path).rows())
    assert "smoke" not in md.lower()
    assert ruler_report.render_table([]).startswith("# RULER")


def test_write_table_and_plot(tmp_path):
    _synthetic(tmp_path)
    md = ruler_report.write_table(tmp_path)
    assert md == tmp_path / "README.md"
    assert "ruler_vs_kv_bytes.png" in md.read_text()
    png = tmp_path / "ruler_vs_kv_bytes.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run([sys.executable, str(REPO / "eval" / "ruler.py"), "--table", "--results", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("README.md")


def test_table_warns_when_one_line_mixes_settings(tmp_path):
    """A line whose task rows ran with different checkpoints, model copies or dtypes says so under the table
    (rows from before these fields were recorded count as matching)."""
    path = tmp_path / "m.jsonl"
    for r in [_row("ours:a", "niah_single_1", checkpoint="w1", dtype="float32"),
              _row("ours:a", "ruler_vt", checkpoint="w2", dtype="float32"),
              _row("dense", "niah_single_1", dtype="float32"), _row("dense", "ruler_vt")]:
        ruler.rows_store(path).append(r)
    text = ruler_report.write_table(tmp_path).read_text()
    assert "different settings: ours:a@4096 (checkpoint)" in text and "dense@4096" not in text


def test_dense_bytes_from_config_shape():
    import types

    cfg = types.SimpleNamespace(num_key_value_heads=2, num_attention_heads=14, head_dim=64, hidden_size=896,
                                num_hidden_layers=24)
    model = types.SimpleNamespace(config=cfg)
    assert ruler.dense_cache_bytes(model.config, 512)["total"] == 2 * 2 * 24 * 2 * 64 * 512  # = 6291456, as measured
    assert ruler.dense_cache_bytes({"text_config": vars(cfg)}, 512)["total"] == 6291456  # a config as a dict


# ------------------------------------------------------------------ kvpress script


def test_kvpress_arguments():
    assert run_ruler.parse_presses(["SnapKVPress", "KnormPress", "SnapKVPress"]) == ["SnapKVPress", "KnormPress"]
    assert set(run_ruler.PRESSES) == {"ExpectedAttentionPress", "SnapKVPress", "KnormPress", "StreamingLLMPress",
                                      "KeyDiffPress", "ThinKPress"}
    with pytest.raises(ruler.RulerError, match="unknown press"):
        run_ruler.parse_presses(["H2OPress"])
    assert run_ruler.parse_ratios("0.25, 0.5") == [0.25, 0.5]
    for bad in ("0", "1", "1.5", "x", ""):
        with pytest.raises(ruler.RulerError):
            run_ruler.parse_ratios(bad)
    assert run_ruler.method_label("SnapKVPress", 0.5) == "kvpress:SnapKVPress@0.5"
    assert run_ruler.parse_presses(["none", "KnormPress"]) == ["none", "KnormPress"]  # the control: no press
    assert run_ruler.method_label("none", 0.0) == "kvpress:none" and run_ruler.build_press("none", 0.0) is None
    # ThinK removes key channels: at most half the KV bytes (its ratio = half the key channels removed)
    run_ruler.check_pairs(["SnapKVPress", "ThinKPress"], [0.25, 0.4])
    for too_far in (0.5, 0.75):  # 0.5 would remove every key channel
        with pytest.raises(ruler.RulerError, match="below 0.5"):
            run_ruler.check_pairs(["ThinKPress"], [0.25, too_far])
    run_ruler.check_pairs(["SnapKVPress"], [0.75])
    assert "zeroes" in run_ruler.bytes_how("ThinKPress") and "zeroes" not in run_ruler.bytes_how("SnapKVPress")


def test_kvpress_missing_venv_is_one_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kvpress" else real(name, *a))
    rc = run_ruler.main(["--hf-dir", str(tmp_path), "--tasks", "ruler_vt", "--lengths", "4096", "--limit", "1",
                         "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "kvpress-venv" in err and "requirements.txt" in err


def test_kvpress_lm_eval_tokenisation():
    class Tok:  # a BOS-adding tokenizer: BOS once, before the context only
        bos_token_id = 1

        def __call__(self, text):
            return type("E", (), {"input_ids": [1] + [ord(c) for c in text]})()

        def encode(self, text, add_special_tokens=False):
            return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    pre = run_ruler.make_preprocess(Tok())("ab", ["\nq?"], " A:", 10**9)
    assert pre["context_ids"].tolist() == [[1, ord("a"), ord("b")]]
    assert pre["questions_ids"][0].tolist() == [[ord(c) for c in "\nq? A:"]]


# ------------------------------------------------------------------ lm-eval kv_cache=


def test_kv_cache_arg_validation(monkeypatch):
    from lowrank_attn.lm_eval_model import check_kv_cache
    from lowrank_attn.peers import PeerUnavailableError

    assert check_kv_cache(None) is None and check_kv_cache("") is None and check_kv_cache("none") is None
    with pytest.raises(PeerUnavailableError, match="unknown peer 'fp8'") as e:
        check_kv_cache("fp8")
    assert "quanto-4bit" in str(e.value) and "\n" not in str(e.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("optimum") else real(name, *a))
    with pytest.raises(PeerUnavailableError, match="pip install optimum-quanto"):
        check_kv_cache("quanto-4bit")


def _generate_once(lm):
    from lm_eval.api.instance import Instance

    seen = []
    orig = lm.model.generate

    def spy(*a, **k):
        seen.append(k.get("past_key_values"))
        return orig(*a, **k)

    lm.model.generate = spy
    req = Instance("generate_until", {}, ("hello world " * 20, {"until": [], "max_gen_toks": 4, "do_sample": False}), 0)
    out = lm.generate_until([req, req])
    return out, seen


def test_kv_cache_gives_every_generate_a_fresh_peer_cache(monkeypatch):
    """The plumbing, with a stand-in peer (a DynamicCache subclass) so it runs where no backend is installed."""
    import torch
    from transformers import DynamicCache

    import lowrank_attn.lm_eval_model as lem
    from lowrank_attn import peers

    class StandIn(DynamicCache):
        pass

    class Peer:
        backend, package, pip_name, any_length = "torch", "torch", "torch", True

        def cache(self, model):
            return StandIn(config=model.config)

    monkeypatch.setitem(peers.PEERS, "standin-4bit", Peer())
    torch.manual_seed(0)
    lm = lem.LowrankLM(pretrained="tiny-llama", kv_cache="standin-4bit", max_length=256, batch_size=1, device="cpu")
    assert lm.get_model_info()["kv_cache"] == "standin-4bit"
    out, seen = _generate_once(lm)
    assert len(out) == 2 and len(seen) == 2
    assert all(isinstance(c, StandIn) for c in seen) and seen[0] is not seen[1]
    dense = lem.LowrankLM(pretrained="tiny-llama", max_length=256, batch_size=1, device="cpu")
    out_d, seen_d = _generate_once(dense)
    assert seen_d == [None, None] and out_d == out  # a dynamic stand-in changes nothing


def test_kv_cache_refused_for_a_compressed_model(monkeypatch):
    import lowrank_attn.lm_eval_model as lem
    from lowrank_attn.errors import ModelLoadError
    from lowrank_attn.models import load_model

    lm = load_model("tiny-llama")
    next(iter(lm.model.modules())).lowrank_plan = object()  # what surgery marks compressed attention with
    monkeypatch.setattr(lem, "check_kv_cache", lambda name: name)
    with pytest.raises(ModelLoadError, match="compressed model"):
        lem.LowrankLM(pretrained=lm.model, tokenizer=lm.tokenizer, kv_cache="quanto-4bit", batch_size=1)


def test_prefill_exact_is_set_on_a_compressed_model_and_refused_on_a_dense_one():
    import torch

    import lowrank_attn.lm_eval_model as lem
    from lowrank_attn.errors import ModelLoadError
    from lowrank_attn.models import load_model
    from lowrank_attn.runtime import adapters
    from lowrank_attn.runtime.modeling_lowrank import apply_lowrank
    from lowrank_attn.runtime.plan import LayerPlan

    tiny = load_model("tiny-llama")
    model, tok, lay = tiny.model, tiny.tokenizer, adapters.head_layout(tiny.model)
    rows = torch.eye(lay.head_dim)[: lay.head_dim // 2].expand(lay.num_kv_heads, -1, -1).contiguous()
    apply_lowrank(model, [LayerPlan(mode="post-rope", ranks=[lay.head_dim // 2] * lay.num_kv_heads, q_map=rows,
                                    k_map=rows.clone(), window=4) for _ in range(lay.num_layers)])
    lm = lem.LowrankLM(pretrained=model, tokenizer=tok, prefill="exact", batch_size=1, max_length=64)
    assert {m.lowrank_prefill for m in adapters.attention_modules(model)} == {"exact"}
    assert lm.get_model_info()["prefill"] == "exact"
    dense = load_model("tiny-llama")
    with pytest.raises(ModelLoadError, match="prefill=exact") as e:
        lem.LowrankLM(pretrained=dense.model, tokenizer=dense.tokenizer, prefill="exact", batch_size=1)
    assert "\n" not in str(e.value)


def test_kv_cache_real_quanto_on_tiny_llama():
    pytest.importorskip("optimum.quanto")  # an optional peer backend for users; the dev extra installs it
    from transformers import QuantizedCache

    import lowrank_attn.lm_eval_model as lem

    lm = lem.LowrankLM(pretrained="tiny-llama", kv_cache="quanto-4bit", max_length=256, batch_size=1, device="cpu")
    out, seen = _generate_once(lm)
    assert len(out) == 2 and all(isinstance(c, QuantizedCache) for c in seen) and seen[0] is not seen[1]


def test_kv_cache_refused_for_a_model_with_sliding_layers():
    """lm-eval's kv_cache= on a model QuantizedCache cannot take (sliding-window layers): one line at construction,
    not a traceback at the first request."""
    pytest.importorskip("optimum.quanto")
    import lowrank_attn.lm_eval_model as lem
    from lowrank_attn.peers import PeerUnavailableError

    with pytest.raises(PeerUnavailableError, match="every layer attends fully; gemma3_text has sliding_attention"):
        lem.LowrankLM(pretrained="tiny-gemma3", kv_cache="quanto-4bit", max_length=256, batch_size=1, device="cpu")


def test_run_refuses_a_peer_on_a_model_with_sliding_layers_before_any_row(tmp_path):
    """eval/ruler.py's run with a peer on a model QuantizedCache cannot take: one line before dense or any other row
    runs, nothing written."""
    pytest.importorskip("optimum.quanto")
    from lowrank_attn.peers import PeerUnavailableError

    with pytest.raises(PeerUnavailableError, match="gemma3_text has sliding_attention layers"):
        ruler_run.run(model="tiny-gemma3", methods=["dense", "quanto-4bit"], tasks="niah_single_1", lengths=[1024],
                      limit=1, results=tmp_path)
    assert not list(tmp_path.iterdir())


def test_rows_file_format_is_json_lines(tmp_path):
    path = _synthetic(tmp_path)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        assert {"model", "method", "task", "length", "score", "n", "commit", "machine", "wall_s"} <= set(row)


def test_ours_checkpoint_bytes_below_dense_shape(half_ckpt, single_thread):
    """An ``ours:`` method loads a compressed checkpoint; its own cache after a prefill holds fewer bytes than
    the dense cache of the base shape (both floats at 2 bytes)."""
    ckpt = half_ckpt
    method = ruler_run.parse_method(f"ours:half={ckpt}")
    model, tok = ruler_run.load_method(method, "tiny-llama", "cpu", "float32")
    dense = ruler.dense_cache_bytes(model.config, 128)
    ours = ruler_run.kv_bytes(model, tok, 128)
    base, btok = ruler_run.load_method(ruler_run.Method("dense", "dense"), "tiny-llama", "cpu", "float32")
    assert ruler_run.kv_bytes(base, btok, 128) == dense  # the shape formula is what a DynamicCache holds
    assert 0 < ours["k"] < dense["k"] and ours["total"] < dense["total"]


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma3", "tiny-mistral"])
def test_dense_byte_formula_is_what_a_dynamic_cache_holds(kind, single_thread):
    """The dense reference from the config (used when a checkpoint runs before dense, and for kvpress's nominal
    bytes) equals the measured DynamicCache, sliding-window layers (window 32 here) keeping their last W - 1
    tokens; it once counted them at full length (tiny-gemma3 at 1024 tokens: 393,216 bytes for 139,008)."""
    base, tok = ruler_run.load_method(ruler_run.Method("dense", "dense"), kind, "cpu", "float32")
    assert ruler.dense_cache_bytes(base.config, 128) == ruler_run.kv_bytes(base, tok, 128)
    assert ruler.dense_cache_bytes(base.config.to_dict(), 128) == ruler_run.kv_bytes(base, tok, 128)


def test_missing_task_packages_are_one_line(monkeypatch):
    """lm-eval's RULER data builders import wonderwords and nltk (the ``ruler`` extra): without them, one line
    naming the install, before lm-eval is asked for the task."""
    monkeypatch.setattr(ruler, "TASK_PACKAGES", ("nltk", "no_such_package_for_ruler"))
    with pytest.raises(ruler.RulerError) as e:
        ruler.load_task("niah_single_1", 4096, "unused")
    msg = str(e.value)
    assert "no_such_package_for_ruler" in msg and "'.[ruler]'" in msg and "\n" not in msg
