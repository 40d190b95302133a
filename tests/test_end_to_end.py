"""End to end: the real `dvc repro` (real git, real DVC, the `campe` commands) on the tiny config in a temp copy of
the repository; and the README's commands are the ones CI and the repro target run."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.tiny_config import save_tiny_lm, write_tiny_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, campe
EVAL_STAGES = ["evaluate_image@generated", "evaluate_video@generated_msrvtt", "evaluate_zero_shot"]
STAGES = ["generate", "download", "cache", "train", *EVAL_STAGES, "fewshot_data", "pretrain_clip", "prompt_learn_train",
          "prompt_learn_eval"]


def _copy_repo(dst: Path) -> Path:
    """The tracked files (as in the working tree), no data, no venv: what a fresh clone holds."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1",
               CAMPE_NO_PROGRESS="1", GIT_AUTHOR_NAME="campe-test", GIT_AUTHOR_EMAIL="test@campe.invalid",
               GIT_COMMITTER_NAME="campe-test", GIT_COMMITTER_EMAIL="test@campe.invalid")
    env.setdefault("DVC_SITE_CACHE_DIR", str(repo.parent / "dvc-site"))
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        # Bytecode may not be written next to the sources here: keep it in a private prefix instead, so the ~12
        # Python processes (dvc, each `campe` stage) compile torch / transformers / mlflow once, not each time.
        # (pyc files are checked against their source's mtime, so a cache shared between test sessions is safe)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / f"campe-pycache-{os.getuid()}")
    return env


