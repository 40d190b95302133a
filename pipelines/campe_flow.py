"""Prefect flow that chains campe's stages (the same stage functions that `campe <stage>` and dvc run).

    campe flow run                     # one run on params.yaml (a temporary local Prefect server if none is set)
    campe flow show                    # the scheduled deployment declared from params.yaml:flow
    campe flow serve                   # serve that deployment: runs on its cron schedule (needs a Prefect server:
                                       #   `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api)

Stages: generate (embedded default only) -> download (retries) -> cache -> train -> evaluate, then AttriPrompt's:
fewshot_data and pretrain_clip (embedded default only) -> prompt_learn_train -> prompt_learn_eval; one task per
stage, named after it.

Design: each task calls the stage function in-process with the params file's sections (not `dvc repro <stage>`),
so a flow run and `dvc repro` produce the same artifacts from the same code, while Prefect sees each stage's own
exception (a failed flow shows the stage's error, not a dvc exit code), retries only the download, and the tasks
can log to MLflow with explicit run ids. DVC stays the tool that versions the artifacts; the flow is the scheduler.
Tasks are submitted to Prefect's thread-pool runner, i.e. they do not run on the main thread, which is why the
download stage runs img2dataset in a process of its own (it installs a SIGINT handler).

MLflow (train.tracking_uri, experiment train.experiment): one parent run per flow run and one child run per stage
(tag `mlflow.parentRunId`), all through MlflowClient and explicit run ids, never the fluent active run (it is
thread-local, and the tasks run on other threads). Runs are named `<stage>/<method or config>/<UTC date>` and
tagged with the git commit, the sha256 of the params sections the stage reads, and the Prefect flow-run id. The
train child is the training loop's own run (campe.core.tracking.Tracker; its id is in <out_dir>/mlflow_run_id.txt):
the flow names and tags it after the stage, so evaluation metrics, which `campe evaluate` logs into the training
run, appear under the train child; the evaluate child holds them as well, with a tag pointing at the train run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task

from campe.core.config import load_params, read_yaml
from campe.core.tracking import log_batch
from campe.core.io import git_commit, json_sha256, store_uri, utc_stamp
from campe.text.multiprompt import MultiPromptConfig
from campe.data.synth import SynthParams
from campe.train.checkpoint import RUN_ID_FILE
from campe.train.run_config import TRAIN_SECTIONS, TrainParams
from pipelines.flow_params import FlowParams
from stages.cache import CacheParams, run_stage as cache_stage
from stages.download import DownloadInputError, DownloadParams, run_stage as download_stage
from stages.evaluate import EvaluateParams, mlflow_metric_name, run_stage as evaluate_stage
from stages.fewshot_data import FewShotParams, run_stage as fewshot_stage
from stages.generate import run_stage as generate_stage
from stages.params import check_params
from stages.pretrain_clip import PretrainClipParams, run_stage as pretrain_clip_stage
from stages.prompt_learn import load_section as prompt_learn_section
from stages.train import load_run_config, run_stage as train_stage

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "run, show or serve the Prefect flow (scheduled deployment from params.yaml)"

# The params sections each stage reads (what its params hash covers; the same lists as dvc.yaml's `params`).
STAGE_SECTIONS = {"generate": ("generate",), "download": ("download",), "cache": ("cache", "text_encoder"),
                  "train": TRAIN_SECTIONS, "evaluate": ("evaluate",), "fewshot_data": ("fewshot_data",),
                  "pretrain_clip": ("pretrain_clip",), "prompt_learn_train": ("prompt_learn",),
                  "prompt_learn_eval": ("prompt_learn",)}
PARENT_TAG = "mlflow.parentRunId"
# ------------------------------------------------------------------------------------------------------ MLflow
def sections_hash(params_file: str, sections: tuple[str, ...]) -> str:
    """sha256 of the named sections of the params file (canonical JSON; a missing section hashes as null): the
    `campe.params_hash` tag of a stage's MLflow run."""
    data = read_yaml(params_file)
    return json_sha256({k: data.get(k) for k in sections}, default=str)


