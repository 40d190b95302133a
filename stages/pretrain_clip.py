"""Stage `pretrain_clip`: train the small frozen CLIP of the embedded AttriPrompt benchmark (no network, no GPU).

    campe pretrain_clip                             # params.yaml:pretrain_clip; data/fewshot -> data/models/clip
    campe pretrain_clip --fewshot data/fewshot --out /tmp/clip --metrics /tmp/clip.json

The output folder loads with CLIPModel / AutoTokenizer / CLIPImageProcessor .from_pretrained. The few-shot sets are
read for two things only: their pixel hashes (the pretraining pairs skip any equal image) and the zero-shot accuracy
on their test splits, written to --metrics (and metrics.json in the folder). See campe/pretrain_clip.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from campe.core.config import load_params
from campe.core.io import output_lock, write_metrics
from campe.pretrain_clip import PretrainClipParams, pretrain_clip

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "pretrain the small CLIP (transformers CLIPModel) the AttriPrompt benchmark keeps frozen"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (section `pretrain_clip`)")
    p.add_argument("--fewshot", default="data/fewshot", help="the few-shot sets (campe fewshot_data's output)")
    p.add_argument("--out", default="data/models/clip", help="model folder to write (save_pretrained)")
    p.add_argument("--metrics", default="metrics/pretrain_clip.json", help="zero-shot accuracy per set (JSON)")


def run_stage(params: PretrainClipParams, fewshot: str, out: str, metrics: str, progress: bool = True) -> dict:
    if not Path(fewshot, "manifest.json").exists():
        raise FileNotFoundError(f"{fewshot}/manifest.json not found: make the few-shot sets first "
                                f"(campe fewshot_data --out {fewshot})")
    with output_lock(out, "campe pretrain_clip"):
        summary = pretrain_clip(params, fewshot, out, progress)
    # no timings: the metrics file is hashed into dvc.lock (two clones must agree); the command prints them
    keep = ("pairs", "skipped_as_fewshot", "steps", "loss_first", "loss_last", "parameters", "zero_shot")
    # `dvc metrics show` prints the headline, two columns in its one wide table: the zero-shot top-1 over all
    # classes, averaged over the sets, beside chance averaged alike; the full file beside it keeps every set's
    # figures (all classes, base, novel, HM), the loss and the counts.
    zs = list(summary["zero_shot"].values())
    head = {"zero_shot_top1_mean": sum(z["accuracy"] for z in zs) / max(1, len(zs)),
            "chance_top1_mean": sum(z["chance"] for z in zs) / max(1, len(zs))}
    write_metrics(metrics, {k: summary[k] for k in keep}, head)
    return summary


def run(args: argparse.Namespace) -> int:
    from stages.params import check_params  # here, not at the top: stages.params imports every stage

    check_params(args.params)
    params = load_params(args.params, "pretrain_clip", PretrainClipParams)
    s = run_stage(params, args.fewshot, args.out, args.metrics)
    print(json.dumps({"zero_shot_accuracy": {k: v["accuracy"] for k, v in s["zero_shot"].items()},
                      "chance": {k: v["chance"] for k, v in s["zero_shot"].items()}, "seconds": s["seconds"]}))
    return 0
