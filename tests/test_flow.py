"""The Prefect flow runs the real stages against a real (temporary) Prefect server."""
from __future__ import annotations

import dataclasses

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from campe.shards import shard_paths
from stages.download import DownloadParams
from tests.conftest import TINY


@pytest.fixture(scope="session")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _write_params(tmp_path, **download):
    gen_dir = tmp_path / "generated"
    dl = dataclasses.replace(DownloadParams(), url_list=str(gen_dir / "urls" / "train.parquet"),
                             output_dir=str(tmp_path / "shards"), stats_file=str(tmp_path / "stats.json"),
                             image_size=32, number_sample_per_shard=30, **download)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"generate": dataclasses.asdict(TINY), "download": dataclasses.asdict(dl)}))
    return path, gen_dir, dl


def test_flow_runs_generate_then_download_off_the_main_thread(prefect_server, tmp_path):
    from pipelines.campe_flow import campe_pipeline

    params, gen_dir, dl = _write_params(tmp_path)
    state = campe_pipeline(str(params), str(gen_dir), return_state=True)
    assert state.is_completed(), state
    out = state.result()
    n = TINY.train_images * TINY.train_captions
    assert out["download"]["successes"] == n and out["download"]["success_rate"] == 1.0
    assert len(shard_paths(dl.output_dir)) == -(-n // dl.number_sample_per_shard)


def test_flow_fails_with_the_stage_error(prefect_server, tmp_path):
    from pipelines.campe_flow import campe_pipeline

    params, gen_dir, _ = _write_params(tmp_path, caption_col="no_such_column")
    state = campe_pipeline(str(params), str(gen_dir), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no column 'no_such_column'"):
        state.result()


def test_deployment_schedule_and_parameters_come_from_params(tmp_path):
    from pipelines.campe_flow import build_deployment

    params, gen_dir, _ = _write_params(tmp_path)
    cfg = yaml.safe_load(params.read_text())
    cfg["flow"] = {"deployment_name": "nightly", "cron": "15 2 * * 1", "timezone": "Europe/Paris",
                   "generate": False, "generated_dir": str(gen_dir)}
    params.write_text(yaml.safe_dump(cfg))
    dep = build_deployment(str(params))
    sched = dep.schedules[0].schedule
    assert (dep.name, sched.cron, sched.timezone) == ("nightly", "15 2 * * 1", "Europe/Paris")
    assert dep.parameters == {"params_file": str(params), "generated_dir": str(gen_dir), "generate": False}
    cfg["flow"]["cron"] = "every night"
    params.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="'every night'.*not a valid schedule"):
        build_deployment(str(params))