@dataclass
class RunContext:
    """What every run of one flow run shares: the store, the experiment, the parent run, the common tags."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    params_file: str
    label: str  # train.method: the <method or config> part of the run names
    date: str  # the flow run's start (UTC), the <date> part of the run names
    tags: dict[str, str]  # git commit, Prefect flow-run id

    def client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(tracking_uri=self.tracking_uri)

    def run_name(self, stage: str, label: str | None = None) -> str:
        return f"{stage}/{label or self.label}/{self.date}"

    def stage_tags(self, stage: str) -> dict[str, str]:
        return {**self.tags, PARENT_TAG: self.parent_run_id, "campe.stage": stage,
                "campe.params_hash": sections_hash(self.params_file, STAGE_SECTIONS[stage])}


def _experiment_id(client, tp: TrainParams, base_dir: str) -> str:
    """The training loop's experiment (same name and artifact location as campe.core.tracking.Tracker makes)."""
    exp = client.get_experiment_by_name(tp.experiment)
    if exp is not None:
        return exp.experiment_id
    location = (Path(base_dir, tp.artifact_root).resolve() / tp.experiment).as_uri()
    return client.create_experiment(tp.experiment, artifact_location=location)


def start_parent_run(params_file: str, flow_run_id: str | None) -> RunContext | None:
    """The flow run's parent MLflow run (None when train.tracking_uri is empty: no tracking)."""
    from mlflow.tracking import MlflowClient

    tp = load_params(params_file, "train", TrainParams)
    if not tp.tracking_uri:
        return None
    base_dir = _base(params_file)  # a relative store lives beside the params file
    uri = store_uri(tp.tracking_uri, base_dir)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, tp, base_dir)
    tags = {"campe.flow_params_file": str(params_file)}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if flow_run_id:
        tags["prefect.flow_run_id"] = str(flow_run_id)
    date = utc_stamp()
    ctx = RunContext(uri, exp_id, "", params_file, tp.method, date, tags)
    all_sections = tuple(dict.fromkeys(s for v in STAGE_SECTIONS.values() for s in v))
    run = client.create_run(exp_id, run_name=ctx.run_name("flow"),
                            tags={**tags, "campe.stage": "flow",
                                  "campe.params_hash": sections_hash(params_file, all_sections)})
    ctx.parent_run_id = run.info.run_id
    return ctx


