"""Stage `prompt_learn_eval`: the report of the prompt_learn run (after `campe prompt-learn train`).

    campe prompt_learn_eval                          # params.yaml:prompt_learn -> plots/prompt_learning, report.json
    campe prompt_learn_eval --plots /tmp/p --metrics /tmp/report.json

Reads the per-cell metrics and the saved prompt learners; writes base/novel/HM per method (bnh.png), the retrieved
prompt usage per text block (usage_<dataset>.png), the k-means clusters over a few images (clusters.png) and
--metrics (method averages with seed spread, pool entries in use). Same params section as training (prompt_learn):
the checkpoints are bound to it by hash, so a section of its own would only repeat the paths.
See campe/attriprompt/report.py.
"""
from __future__ import annotations

import argparse
import json

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "report of the prompt_learn run: B/N/HM per method, retrieved-prompt usage, k-means clusters (plots + JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (section `prompt_learn`)")
    p.add_argument("--plots", default="plots/prompt_learning", help="folder of the pictures")
    p.add_argument("--metrics", default="metrics/prompt_learning/report.json", help="the report (JSON)")


def run(args: argparse.Namespace) -> int:
    from campe.attriprompt.config import PromptLearnParams
    from campe.attriprompt.report import report
    from campe.core.config import from_dict
    from stages.params import check_params

    data = check_params(args.params)  # the whole file, before any work
    p = from_dict(PromptLearnParams, data.get("prompt_learn") or {}, f"{args.params}:prompt_learn")
    out = report(p, args.plots, args.metrics)
    print(json.dumps({"average": {m: {k: round(v["mean"], 2) for k, v in a.items()}
                                  for m, a in out.get("average", {}).items()}, "retrieval": out["retrieval"]}))
    return 0
