"""Prefect flow that chains campe's stages (the same stage functions that `campe <stage>` and dvc run).

    campe flow run                     # one run on params.yaml (a temporary local Prefect server if none is set)
    campe flow show                    # the scheduled deployment declared from params.yaml:flow
    campe flow serve                   # serve that deployment: runs on its cron schedule (needs a Prefect server:
                                       #   `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api)

Design: each task calls a stage function in-process with the params file's section, so a flow run and `dvc repro`
produce the same artifacts from the same code; the download task has retries (network errors are the usual reason
a run fails). Tasks are submitted to Prefect's thread-pool runner, i.e. they do not run on the main thread, which is
why the download stage runs img2dataset in a process of its own (it installs a SIGINT handler).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from prefect import flow, task

from campe.config import load_params
from campe.synth import SynthParams
from stages.download import DownloadInputError, DownloadParams, download_stage
from stages.generate import run_stage as generate_stage


@dataclass
class FlowParams:
    """params.yaml section `flow`: the scheduled deployment."""

    deployment_name: str = "campe-scheduled"
    cron: str = "0 3 * * *"  # every day at 03:00
    timezone: str = "UTC"
    generate: bool = True  # run the generator first (embedded default); false for real datasets
    generated_dir: str = "data/generated"

    def validate(self) -> None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except Exception as e:  # pydantic names what is wrong with the expression
            raise ValueError(f"cron {self.cron!r} / timezone {self.timezone!r} is not a valid schedule: {e}") from None


@task(name="generate")
def generate_task(params_file: str, out: str) -> dict[str, Any]:
    return generate_stage(load_params(params_file, "generate", SynthParams), out)


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
def download_task(params_file: str) -> dict[str, Any]:
    return download_stage(load_params(params_file, "download", DownloadParams))


@flow(name="campe-pipeline")
def campe_pipeline(params_file: str = "params.yaml", generated_dir: str = "data/generated",
                   generate: bool = True) -> dict[str, Any]:
    """generate (embedded default only) -> download. Returns each stage's summary."""
    results: dict[str, Any] = {}
    upstream = []
    if generate:
        gen = generate_task.submit(params_file, generated_dir)
        results["generate"] = gen.result()
        upstream = [gen]
    results["download"] = download_task.submit(params_file, wait_for=upstream).result()
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
        print(json.dumps({k: sorted(v) if isinstance(v, dict) else v for k, v in out.items()}))
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