def _numbers(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a stage summary, as MLflow metric names (a/b/c)."""
    out: dict[str, float] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}".replace("@", "_at_")] = float(v)
    return out


def _log(client, run_id: str, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None):
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    m = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
    p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    log_batch(client, run_id, metrics=m, params=p)


def _section_params(ctx: RunContext, stage: str) -> dict[str, Any]:
    data = read_yaml(ctx.params_file)
    return {f"{sec}.{k}": v for sec in STAGE_SECTIONS[stage] for k, v in (data.get(sec) or {}).items()}


def _tracked(stage: str, ctx: RunContext | None, fn, label: str | None = None, to_metrics=None) -> dict[str, Any]:
    """Run one stage under its own child run: params of its sections, its summary as metrics (`to_metrics`,
    default: the numeric leaves), the run's status."""
    if ctx is None:
        return fn()
    client = ctx.client()
    run_id = client.create_run(ctx.experiment_id, run_name=ctx.run_name(stage, label),
                               tags=ctx.stage_tags(stage)).info.run_id
    _log(client, run_id, params=_section_params(ctx, stage))
    try:
        summary = fn()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    _log(client, run_id, metrics=(to_metrics or _numbers)(summary))
    client.set_terminated(run_id, "FINISHED")
    return {**summary, "mlflow_run_id": run_id}


# ------------------------------------------------------------------------------------------------------- tasks
@task(name="generate")
def generate_task(params_file: str, out: str, ctx: RunContext | None = None) -> dict[str, Any]:
    p = load_params(params_file, "generate", SynthParams)
    return _tracked("generate", ctx, lambda: generate_stage(p, out), Path(params_file).stem)


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (network, img2dataset crash); a bad URL list fails at once."""
    try:
        state.result()
    except DownloadInputError:
        return False
    except Exception:
        return True
    return False


@task(name="download", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unless_bad_input)
def download_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    p = load_params(params_file, "download", DownloadParams)
    return _tracked("download", ctx, lambda: download_stage(p), Path(params_file).stem)


@task(name="cache")
def cache_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    p = load_params(params_file, "cache", CacheParams)
    enc = load_params(params_file, "text_encoder", MultiPromptConfig)
    # --on-mismatch rebuild, as in dvc.yaml: a cache made with other text_encoder params is replaced.
    return _tracked("cache", ctx, lambda: cache_stage(p, enc, on_mismatch="rebuild"), Path(params_file).stem)


@task(name="train")
def train_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    """The training loop makes its own MLflow run; it becomes the train child (named and tagged here)."""
    cfg = load_run_config(params_file)
    if ctx is None:
        return train_stage(cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_name=ctx.run_name("train")))
    id_file = Path(cfg.train.out_dir) / RUN_ID_FILE
    started = time.time()
    try:
        summary = train_stage(cfg)
    finally:  # also a failed run is filed under its flow run (the id file is written when the run starts)
        if id_file.exists() and id_file.stat().st_mtime >= started - 1:
            client = ctx.client()
            for k, v in ctx.stage_tags("train").items():
                client.set_tag(id_file.read_text().strip(), k, v)
    return {**summary, "mlflow_run_id": summary.get("run_id")}


def _base(params_file: str) -> str:
    return os.path.dirname(os.path.abspath(params_file))


@task(name="evaluate")
def evaluate_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    """Evaluation logs into the training run (campe evaluate); the evaluate child gets the same metrics."""
    p = load_params(params_file, "evaluate", EvaluateParams)
    if ctx is None:
        return {name: r["record"]["metrics"] for name, r in evaluate_stage(p, base_dir=_base(params_file)).items()}
    id_file = Path(p.checkpoint) / RUN_ID_FILE
    train_run = id_file.read_text().strip() if id_file.exists() else ""

    def run() -> dict[str, Any]:
        return {name: r["record"]["metrics"] for name, r in evaluate_stage(p, base_dir=_base(params_file)).items()}

    out = _tracked("evaluate", ctx, run, to_metrics=_eval_metrics)
    if train_run:
        ctx.client().set_tag(out["mlflow_run_id"], "campe.train_run_id", train_run)
    return out


def _eval_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{set: {metric: value}} -> the names `campe evaluate` logs into the training run (eval/<set>/<metric>)."""
    return {mlflow_metric_name(ds, k): float(v) for ds, m in results.items() if isinstance(m, dict)
            for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(v)}


# AttriPrompt's stages. The few-shot sets and the CLIP go where prompt_learn reads them (data_root, clip_path: in
# params.yaml the paths dvc.yaml writes); pretrain_clip's metrics and the report's pictures beside the params file.
@task(name="fewshot_data")
def fewshot_data_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    p = load_params(params_file, "fewshot_data", FewShotParams)
    out = prompt_learn_section(params_file).data_root
    return _tracked("fewshot_data", ctx, lambda: fewshot_stage(p, out, progress=False), Path(params_file).stem)


@task(name="pretrain_clip")
def pretrain_clip_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    p = load_params(params_file, "pretrain_clip", PretrainClipParams)
    pl = prompt_learn_section(params_file)
    metrics = os.path.join(_base(params_file), "metrics", "pretrain_clip.json")
    return _tracked("pretrain_clip", ctx, lambda: pretrain_clip_stage(p, pl.data_root, pl.clip_path, metrics,
                                                                      progress=False), Path(params_file).stem)


@task(name="prompt_learn_train")
def prompt_learn_train_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    """Each (method, dataset, seed) cell keeps its own MLflow run (tagged with this child's id)."""
    from campe.attriprompt.trainer import run_all

    p = prompt_learn_section(params_file)

    def run() -> dict[str, Any]:
        rows = run_all(p, base_dir=_base(params_file))
        keys = ("base_acc", "novel_acc", "hm", "source_acc", "xd_avg", "dg_avg")
        return {"cells": {f"{r['method']}/{r['dataset']}/seed{r['seed']}": {k: r[k] for k in keys if k in r}
                          for r in rows}, "cell_runs": [r["mlflow_run_id"] for r in rows]}

    out = _tracked("prompt_learn_train", ctx, run, Path(params_file).stem,
                   to_metrics=lambda s: _numbers({"cells": s["cells"]}))
    if ctx is not None:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=store_uri(p.tracking_uri, _base(params_file)))
        for run_id in out["cell_runs"]:
            client.set_tag(run_id, "campe.flow_stage_run_id", out["mlflow_run_id"])
    return out


