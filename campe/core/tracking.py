"""MLflow: one run through explicit run ids, and the batched logging every caller uses.

    from campe.core.tracking import Tracker, log_batch, flatten_config
    tracker = Tracker(train_params, run_id=None, config_hash=cfg.hash())    # a new run (or continue run_id)
    tracker.log_params(flatten_config(cfg.to_dict())); tracker.log_metrics(rows); tracker.end("FINISHED")
    tracker.log_datasets({"train-shards": "data/shards/train", "text-cache": "data/cache/train"}, base_dir=".")
"""
from __future__ import annotations

import hashlib
import json
import math
import os
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

    def log_datasets(self, folders: dict[str, str], base_dir: str = "", context: str = "train") -> None:
        """mlflow.log_input for each {name: folder} (the run page's "Datasets"): digest = the md5 DVC recorded for
        that folder in <base_dir>/dvc.lock when its file count and size still match, else computed
        (folder_digest); the source is the folder as given (relative to the working dir, as the run read it), the
        profile says files, bytes and the digest's origin."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        inputs = []
        for name, folder in folders.items():
            if not folder or not Path(folder).is_dir():
                continue
            digest, profile = dataset_digest(folder, base_dir)
            ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": folder}),
                         profile=json.dumps(profile))
            inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

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


# ---------------------------------------------------------------------------------------------------- datasets
def _folder_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def folder_digest(root: str | Path) -> str:
    """md5 (32 hex) over the sorted (relative path, md5 of the content) of every file under root: DVC's kind of
    directory digest, computed when dvc.lock has none for the folder."""
    root = Path(root)
    h = hashlib.md5()
    for f in _folder_files(root):
        m = hashlib.md5()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                m.update(block)
        h.update(f"{f.relative_to(root).as_posix()}\0{m.hexdigest()}\n".encode())
    return h.hexdigest()


def dvc_lock_entry(folder: str, base_dir: str = "") -> dict | None:
    """The entry (md5, size, nfiles) DVC recorded in <base_dir>/dvc.lock for `folder` (a path from the working dir;
    an out of the stage that wrote it, else a dep), or None."""
    lock = Path(base_dir or ".", "dvc.lock")
    if not lock.is_file():
        return None
    import yaml
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    base = Path(base_dir or ".").resolve()
    target = os.path.normpath(os.path.relpath(Path(folder).resolve(), base))
    found = None
    for stage in stages.values():
        for kind in ("outs", "deps"):
            for e in stage.get(kind) or []:
                if os.path.normpath(str(e.get("path", ""))) == target and "md5" in e:
                    if kind == "outs":
                        return e
                    found = found or e
    return found


def dataset_digest(folder: str, base_dir: str = "") -> tuple[str, dict[str, Any]]:
    """(digest, profile) of a data folder (a path from the working dir): DVC's md5 from <base_dir>/dvc.lock when its
    nfiles and size match the folder now, else folder_digest. profile: {"files", "bytes", "digest": "dvc.lock" |
    "computed"}."""
    root = Path(folder)
    files = _folder_files(root)
    size = sum(f.stat().st_size for f in files)
    profile: dict[str, Any] = {"files": len(files), "bytes": size}
    entry = dvc_lock_entry(folder, base_dir)
    if entry is not None and entry.get("nfiles") == len(files) and entry.get("size") == size:
        return str(entry["md5"]), {**profile, "digest": "dvc.lock"}
    return folder_digest(root), {**profile, "digest": "computed"}
