"""Stage `fewshot_data`: the generated few-shot classification sets of the embedded AttriPrompt benchmark.

    campe fewshot_data                              # params.yaml:fewshot_data -> data/fewshot
    campe fewshot_data --out /tmp/fs --params my.yaml

Writes one CoOp-format folder per set (split_zhou_<Name>.json + images/), each set's fewshot_manifest.json and
manifest.json. Resumable: a rerun keeps the sets already made with the same params. See campe/data/synth_fewshot.py.
"""
from __future__ import annotations

import argparse
import json
import time

from campe.core.config import load_params
from campe.core.io import output_lock
from campe.data.synth_fewshot import FewShotParams, generate_fewshot

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "generate the few-shot classification sets (CoOp format) of the AttriPrompt benchmark"

DEFAULT_OUT = "data/fewshot"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (section `fewshot_data`)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


def run_stage(params: FewShotParams, out: str, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    with output_lock(out, "campe fewshot_data"):
        summary = generate_fewshot(params, out, progress)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def run(args: argparse.Namespace) -> int:
    from stages.params import check_params  # here, not at the top: stages.params imports every stage

    check_params(args.params)  # the whole file, before any work
    params = load_params(args.params, "fewshot_data", FewShotParams)
    s = run_stage(params, args.out)
    print(json.dumps({"sets": {k: len(v["classnames"]) for k, v in s["datasets"].items()}, "made": s["made"],
                      "seconds": s["seconds"]}))
    return 0