@task(name="prompt_learn_eval")
def prompt_learn_eval_task(params_file: str, ctx: RunContext | None = None) -> dict[str, Any]:
    from campe.attriprompt.report import report

    p = prompt_learn_section(params_file)
    plots = os.path.join(_base(params_file), "plots", "prompt_learning")
    metrics = os.path.join(p.metrics_dir, "report.json")
    return _tracked("prompt_learn_eval", ctx, lambda: report(p, plots, metrics), Path(params_file).stem)


# -------------------------------------------------------------------------------------------------------- flow
@flow(name="campe-pipeline")
def campe_pipeline(params_file: str = "params.yaml", generated_dir: str = "data/generated",
                   generate: bool = True) -> dict[str, Any]:
    """generate (embedded default only) -> download -> cache -> train -> evaluate -> fewshot_data, pretrain_clip
    (embedded default only) -> prompt_learn_train -> prompt_learn_eval. Returns each stage's summary
    (+ its MLflow run id) and, under "mlflow", the parent run id."""
    from prefect.runtime import flow_run

    check_params(params_file)  # the whole file, before any stage or MLflow run starts
    ctx = start_parent_run(params_file, flow_run.id)
    results: dict[str, Any] = {}
    try:
        upstream = []
        if generate:
            gen = generate_task.submit(params_file, generated_dir, ctx)
            results["generate"] = gen.result()
            upstream = [gen]
        prev = download_task.submit(params_file, ctx, wait_for=upstream)
        results["download"] = prev.result()
        for name, stage_task in (("cache", cache_task), ("train", train_task), ("evaluate", evaluate_task)):
            prev = stage_task.submit(params_file, ctx, wait_for=[prev])
            results[name] = prev.result()
        attri = [("fewshot_data", fewshot_data_task), ("pretrain_clip", pretrain_clip_task)] if generate else []
        attri += [("prompt_learn_train", prompt_learn_train_task), ("prompt_learn_eval", prompt_learn_eval_task)]
        for name, stage_task in attri:
            prev = stage_task.submit(params_file, ctx, wait_for=[prev])
            results[name] = prev.result()
    except BaseException:
        if ctx is not None:
            ctx.client().set_terminated(ctx.parent_run_id, "FAILED")
        raise
    if ctx is not None:
        client = ctx.client()
        _log(client, ctx.parent_run_id, metrics=_eval_metrics(results["evaluate"]))  # the headline figures
        client.set_terminated(ctx.parent_run_id, "FINISHED")
        results["mlflow"] = {"parent_run_id": ctx.parent_run_id, "experiment_id": ctx.experiment_id}
    return results


def build_deployment(params_file: str = "params.yaml"):
    """The scheduled deployment, declared in code from params.yaml (offline; nothing is registered)."""
    from prefect.client.schemas.schedules import CronSchedule

    fp = load_params(params_file, "flow", FlowParams)
    return campe_pipeline.to_deployment(
        name=fp.deployment_name, schedule=CronSchedule(cron=fp.cron, timezone=fp.timezone),
        parameters={"params_file": params_file, "generated_dir": fp.generated_dir, "generate": fp.generate})


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("action", choices=["run", "show", "serve"], help="run once, show the deployment, or serve it")
    ap.add_argument("--params", default="params.yaml")


def run(args: argparse.Namespace) -> int:
    if args.action == "run":
        fp = load_params(args.params, "flow", FlowParams)
        out = campe_pipeline(args.params, fp.generated_dir, fp.generate)
        print(json.dumps({k: v if k == "mlflow" else sorted(v) for k, v in out.items()}))
        return 0
    dep = build_deployment(args.params)
    if args.action == "show":
        sched = dep.schedules[0].schedule
        print(json.dumps({"deployment": dep.name, "flow": campe_pipeline.name, "cron": sched.cron,
                          "timezone": sched.timezone, "parameters": dep.parameters}, indent=2))
        return 0
    from prefect import serve

    serve(dep)  # blocks; runs each scheduled flow run in a subprocess
    return 0


if __name__ == "__main__":
    import sys

    from campe.cli import main as cli_main

    sys.exit(cli_main(["flow", *sys.argv[1:]]))
