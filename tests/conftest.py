"""Shared test set-up: offline environment and a tiny generated benchmark (session-scoped, made once).

Everything the suite writes goes under one temporary folder, removed at the end: TMPDIR points into it, so the
temp folders of spawned workers and of libraries (wandb, which img2dataset imports, makes some at import) land there
too. Spawned children re-import this module; they inherit CAMPE_TEST_TMP and reuse the parent's folder. A
session-level check fails the run if the suite changed the checkout (git status before vs after).
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_OWNER = "CAMPE_TEST_TMP" not in os.environ  # the pytest process itself, not a spawned child
if _OWNER:
    os.environ["CAMPE_TEST_TMP"] = tempfile.mkdtemp(prefix="campe-tests-")
    # atexit runs handlers last-registered first: this one, registered before any library's (e.g. Prefect's test
    # harness cleans its own temp folder at exit), runs after them.
    atexit.register(shutil.rmtree, os.environ["CAMPE_TEST_TMP"], ignore_errors=True)
    os.makedirs(os.path.join(os.environ["CAMPE_TEST_TMP"], "tmp"), exist_ok=True)
    os.environ["TMPDIR"] = os.path.join(os.environ["CAMPE_TEST_TMP"], "tmp")
    tempfile.tempdir = None  # re-read TMPDIR
_TMP = os.environ["CAMPE_TEST_TMP"]
REPO = Path(__file__).resolve().parent.parent

# Offline and quiet, before any library is imported (see ../shared/notes/dependencies.md).
for key, value in {
    "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
    "PREFECT_HOME": os.path.join(_TMP, "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "DVC_NO_ANALYTICS": "1",
    "DVC_SITE_CACHE_DIR": os.path.join(_TMP, "dvc-site"), "TORCHINDUCTOR_CACHE_DIR": os.path.join(_TMP, "inductor"),
    "CAMPE_NO_PROGRESS": "1",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402

from campe.data.synth import SynthParams, generate  # noqa: E402


def _checkout_state() -> list[str] | None:
    """`git status` of the checkout, ignored files included (tests must not write into data/ either); None outside
    a git checkout. Byte-code caches are not the suite's outputs."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored=matching", "--untracked-files=all"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    skip = ("__pycache__", ".pytest_cache", ".venv/", ".campe-installed")
    return sorted(ln for ln in out.stdout.splitlines() if not any(s in ln for s in skip))


@pytest.fixture(scope="session", autouse=True)
def checkout_unchanged():
    """The suite writes only to temporary folders: the checkout's git status (with ignored files) is the same after
    the whole session as before it."""
    before = _checkout_state()
    yield
    after = _checkout_state()
    if before is not None and after is not None and after != before:
        new = sorted(set(after) - set(before))
        gone = sorted(set(before) - set(after))
        pytest.fail(f"the test suite changed the checkout {REPO}: new/changed {new[:10]}, gone {gone[:10]}",
                    pytrace=False)

TINY = SynthParams(seed=7, image_size=32, train_images=24, val_images=4, test_images=6, train_captions=2,
                   test_captions=5, train_videos=3, test_videos=3, video_captions=3, video_frames=4)


@pytest.fixture(scope="session")
def tiny_generated(tmp_path_factory):
    """A tiny generated benchmark: (params, folder)."""
    root = tmp_path_factory.mktemp("generated") / "gen"
    generate(TINY, root)
    return TINY, root


@pytest.fixture(scope="module")
def tok():
    """The packaged MiniLM tokenizer (offline)."""
    from transformers import AutoTokenizer

    from campe.text.model_folder import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"), local_files_only=True)


@pytest.fixture(scope="module")
def minilm_lm():
    """The packaged MiniLM-L6 model in eval mode (one per test module, which may change its attention setting)."""
    from transformers import AutoModel

    from campe.text.model_folder import resolve_model_path

    return AutoModel.from_pretrained(resolve_model_path("minilm"), local_files_only=True).eval()


def join_spawned(ctx, timeout: float = 120.0) -> None:
    """Wait for torch.multiprocessing processes started with join=False; fail (never hang) after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"spawned processes did not finish within {timeout:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A 2-layer BERT (hidden 32, random weights) + the MiniLM tokenizer, saved as a local model folder."""
    from tests.tiny_config import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`): on the
    shared 2-core machine two OpenMP threads spin against other work."""
    from campe.core.threads import torch_threads

    with torch_threads(1):
        yield
