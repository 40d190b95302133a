"""Stage `generate`: make the embedded default benchmark (no network, no GPU).

    campe generate                                  # params.yaml:generate -> data/generated
    campe generate --out /tmp/gen --params my.yaml

Writes images + Karpathy JSON, URL lists (URLs relative to the list: ../images/<key>.jpg), MSR-VTT-style videos and
annotations, and manifest.json. See campe/data/synth.py for the design of the benchmark.
"""
from __future__ import annotations

import argparse

from campe.data.synth import SynthParams, generate
from stages._generator import locked_and_timed, run_command

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "generate the embedded default benchmark (images, videos, annotations)"

DEFAULT_OUT = "data/generated"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (section `generate`)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


def run_stage(params: SynthParams, out: str) -> dict:
    return locked_and_timed(out, "campe generate", lambda: generate(params, out))


def run(args: argparse.Namespace) -> int:
    return run_command(args, "generate", SynthParams, run_stage, lambda s: {
        k: s[k] for k in ("images", "image_captions", "videos", "video_captions", "seconds")})
