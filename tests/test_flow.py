"""The Prefect flow runs the real stages (tiny config) against a real (temporary) Prefect server and a real MLflow
SQLite store: parent run per flow run, one child per stage, names and tags."""
from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from campe.data.shards import shard_paths
from tests.tiny_config import save_tiny_lm, write_tiny_params

STAGES = ("generate", "download", "cache", "train", "evaluate", "fewshot_data", "pretrain_clip", "prompt_learn_train",
          "prompt_learn_eval")


@pytest.fixture(scope="session")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def _sections_hash(cfg: dict, sections: tuple[str, ...]) -> str:
    """Reference: sha256 of the canonical JSON of those sections."""
    return hashlib.sha256(json.dumps({k: cfg.get(k) for k in sections}, sort_keys=True).encode()).hexdigest()


def _runs(uri: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("campe")
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_full_flow_makes_every_stage_output_and_parent_child_mlflow_runs(prefect_server, tmp_path, tiny_lm):
    from pipelines.campe_flow import STAGE_SECTIONS, campe_pipeline, git_commit

    params = write_tiny_params(tmp_path / "params.yaml", root=tmp_path, text_model=tiny_lm)
    cfg = yaml.safe_load(params.read_text())
    state = campe_pipeline(str(params), cfg["flow"]["generated_dir"], return_state=True)
    assert state.is_completed(), state
    out = state.result()
    flow_run_id = str(state.state_details.flow_run_id)

    # Every stage ran, in-process, on the tiny config.
    n = 24 * 2
    assert out["download"]["successes"] == n and out["download"]["success_rate"] == 1.0
    assert len(shard_paths(cfg["download"]["output_dir"])) == -(-n // cfg["download"]["number_sample_per_shard"])
    assert out["cache"]["captions_written"] == n
    assert out["train"]["step"] == cfg["train"]["steps"]
    rec = json.loads((tmp_path / "metrics/eval/generated.json").read_text())["metrics"]
    assert out["evaluate"]["generated"] == rec and 0 <= rec["t2i_R@1"] <= rec["t2i_R@5"] <= rec["t2i_R@10"] <= 100

    # MLflow: one parent run, a child per stage, named <stage>/<method or config>/<date> and tagged.
    client, runs = _runs(cfg["train"]["tracking_uri"])
    parent = client.get_run(out["mlflow"]["parent_run_id"])
    children = {r.data.tags["campe.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(STAGES) and len(runs) == len(STAGES) + 1
    commit = git_commit()
    assert commit is not None  # the tests run inside the repository
    for run in [parent, *children.values()]:
        tags = run.data.tags
        assert tags["prefect.flow_run_id"] == flow_run_id and tags["mlflow.source.git.commit"] == commit
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
    date = re.escape(parent.info.run_name.rsplit("/", 1)[1])
    assert re.fullmatch(rf"flow/multi_prompt_div_neg/{date}", parent.info.run_name)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", parent.info.run_name.rsplit("/", 1)[1])
    for stage, run in children.items():
        label = "multi_prompt_div_neg" if stage in ("train", "evaluate") else "params"
        assert run.info.run_name == f"{stage}/{label}/{parent.info.run_name.rsplit('/', 1)[1]}"
        assert run.data.tags["campe.params_hash"] == _sections_hash(cfg, STAGE_SECTIONS[stage]), stage
        assert run.info.run_id == out[stage]["mlflow_run_id"]

    # The train child is the training loop's own run: step metrics, and the eval metrics `campe evaluate` logs.
    train_run = children["train"]
    assert train_run.info.run_id == (tmp_path / "data/models/campe/mlflow_run_id.txt").read_text().strip()
    assert len(client.get_metric_history(train_run.info.run_id, "contrastive_loss")) >= 2
    for run in (train_run, children["evaluate"], parent):
        assert run.data.metrics["eval/generated/t2i_R_at_1"] == pytest.approx(rec["t2i_R@1"])
        assert run.data.metrics["eval/generated/i2t_R_at_10"] == pytest.approx(rec["i2t_R@10"])
    assert children["evaluate"].data.tags["campe.train_run_id"] == train_run.info.run_id
    assert children["download"].data.metrics["success_rate"] == 1.0
    assert children["cache"].data.params["text_encoder.k"] == "2"

    # AttriPrompt's stages: the few-shot sets and the CLIP where prompt_learn reads them, a metrics JSON and an
    # MLflow run per (method, dataset, seed) cell (tagged with the stage's child run), the report's pictures.
    pl = cfg["prompt_learn"]
    cells = out["prompt_learn_train"]["cells"]
    assert len(cells) == len(pl["methods"]) * len(pl["datasets"]) * len(pl["seeds"])
    for key, m in cells.items():
        method, dataset, seed = key.split("/")
        saved = json.loads((tmp_path / f"metrics/prompt_learning/base2new/{method}/{dataset}/{seed}.json").read_text())
        assert saved["hm"] == pytest.approx(m["hm"]) and 0 <= m["base_acc"] <= 100
        assert children["prompt_learn_train"].data.metrics[f"cells/{key}/hm"] == pytest.approx(m["hm"])
        cell_run = client.get_run(saved["mlflow_run_id"])
        assert cell_run.data.tags["campe.flow_stage_run_id"] == children["prompt_learn_train"].info.run_id
    assert (tmp_path / "data/models/clip/config.json").is_file()
    assert {f.name for f in (tmp_path / "plots/prompt_learning").iterdir()} >= {"bnh.png", "clusters.png"}
    assert out["prompt_learn_eval"]["average"].keys() == set(pl["methods"])


def test_params_hash_covers_exactly_the_stage_sections(tmp_path):
    from pipelines.campe_flow import STAGE_SECTIONS, sections_hash

    params = write_tiny_params(tmp_path / "params.yaml", root=tmp_path)
    before = {s: sections_hash(str(params), secs) for s, secs in STAGE_SECTIONS.items()}
    cfg = yaml.safe_load(params.read_text())
    assert before["train"] == _sections_hash(cfg, STAGE_SECTIONS["train"])
    cfg["text_encoder"]["k"] = 3  # read by cache and train only
    params.write_text(yaml.safe_dump(cfg))
    after = {s: sections_hash(str(params), secs) for s, secs in STAGE_SECTIONS.items()}
    assert {s for s in STAGE_SECTIONS if before[s] != after[s]} == {"cache", "train"}


def test_flow_fails_with_the_stage_error(prefect_server, tmp_path):
    from pipelines.campe_flow import campe_pipeline

    params = write_tiny_params(tmp_path / "params.yaml", root=tmp_path)
    cfg = yaml.safe_load(params.read_text())
    cfg["download"]["caption_col"] = "no_such_column"
    params.write_text(yaml.safe_dump(cfg))
    state = campe_pipeline(str(params), cfg["flow"]["generated_dir"], return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no column 'no_such_column'"):
        state.result()
    # The parent run and the download child are marked failed; nothing after download ran.
    _, runs = _runs(cfg["train"]["tracking_uri"])
    status = {r.data.tags["campe.stage"]: r.info.status for r in runs}
    assert status == {"flow": "FAILED", "generate": "FINISHED", "download": "FAILED"}


def test_deployment_schedule_and_parameters_come_from_params(tmp_path):
    from pipelines.campe_flow import build_deployment

    params = write_tiny_params(tmp_path / "params.yaml", root=tmp_path)
    cfg = yaml.safe_load(params.read_text())
    gen_dir = str(tmp_path / "gen")
    cfg["flow"] = {"deployment_name": "nightly", "cron": "15 2 * * 1", "timezone": "Europe/Paris",
                   "generate": False, "generated_dir": gen_dir}
    params.write_text(yaml.safe_dump(cfg))
    dep = build_deployment(str(params))
    sched = dep.schedules[0].schedule
    assert (dep.name, sched.cron, sched.timezone) == ("nightly", "15 2 * * 1", "Europe/Paris")
    assert dep.parameters == {"params_file": str(params), "generated_dir": gen_dir, "generate": False}
    cfg["flow"]["cron"] = "every night"
    params.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="'every night'.*not a valid schedule"):
        build_deployment(str(params))
