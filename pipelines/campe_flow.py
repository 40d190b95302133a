"""Prefect flow that chains campe's stages (the same stage functions that `campe <stage>` and dvc run).

    python -m pipelines.campe_flow                         # one run on params.yaml (temporary local Prefect server)
    python -m pipelines.campe_flow --params my.yaml

Design: each task calls a stage function in-process with the params file's section, so a flow run and `dvc repro`
produce the same artifacts from the same code; the download task has retries (network errors are the usual reason
a run fails). Tasks are submitted to Prefect's thread-pool runner, i.e. they do not run on the main thread, which is
why the download stage runs img2dataset in a process of its own (it installs a SIGINT handler).
"""
from __future__ import annotations

import argparse
from typing import Any

from prefect import flow, task

from campe.config import load_params
from campe.synth import SynthParams
from stages.download import DownloadInputError, DownloadParams, download_stage
from stages.generate import run_stage as generate_stage


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


def main() -> None:
    ap = argparse.ArgumentParser(description="run the campe pipeline once as a Prefect flow")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--generated-dir", default="data/generated")
    ap.add_argument("--no-generate", action="store_true", help="skip the generator (real datasets)")
    args = ap.parse_args()
    campe_pipeline(args.params, args.generated_dir, not args.no_generate)


if __name__ == "__main__":
    main()
