"""Stage `train`: train CAMPE (or a baseline) on the downloaded shards, from the cache or online; log to MLflow.

    campe train                                         # params.yaml: text_encoder, model, loss, train
    campe train --method vanilla --out models/vanilla   # a baseline (see campe.train.run_config.METHODS)
    campe train --resume                                # continue a stopped or killed run from its checkpoint
    campe train --cache none                            # no cache: the frozen LM layers run every step
    campe train --register campe                        # also register the run's MLflow Model as a new version
    torchrun --nproc_per_node 2 -m campe.cli train      # DDP (gloo on CPU, NCCL on GPU)

Writes out_dir/{model.pt, ckpt_last.pt, model_config.json, train_config.json, train_log.csv, loss_curve.png,
mlflow_run_id.txt, metrics.json} and train.metrics_file; prints a JSON summary (final loss terms, samples/s).
With a tracking store, the MLflow run gets its datasets (the shards and the cache, with DVC's digests) at the start
and, at the end, the model as an MLflow Model (runs:/<run id>/model, campe.mlflow_model), registered when
train.register_model (or --register) names it.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from campe.train.loop import train
from campe.train.run_config import METHODS, RunConfig, TRAIN_SECTIONS, resolve_run_config
from stages.params import check_params

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "train CAMPE or a baseline from the cache or online (DDP under torchrun, MLflow)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (sections text_encoder, model, loss, train)")
    p.add_argument("--shards", help="webdataset shards of the download stage (default: train.shards_dir)")
    p.add_argument("--cache", help="frozen-state cache of the cache stage, or 'none' to run the frozen layers online "
                                   "(default: train.cache_dir)")
    p.add_argument("--out", help="output folder (default: train.out_dir)")
    p.add_argument("--metrics", help="final metrics JSON for DVC (default: train.metrics_file)")
    p.add_argument("--method", choices=list(METHODS), help="method or baseline (default: train.method)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: train.steps, or train.epochs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt_last.pt if it exists")
    p.add_argument("--stop-at", type=int, help="pause after this step (checkpointed; continue with --resume)")
    p.add_argument("--register", metavar="NAME", help="register the run's MLflow Model under NAME in the store's "
                                                      "Model Registry (default: train.register_model)")


def load_run_config(path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The four sections of a params file (+ overrides of the train section) -> RunConfig; the whole file is
    checked first."""
    data = check_params(path)
    sections = {k: dict(data.get(k) or {}) for k in TRAIN_SECTIONS}
    sections["train"].update(overrides or {})
    cfg = resolve_run_config(sections, str(path))
    cfg.base_dir = os.path.dirname(os.path.abspath(path))  # a relative MLflow store lives beside the params file
    return cfg


def run_stage(cfg: RunConfig, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train; a finished run with a tracking store also gets its MLflow Model (and a registered version when
    train.register_model names one)."""
    summary = train(cfg, resume=resume, stop_at=stop_at)
    if "final" in summary and summary.get("run_id") and cfg.train.tracking_uri:  # rank 0 of a finished run
        from campe.core.io import store_uri
        from campe.mlflow_model import log_model, register_model

        uri = store_uri(cfg.train.tracking_uri, cfg.base_dir or None)
        log_model(uri, summary["run_id"], summary["out_dir"])
        summary["mlflow_model"] = f"runs:/{summary['run_id']}/model"
        if cfg.train.register_model:
            version = register_model(uri, summary["run_id"], cfg.train.register_model)
            summary["registered_model"] = f"models:/{version.name}/{version.version}"
    return summary


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for arg, key in (("shards", "shards_dir"), ("out", "out_dir"), ("metrics", "metrics_file"),
                     ("method", "method"), ("steps", "steps"), ("register", "register_model")):
        if getattr(args, arg) is not None:
            overrides[key] = getattr(args, arg)
    if args.cache is not None:
        overrides["cache_dir"] = "" if args.cache.lower() == "none" else args.cache
    cfg = load_run_config(args.params, overrides)
    summary = run_stage(cfg, resume=args.resume, stop_at=args.stop_at)
    if "final" in summary or (summary.get("stopped") and os.environ.get("RANK", "0") == "0"):  # rank 0 only
        print(json.dumps(summary))
    return 0
