"""RULER through NVIDIA kvpress's own pipeline, on the same prompts and scoring as eval/ruler.py.

kvpress 0.5.5 pins transformers<5.3, so it runs in its own venv (eval/kvpress/requirements.txt)::

    python -m venv /work/kvpress-venv && /work/kvpress-venv/bin/pip install -r eval/kvpress/requirements.txt
    /work/kvpress-venv/bin/pip install --no-deps -e .    # lowrank_attn itself (its RULER harness), no new deps
    /work/kvpress-venv/bin/pip list | grep -i nvidia      # must print nothing on a CPU machine
    # the model as a local HF directory, written once by the main venv (GGUF short names load there):
    python -c "from lowrank_attn.models import load_model; lm=load_model('qwen2.5-0.5b'); \\
        lm.model.save_pretrained('runs/hf/qwen2.5-0.5b'); lm.tokenizer.save_pretrained('runs/hf/qwen2.5-0.5b')"
    # (the fp32 copy lowrank-attn keeps under ~/.cache/lowrank-attn/models/<gguf stem>-<hash>/ is such a directory)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /work/kvpress-venv/bin/python eval/kvpress/run_ruler.py \\
        --model qwen2.5-0.5b --hf-dir runs/hf/qwen2.5-0.5b \\
        --presses SnapKVPress ExpectedAttentionPress KnormPress StreamingLLMPress KeyDiffPress \\
        --ratios 0.5,0.75 --lengths 4096,8192 --limit 10

What runs: ``transformers.pipeline("kv-press-text-generation", model=..., tokenizer=...)`` (kvpress's
``KVPressTextGenerationPipeline``) with ``press=<Press>(compression_ratio=r)`` (``ThinKPress``, which removes
key channels, not tokens: ``key_channel_compression_ratio=2r``, r < 0.5, its own compression ratio): the context
is prefilled through the press (compressed), the question is not, then kvpress's greedy decoding, up to the task's
``max_gen_toks``. One change to kvpress's preprocessing, so that the tokens are lm-eval's prompt exactly:
the prompt lm-eval builds (``eval/ruler.py``'s ``task_prompts``: the same seeded docs) is split where
RULER's question starts, the context part goes in as the context and the rest (question, delimiter and
answer prefix) as the question, each tokenised as lm-eval's HFLM would (no chat template, BOS only where
the tokenizer adds one); kvpress's own preprocess would wrap the context in the chat template, or put
"\\n" before the answer prefix. Each row records whether context + question tokens equal lm-eval's
tokenisation of the whole prompt (``same_tokens``). Scores: lm-eval's own ``process_results`` of the task
(string match), the mean over the n docs.

Rows go into the same ``eval/results/ruler/<model>.jsonl`` as eval/ruler.py, method ``kvpress:<Press>@<ratio>``;
bytes are NOMINAL: ``(1 - ratio)`` × the dense bf16 cache of the model's shape (``bytes_how`` says so; the
table marks them ``≈``), not measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the package's RULER harness (tasks, prompts, scoring, rows): nothing it imports needs more than this venv has
from lowrank_attn.harness import stamp  # noqa: E402
from lowrank_attn.harness import ruler  # noqa: E402

PRESSES = ("ExpectedAttentionPress", "SnapKVPress", "KnormPress", "StreamingLLMPress", "KeyDiffPress", "ThinKPress")
# presses that remove key channels, not tokens: their compression ratio (kvpress's own ``compression_ratio``, the
# fraction of the KV bytes saved) is half the fraction of key channels removed, so below 0.5 (0.5: every channel)
CHANNEL_PRESSES = ("ThinKPress",)
# the pipeline with no press: its prompts, context/question split and decoding, nothing dropped — what its rows
# score beside eval/ruler.py's dense rows shows what the pipeline itself costs
CONTROL = "none"
VENV_HINT = ("kvpress is not importable here; make its venv: python -m venv /work/kvpress-venv && "
             "/work/kvpress-venv/bin/pip install -r eval/kvpress/requirements.txt && /work/kvpress-venv/bin/pip "
             "install --no-deps -e ., then run this with /work/kvpress-venv/bin/python")


class KvpressError(ruler.RulerError):
    pass


def parse_presses(names: list[str]) -> list[str]:
    out = []
    for n in names:
        n = n.strip()
        if n not in PRESSES and n != CONTROL:
            raise KvpressError(f"unknown press {n!r}; choose from {', '.join(PRESSES)} (or {CONTROL}: no press)")
        if n not in out:
            out.append(n)
    if not out:
        raise KvpressError("--presses: give at least one press")
    return out


def parse_ratios(spec: str) -> list[float]:
    out = []
    for p in spec.split(","):
        p = p.strip()
        if not p:
            continue
        try:
            r = float(p)
        except ValueError:
            raise KvpressError(f"--ratios: {p!r} is not a number") from None
        if not 0.0 < r < 1.0:
            raise KvpressError(f"--ratios: {r} is not a compression ratio in (0, 1) (the fraction of the KV pairs removed)")
        out.append(r)
    if not out:
        raise KvpressError("--ratios: give at least one ratio")
    return out


def check_pairs(presses: list[str], ratios: list[float]) -> None:
    """One line for a ratio a press cannot reach (a channel press saves at most half the KV bytes)."""
    for p in presses:
        if p in CHANNEL_PRESSES and max(ratios) >= 0.5:
            raise KvpressError(f"{p} removes key channels only: its ratio (the KV bytes saved, half the key channels "
                               f"removed) is below 0.5 (0.5 removes every channel), got {max(ratios):g}; ThinK's "
                               "usual point is 0.25 (half the channels)")


def method_label(press: str, ratio: float) -> str:
    return f"kvpress:{CONTROL}" if press == CONTROL else f"kvpress:{press}@{ratio:g}"


def check_venv() -> None:
    import importlib.util

    if importlib.util.find_spec("kvpress") is None:
        raise KvpressError(VENV_HINT)


def default_tokenizer_dir(model: str) -> Path:
    """Where eval/ruler.py saved the model's tokenizer (lowrank_attn.models.cache_root()/tokenizers/<model>)."""
    root = Path(os.environ.get("LOWRANK_ATTN_CACHE", Path.home() / ".cache" / "lowrank-attn"))
    return root / "tokenizers" / ruler.safe_name(model)


