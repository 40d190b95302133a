"""MLflow: one run through explicit run ids, and the batched logging every caller uses.

    from campe.core.tracking import Tracker, log_batch, flatten_config
    tracker = Tracker(train_params, run_id=None, config_hash=cfg.hash())    # a new run (or continue run_id)
    tracker.log_params(flatten_config(cfg.to_dict())); tracker.log_metrics(rows); tracker.end("FINISHED")
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

from campe.core.io import store_uri


# ---------------------------------------------------------------------------------------------------- MLflow
def log_batch(client: Any, run_id: str, metrics: Sequence[Any] = (), params: Sequence[Any] = ()) -> None:
    """MlflowClient.log_batch in chunks within MLflow's limits: at most 100 params, 1000 metrics per call."""
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=list(params[i:i + 100]))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=list(metrics[i:i + 1000]))


class Tracker:
    """One MLflow run through explicit run ids (MlflowClient), never the fluent thread-local active run."""

    def __init__(self, tp: Any, run_id: str | None = None, config_hash: str = "", base_dir: str = ""):
        """A new run (named train/<method>/<UTC date> unless train.run_name is set, tagged with the git commit and
        `campe.config_hash`, the resolved config's hash that is also its `params_hash` param) or, with run_id, the
        run a resumed training continues. (`campe.params_hash` is the flow's tag: the raw params sections' sha256.)
        tp: the `train` params (campe.train.run_config.TrainParams): tracking_uri, experiment, artifact_root,
        method, run_name."""
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=store_uri(tp.tracking_uri, base_dir or None))
        exp = self.client.get_experiment_by_name(tp.experiment)
        if exp is None:
            location = (Path(base_dir or ".", tp.artifact_root).resolve() / tp.experiment).as_uri()
            exp_id = self.client.create_experiment(tp.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            from campe.core.io import git_commit, utc_stamp
            tags = {"method": tp.method, "campe.stage": "train", "campe.config_hash": config_hash}
            commit = git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = commit
            run = self.client.create_run(exp_id, run_name=tp.run_name or f"train/{tp.method}/{utc_stamp()}",
                                         tags=tags)
            self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        log_batch(self.client, self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, rows: list[dict[str, float]]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        log_batch(self.client, self.run_id, metrics=[Metric(k, float(v), now, int(r["step"])) for r in rows
                                                     for k, v in r.items() if k != "step" and math.isfinite(float(v))])

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out
