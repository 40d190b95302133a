"""`campe prompt-learn`: AttriPrompt and its baselines on a frozen CLIP, under the few-shot protocol of the field.

    campe prompt-learn train                          # params.yaml prompt_learn: every method x dataset x seed
    campe prompt-learn train --methods coop,attriprompt --datasets SynthNet --seeds 1
    campe prompt-learn train --protocol cross         # source on all classes -> cross-dataset and DG targets
    campe prompt-learn eval                           # re-evaluate the saved prompt learners, rewrite the metrics
    campe prompt-learn train --force                  # redo cells whose metrics already match this config
    campe prompt-learn grid --out /tmp/grid           # the comparison: 9 variants x seeds x every generated set,
                                                      #   both protocols, resumable; table.{md,csv,png,json}
    campe prompt-learn grid --out /tmp/grid --table-only   # the table from the cells that exist
    campe prompt-learn grid --out /tmp/grid-e10 --seeds 1,2,3 --epochs 10   # another budget, the same for every cell

Writes <out_dir>/<protocol>/<method>/<dataset>/seed<k>/{prompt_learner.pt, mlflow_run_id.txt},
<metrics_dir>/<protocol>/<method>/<dataset>/seed<k>.json (one per cell; an MLflow run each) and
<metrics_dir>/<protocol>/summary.{json,md} (seed means and stds, the dataset averages, HM of the mean B and N).
The dvc stage `prompt_learn_train` runs `train`; `prompt_learn_eval` (stages/prompt_learn_eval.py) draws and
summarises. `grid`: campe.attriprompt.grid (the section's seeds and budget; methods/datasets come from the grid).
"""
from __future__ import annotations

import argparse
import json
import os

from campe.attriprompt.config import PromptLearnParams
from campe.core.config import from_dict

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "AttriPrompt and its baselines on a frozen CLIP: few-shot train / eval (base-to-novel, cross-dataset, DG)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "eval", "grid"],
                   help="train (then evaluate) every cell, re-evaluate, or run the comparison grid")
    p.add_argument("--params", default="params.yaml", help="params file (section prompt_learn)")
    p.add_argument("--methods", help="comma-separated methods (default: prompt_learn.methods)")
    p.add_argument("--datasets", help="comma-separated datasets (default: prompt_learn.datasets)")
    p.add_argument("--seeds", help="comma-separated seeds (default: prompt_learn.seeds)")
    p.add_argument("--protocol", choices=["base2new", "cross"], help="default: prompt_learn.protocol")
    p.add_argument("--epochs", type=int, help="override prompt_learn.epochs (every method, every cell: one budget)")
    p.add_argument("--force", action="store_true", help="train again cells whose metrics match this config")
    p.add_argument("--out", help="grid: its folder (models, metrics, mlflow.db and table.* of every variant)")
    p.add_argument("--variants", help="grid: comma-separated subset of campe.attriprompt.grid.VARIANTS")
    p.add_argument("--table-only", action="store_true", help="grid: only (re)write the table from existing cells")


def load_section(path: str, overrides: dict | None = None) -> PromptLearnParams:
    """The prompt_learn section (+ CLI overrides), validated; the whole params file is checked first."""
    from stages.params import check_params

    data = check_params(path)
    merged = {**(data.get("prompt_learn") or {}), **(overrides or {})}
    return from_dict(PromptLearnParams, merged, f"{path}:prompt_learn")


def run(args: argparse.Namespace) -> int:
    from campe.attriprompt.trainer import run_all

    overrides: dict = {}
    for name, conv in (("methods", str), ("datasets", str), ("seeds", int)):
        value = getattr(args, name)
        if value:
            overrides[name] = [conv(v.strip()) for v in value.split(",") if v.strip()]
    if args.protocol:
        overrides["protocol"] = args.protocol
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    p = load_section(args.params, overrides)
    if args.action == "grid":
        return _grid(p, args)
    rows = run_all(p, base_dir=os.path.dirname(os.path.abspath(args.params)),
                   evaluate_only=args.action == "eval", force=args.force)
    keys = ("method", "dataset", "seed", "base_acc", "novel_acc", "hm", "source_acc", "xd_avg", "dg_avg")
    for r in rows:
        print(json.dumps({k: r[k] for k in keys if k in r}))
    print(f"summary: {os.path.join(p.metrics_dir, p.protocol, 'summary.md')}")
    return 0


def _grid(p: PromptLearnParams, args: argparse.Namespace) -> int:
    from campe.attriprompt.grid import VARIANTS, grid_table, run_grid

    if not args.out:
        raise SystemExit("campe prompt-learn grid: give --out DIR (the grid's own folder; resumable)")
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    bad = [v for v in variants or [] if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if not args.table_only:
        run_grid(p, args.out, variants)
    grid_table(p, args.out, variants)
    print(f"table: {os.path.join(args.out, 'table.md')}")
    return 0
