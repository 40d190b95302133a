"""The MLflow store: a relative `train.tracking_uri` (`sqlite:///mlflow.db`) means the store beside the params file,
wherever a command runs; `campe evaluate` whose training run is not in the store stops in one line before any
work, and creates no empty store."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.bad_inputs._util import run_cli, tree_hash, write_shards
from tests.tiny_config import write_tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tiny_generated, tmp_path_factory):
    """A project whose params name the store relatively (as the shipped params.yaml does), trained from another
    working directory: (root, params, checkpoint, elsewhere)."""
    root = tmp_path_factory.mktemp("tracking") / "project"
    root.mkdir()
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    params = write_tiny_params(root / "params.yaml", root=root)
    cfg = yaml.safe_load(params.read_text())
    cfg["train"].update(tracking_uri="sqlite:///mlflow.db", artifact_root="mlartifacts")
    cfg["evaluate"].update(image_sets={"gen": str(tiny_generated[1] / "dataset_karpathy.json")}, video_sets={},
                           zero_shot_root="", examples=0)
    params.write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_shards(root / "data" / "shards" / "train")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        from campe.cli import main
        assert main(["train", "--params", str(params), "--method", "vanilla", "--steps", "2"]) == 0
    assert (root / "mlflow.db").exists() and not (elsewhere / "mlflow.db").exists()
    return root, params, root / "data" / "models" / "campe", elsewhere


def test_evaluate_outside_the_project_logs_into_the_project_store(project, monkeypatch, capsys):
    """`campe evaluate --params <project>/params.yaml` run from another folder logs into the training run in
    <project>/mlflow.db (the checkpoint records the store relatively), and leaves no mlflow.db where it ran."""
    root, params, ckpt, elsewhere = project
    monkeypatch.chdir(elsewhere)
    code, err = run_cli(capsys, "evaluate", "--params", str(params))
    assert code == 0, err
    from mlflow.tracking import MlflowClient
    run = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_run(
        (ckpt / "mlflow_run_id.txt").read_text().strip())
    assert "eval/gen/t2i_R_at_1" in run.data.metrics
    assert not (elsewhere / "mlflow.db").exists()
    assert "sqlite:///mlflow.db" in (ckpt / "train_config.json").read_text()  # no checkout path in the output


def test_evaluate_whose_training_run_is_not_in_the_store_stops_before_any_work(project, tmp_path, monkeypatch,
                                                                                capsys):
    """The same params file copied elsewhere points at a store that does not exist (then at one without the run):
    one line naming the run, its id file, the store and the fix; no metrics written, no empty store created."""
    root, params, ckpt, _ = project
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(params, other / "params.yaml")
    monkeypatch.chdir(tmp_path)
    metrics = Path(yaml.safe_load(params.read_text())["evaluate"]["metrics_dir"])
    before = tree_hash(metrics)
    run_id = (ckpt / "mlflow_run_id.txt").read_text().strip()

    code, err = run_cli(capsys, "evaluate", "--params", str(other / "params.yaml"))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"campe evaluate: error: the MLflow training run {run_id} named in "
                          f"{ckpt / 'mlflow_run_id.txt'} cannot be logged into: there is no store "
                          f"{other / 'mlflow.db'}; pass the --params of the project that trained it"), err
    assert not (other / "mlflow.db").exists() and not (tmp_path / "mlflow.db").exists()

    from mlflow.tracking import MlflowClient
    MlflowClient(tracking_uri=f"sqlite:///{other / 'mlflow.db'}").create_experiment("campe")  # a store, not the run
    code, err = run_cli(capsys, "evaluate", "--params", str(other / "params.yaml"))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"the MLflow training run {run_id} named in {ckpt / 'mlflow_run_id.txt'} is not in the store " \
           f"sqlite:///{other / 'mlflow.db'}; pass the --params" in err
    assert tree_hash(metrics) == before  # nothing evaluated, nothing written