def lm_eval_ids(tokenizer, text: str) -> list[int]:
    """As lm-eval's HFLM encodes a prompt for this tokenizer: no special tokens, BOS first only where the
    tokenizer itself adds one (lowrank_attn.texts.bos_prefix)."""
    probe = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and probe and probe[0] == bos else []
    return prefix + tokenizer.encode(text, add_special_tokens=False)


def make_preprocess(tokenizer):
    """kvpress's preprocess replaced by lm-eval's tokenisation of the same prompt (see the module docstring)."""
    import torch

    def preprocess(context, questions, answer_prefix, max_context_length, enable_thinking=False):
        ctx = lm_eval_ids(tokenizer, context)
        qs = [tokenizer.encode(q + answer_prefix, add_special_tokens=False) for q in questions]
        return {"context_ids": torch.tensor([ctx]), "questions_ids": [torch.tensor([q]) for q in qs]}

    return preprocess


def build_press(name: str, ratio: float):
    if name == CONTROL:
        return None
    import kvpress

    if name in CHANNEL_PRESSES:  # ratio = key channels removed / 2 (kvpress's compression_ratio for these)
        return getattr(kvpress, name)(key_channel_compression_ratio=2 * ratio)
    return getattr(kvpress, name)(compression_ratio=ratio)


def bytes_how(press: str) -> str:
    if press in CHANNEL_PRESSES:
        return ("nominal: (1 - compression_ratio) x the dense bf16 cache of the model's shape, compression_ratio = "
                "half the key channels removed; kvpress zeroes the channels (the cache keeps its shape), so these are "
                "the bytes a cache without them would hold")
    return "nominal: (1 - compression_ratio) x the dense bf16 cache of the model's shape; not measured"


