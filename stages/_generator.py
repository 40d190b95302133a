"""What the data-generating stages (generate, fewshot_data) share: hold the output folder's lock while the
generator runs, time it, and the command's run(): check the params file, load the stage's section, print a one-line
JSON summary.

    def run_stage(params, out):  return locked_and_timed(out, "campe generate", lambda: generate(params, out))
    def run(args):               return run_command(args, "generate", SynthParams, run_stage, brief)
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

from campe.core.config import load_params
from campe.core.io import output_lock


def locked_and_timed(out: str, what: str, make: Callable[[], dict]) -> dict:
    """make() while holding `out`'s lock (`what` names the holder); its summary gains `seconds` (wall time)."""
    t0 = time.perf_counter()
    with output_lock(out, what):
        summary = make()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def run_command(args: argparse.Namespace, section: str, cls: type, run_stage: Callable[[Any, str], dict],
                brief: Callable[[dict], dict]) -> int:
    """The stage command: check the whole params file (before any work), load `section` as `cls`, run_stage(params,
    args.out), print brief(summary) as one JSON line."""
    from stages.params import check_params  # here, not at the top: stages.params imports every stage

    check_params(args.params)
    params = load_params(args.params, section, cls)
    print(json.dumps(brief(run_stage(params, args.out))))
    return 0
