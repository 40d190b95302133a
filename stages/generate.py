"""Stage `generate`: make the embedded default benchmark (no network, no GPU).

    campe generate                                  # params.yaml:generate -> data/generated
    campe generate --out /tmp/gen --params my.yaml

Writes images + Karpathy JSON, URL lists (URLs relative to the list: ../images/<key>.jpg), MSR-VTT-style videos and
annotations, and manifest.json. See campe/data/synth.py for the design of the benchmark.
"""
from __future__ import annotations

import argparse
import json
import time

from campe.core.config import load_params
from campe.core.io import output_lock
from campe.data.synth import SynthParams, generate

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "generate the embedded default benchmark (images, videos, annotations)"

DEFAULT_OUT = "data/generated"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (section `generate`)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


def run_stage(params: SynthParams, out: str) -> dict:
    t0 = time.perf_counter()
    with output_lock(out, "campe generate"):
        summary = generate(params, out)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def run(args: argparse.Namespace) -> int:
    from stages.params import check_params  # here, not at the top: stages.params imports every stage

    check_params(args.params)  # the whole file, before any work
    params = load_params(args.params, "generate", SynthParams)
    summary = run_stage(params, args.out)
    print(json.dumps({k: summary[k] for k in ("images", "image_captions", "videos", "video_captions", "seconds")}))
    return 0