def _sh(repo: Path, *cmd: str) -> str:
    r = subprocess.run(list(cmd), cwd=repo, env=_env(repo), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _repro(repo: Path) -> list[str]:
    """`dvc repro`; returns the stages it ran (in order), parsed from its output."""
    out = _sh(repo, str(BIN / "dvc"), "repro")
    ran = re.findall(r"Running stage '([\w@.-]+)'", out)
    skipped = re.findall(r"Stage '([\w@.-]+)' didn't change, skipping", out)
    assert set(ran) | set(skipped) <= set(STAGES), out
    return ran


def _recalls(metrics: dict[str, float], prefixes: tuple[str, ...]) -> None:
    for p in prefixes:
        r1, r5, r10 = (metrics[f"{p}_R@{k}"] for k in (1, 5, 10))
        assert 0 <= r1 <= r5 <= r10 <= 100, (p, r1, r5, r10)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A git repository copy with the tiny params.yaml, after a first full `dvc repro`: (path, stages run)."""
    root = tmp_path_factory.mktemp("e2e")
    lm = save_tiny_lm(root / "tiny_lm")  # outside the repo: a params value, not a DVC dependency
    repo = _copy_repo(root / "repo")
    write_tiny_params(repo / "params.yaml", text_model=lm)  # relative paths, as dvc.yaml expects
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-q", "-m", "tiny config")
    return repo, _repro(repo)


def test_dvc_repro_runs_every_stage_then_nothing(tiny_repo):
    repo, ran = tiny_repo
    assert ran == STAGES
    cfg = yaml.safe_load((repo / "params.yaml").read_text())

    dl = json.loads((repo / "metrics/download_stats.json").read_text())
    assert dl["successes"] == cfg["generate"]["train_images"] * cfg["generate"]["train_captions"]
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["steps"] == cfg["train"]["steps"] and math.isfinite(train["mean_last10_loss"])
    img = json.loads((repo / "metrics/eval/generated.json").read_text())["metrics"]
    _recalls(img, ("i2t", "t2i"))
    vid = json.loads((repo / "metrics/eval/generated_msrvtt.json").read_text())["metrics"]
    _recalls(vid, ("v2t", "t2v"))
    zs = json.loads((repo / "metrics/eval/zero_shot.json").read_text())["metrics"]
    assert all(0 <= v <= 100 for v in zs.values()) and zs
    assert (repo / "plots/eval/generated/generated_recall.png").stat().st_size > 0
    assert (repo / "plots/eval/generated_msrvtt/generated_msrvtt_recall.png").stat().st_size > 0

    # `dvc metrics show` prints the headline files (a few figures per stage and set, rounded); the full files are
    # one argument away.
    shown = _sh(repo, str(BIN / "dvc"), "metrics", "show")
    assert "metrics/eval/generated.headline.json" in shown and "t2i_R@1" in shown and "rsum" not in shown
    assert "metrics/train.headline.json" in shown and "mean_last10_loss" in shown and "final_lr" not in shown
    # one table, a row per headline file (seven here: both methods' stages), a column per headline figure: ~450
    # characters where the full files made ~2,500
    assert max(len(line) for line in shown.splitlines()) < 480, shown
    assert "t2i_mean_rank" in _sh(repo, str(BIN / "dvc"), "metrics", "show", "metrics/eval/generated.json")
    assert json.loads((repo / "metrics/eval/generated.headline.json").read_text()) == {
        k: v for k, v in img.items() if re.fullmatch(r"(i2t|t2i)_R@\d+", k)}
    assert not (repo / "plots/eval/zero_shot").exists()  # zero-shot draws no pictures: none named

    # The MLflow SQLite store in the repo holds the training run, with its step and eval metrics.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run = client.get_run((repo / "data/models/campe/mlflow_run_id.txt").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.tags["method"] == cfg["train"]["method"]
    assert run.data.metrics["eval/generated/t2i_R_at_1"] == pytest.approx(img["t2i_R@1"])
    assert run.data.metrics["eval/generated_msrvtt/v2t_R_at_5"] == pytest.approx(vid["v2t_R@5"])
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2
    # ... its datasets with the digests DVC recorded for them (the train stage ran after download and cache, which
    # dvc.lock had recorded by then), and its MLflow Model.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    recorded = {o["path"]: o["md5"] for stage in ("download", "cache") for o in lock[stage]["outs"]}
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert inputs["train-shards"].digest == recorded["data/shards/train"]
    assert inputs["text-cache"].digest == recorded["data/cache/train"]
    assert json.loads(inputs["text-cache"].profile)["digest"] == "dvc.lock"
    assert [m.name for m in client.search_logged_models([run.info.experiment_id])] == ["model"]

    # AttriPrompt's stages: a metrics JSON per (method, dataset, seed) cell with its MLflow run, the summary, the
    # report (method averages, retrieval usage) and its pictures.
    pl = cfg["prompt_learn"]
    for m in pl["methods"]:
        for d in pl["datasets"]:
            cell = json.loads((repo / f"metrics/prompt_learning/base2new/{m}/{d}/seed1.json").read_text())
            assert 0 <= cell["base_acc"] <= 100 and 0 <= cell["novel_acc"] <= 100
            assert client.get_run(cell["mlflow_run_id"]).info.status == "FINISHED"
    report = json.loads((repo / "metrics/prompt_learning/report.json").read_text())
    assert set(report["average"]) == set(pl["methods"]) and set(report["retrieval"]) == set(pl["datasets"])
    for name in ("bnh.png", "clusters.png", *(f"usage_{d}.png" for d in pl["datasets"])):
        assert (repo / "plots/prompt_learning" / name).stat().st_size > 0, name

    # Each stage held its output folder's lock (campe.core.io.output_lock): a hidden file beside the folder, outside
    # every DVC output, so the second repro below stays a no-op.
    for out in ("data/generated", "data/shards/train", "data/cache/train", "data/models/campe"):
        lock = (repo / out).parent / f".{Path(out).name}.campe-lock"
        assert lock.exists() and lock.read_text() == "", lock  # released: no holder left in it
        assert not list((repo / out).rglob("*.campe-lock")), out

    # A second repro is a no-op and the workspace is clean.
    assert _repro(repo) == []
    assert "Data and pipelines are up to date" in _sh(repo, str(BIN / "dvc"), "status")


def test_changing_a_train_param_reruns_exactly_train_and_the_eval_stages(tiny_repo):
    repo, _ = tiny_repo
    before = (repo / "metrics/eval/generated.json").read_text()
    params = repo / "params.yaml"
    cfg = yaml.safe_load(params.read_text())
    cfg["train"]["steps"] -= 2
    params.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert _repro(repo) == ["train", *EVAL_STAGES]
    assert json.loads((repo / "metrics/train.json").read_text())["steps"] == cfg["train"]["steps"]
    assert json.loads(before)["checkpoint"] == json.loads((repo / "metrics/eval/generated.json").read_text())[
        "checkpoint"]
    assert "Data and pipelines are up to date" in _sh(repo, str(BIN / "dvc"), "status")


# ------------------------------------------------------------------------------ the documented commands
def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S)
    assert block, "README.md has no fenced code block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.split("#", 1)[0].strip()]


def _make_recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{target}\s*:(?!=)", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_readme_commands_are_what_ci_and_the_repro_target_run():
    assert _readme_commands() == ["make repro", "make test"]
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines() if not line.startswith("#")]
    assert "make test" in ci
    assert any(re.search(r"(^|\s)dvc repro(\s|$)", line) for line in _make_recipe("repro"))
    assert any("pytest" in line and "tests" in line for line in _make_recipe("test"))