def run(args) -> int:
    presses, ratios = parse_presses(args.presses), parse_ratios(args.ratios)
    check_pairs(presses, ratios)
    tasks, lengths, limit = ruler.parse_tasks(args.tasks), ruler.parse_lengths(args.lengths), ruler.check_limit(args.limit)
    check_venv()
    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise KvpressError(f"--hf-dir {hf_dir} is not a HF model directory (no config.json); write one from the main "
                           "venv with load_model(...).model.save_pretrained(DIR) and .tokenizer.save_pretrained(DIR)")
    tok_dir = Path(args.tokenizer) if args.tokenizer else default_tokenizer_dir(args.model)
    if not (tok_dir / "tokenizer_config.json").is_file():
        tok_dir = hf_dir
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    store = ruler.rows_store(ruler.rows_path(args.model, args.results))
    out, done = store.path, store.latest()
    settings = {"source": str(hf_dir), "dtype": args.dtype or ruler.default_dtype(args.device),
                "max_gen_toks": args.max_gen_toks}  # what a row ran with beyond its key (ruler.SETTINGS)
    todo = [(p, r, L, t) for p in presses for r in (ratios if p != CONTROL else [0.0]) for L in lengths for t in tasks
            if not ruler.is_done(done, (args.model, method_label(p, r), t, L), limit, settings)]
    if not todo:
        print(f"[kvpress] nothing to do: every row is in {out}", file=sys.stderr)
        return 0

    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import lm_eval
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=torch.device(args.device))
    pipe.preprocess = make_preprocess(tok)
    stamped = stamp(args.device)
    tasks_built: dict[tuple, object] = {}
    for press_name, ratio, L, t in todo:
        if (t, L) not in tasks_built:
            tasks_built[(t, L)] = ruler.load_task(t, L, str(tok_dir))
        task_obj = tasks_built[(t, L)]
        prompts = ruler.task_prompts(task_obj, limit)
        every = [p["prompt"] for p in prompts]
        sha, shas = ruler.prompts_sha(every), ruler.prompt_shas(every)
        same_as_lm_eval = _compare_prompts(done, args.model, t, L, sha, shas)
        if same_as_lm_eval is False:
            print(f"[kvpress] warning: {t}@{L} prompts differ from eval/ruler.py's rows", file=sys.stderr)
        label = method_label(press_name, ratio)
        old = ruler.extendable(done, (args.model, label, t, L), limit, settings)  # a row of fewer docs: add the rest
        start = int(old["n"]) if old is not None and ruler.extends_prompts(old, every) else 0
        t0 = time.time()
        scores, responses, same = [], [], []
        for p in tqdm(prompts[start:], desc=f"{label} {t} {L}", unit="sample", file=sys.stderr):
            max_new = int(args.max_gen_toks or p["gen_kwargs"].get("max_gen_toks", 128))
            same.append(lm_eval_ids(tok, p["context"]) + tok.encode(p["question"], add_special_tokens=False)
                        == lm_eval_ids(tok, p["prompt"]))
            with torch.inference_mode():
                ans = pipe(p["context"], question=p["question"], press=build_press(press_name, ratio),
                           max_new_tokens=max_new)["answer"]
            responses.append(ans)
            scores.append(ruler.score_response(task_obj, p["doc"], ans, L))
        wall = time.time() - t0
        dense = ruler.dense_cache_bytes(model.config, L)["total"]
        row = {"model": args.model, "method": label, "task": t, "length": L, "score": sum(scores) / len(scores),
               "n": len(scores), "limit": limit, "kv_bytes": round((1 - ratio) * dense), "dense_kv_bytes": dense,
               "kv_fraction": 1 - ratio, "compression_ratio": ratio,
               "bytes_how": bytes_how(press_name),
               **settings,
               "prompts_sha": sha, "prompt_shas": shas, "same_prompts_as_lm_eval_rows": same_as_lm_eval,
               "same_tokens": all(same), "seeds": ruler.SEEDS,
               "harness": f"kvpress {_version('kvpress')} pipeline; lm-eval {lm_eval.__version__} prompts and scoring; "
                          f"transformers {_version('transformers')}",
               **stamped, "wall_s": round(wall, 1),
               "responses": responses}
        if start:
            row = {**ruler.extended_row(old, row, every), "same_tokens": bool(old.get("same_tokens")) and all(same)}
        store.append(row)
        print(f"[kvpress] {label} {t} {L}: score {row['score']} (n={row['n']}) in {wall:.0f}s", file=sys.stderr)
    return 0


def _compare_prompts(done: dict, model: str, task: str, length: int, sha: str, shas: list[str]) -> bool | None:
    """Whether eval/ruler.py's rows for (model, task, length) saw these prompts: doc by doc where they record
    ``prompt_shas``, else by the whole hash at the same n; None when no row can tell."""
    verdicts = []
    for k, r in done.items():
        if k[0] != model or k[2] != task or k[3] != length or str(k[1]).startswith("kvpress"):
            continue
        theirs = r.get("prompt_shas")
        if theirs:
            m = min(len(theirs), len(shas))
            verdicts.append(theirs[:m] == shas[:m])
        elif int(r.get("n", 0)) == len(shas):
            verdicts.append(r.get("prompts_sha") == sha)
    return None if not verdicts else all(verdicts)


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b", help="the model's name in the rows (same as eval/ruler.py --model)")
    p.add_argument("--hf-dir", required=True, help="a local HF directory with the model and its tokenizer")
    p.add_argument("--presses", nargs="+", default=["SnapKVPress"],
                   help=", ".join(PRESSES) + f", or {CONTROL} (the pipeline without a press: a control row)")
    p.add_argument("--ratios", default="0.5", help="comma-separated compression ratios: the fraction of the KV bytes "
                   "removed (token presses: of the KV pairs; ThinKPress: half the fraction of key channels, < 0.5)")
    p.add_argument("--tasks", default=",".join(ruler.OFFLINE_TASKS))
    p.add_argument("--lengths", default=",".join(map(str, ruler.DEFAULT_LENGTHS)))
    p.add_argument("--limit", type=int, default=ruler.DEFAULT_LIMIT)
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on generated tokens (default: the task's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory for lm-eval's RULER generator (default: the one eval/ruler.py saved, "
                        "else --hf-dir): the same one gives the same prompts")
    p.add_argument("--results", type=Path, default=ruler.RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ruler.RulerError as e:
        print(f"run_ruler: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
