"""Stage `fewshot_data`: the generated few-shot classification sets of the embedded AttriPrompt benchmark.

    campe fewshot_data                              # params.yaml:fewshot_data -> data/fewshot
    campe fewshot_data --out /tmp/fs --params my.yaml

Writes one CoOp-format folder per set (split_zhou_<Name>.json + images/), each set's fewshot_manifest.json and
manifest.json. Resumable: a rerun keeps the sets already made with the same params. See campe/data/synth_fewshot.py.
"""
from __future__ import annotations

import argparse

from campe.data.synth_fewshot import FewShotParams, generate_fewshot
from stages._generator import locked_and_timed, run_command

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "generate the few-shot classification sets (CoOp format) of the AttriPrompt benchmark"

DEFAULT_OUT = "data/fewshot"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (section `fewshot_data`)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


def run_stage(params: FewShotParams, out: str, progress: bool = True) -> dict:
    return locked_and_timed(out, "campe fewshot_data", lambda: generate_fewshot(params, out, progress))


def run(args: argparse.Namespace) -> int:
    return run_command(args, "fewshot_data", FewShotParams, run_stage, lambda s: {
        "sets": {k: len(v["classnames"]) for k, v in s["datasets"].items()}, "made": s["made"],
        "seconds": s["seconds"]})
