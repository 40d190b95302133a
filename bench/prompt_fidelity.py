"""Can the K prompts differ? Train a reduced default per fidelity variant and measure its prompt diagnostics.

    .venv/bin/python bench/prompt_fidelity.py                       # 1000 train images, 2 epochs (~15-30 min, 2 cores)
    .venv/bin/python bench/prompt_fidelity.py --train-images 300 --epochs 1 --variants shared distinct

In a temp folder: the generated benchmark (reduced: --train-images, 64 px), the download stage's shards, one text
cache per placeholder mode (the cache stage), then per variant the train loop with the default params
(multi_prompt_div_neg, MiniLM-L6, K=6 + negation, last layer trainable, batch 64, lr 5e-4), changed only as the
variant says. Per variant, campe.text.diagnostics on 64 fixed val captions, at initialisation and after training:
prompt_state_cosine (mean pairwise cosine of the K pooled LM states), the same centred over the captions,
apt_movement (||apt - apt0|| / ||apt0||) and the APTs' pairwise cosine; plus the final loss.
Variants: shared (today's default), distinct (apt_placeholder), distinct_lr10 (+ train.apt_lr_mult 10),
distinct_lr10_pooled (+ loss.div_space pooled), shared_lr10_pooled (apt_lr_mult 10 + pooled, shared placeholder).
The last line is a JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CAMPE_NO_PROGRESS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from campe.core.config import from_dict  # noqa: E402
from campe.data.synth import SynthParams, generate  # noqa: E402
from campe.text.diagnostics import text_diagnostics  # noqa: E402
from campe.train.checkpoint import build_run_model  # noqa: E402
from campe.train.loop import train  # noqa: E402
from campe.train.run_config import resolve_run_config  # noqa: E402
from stages.cache import CacheParams, run_stage as cache_stage  # noqa: E402
from stages.download import DownloadParams, run_stage as download_stage  # noqa: E402

VARIANTS = {
    "shared": ({}, {}, {}),
    "distinct": ({"apt_placeholder": "distinct"}, {}, {}),
    "distinct_lr10": ({"apt_placeholder": "distinct"}, {}, {"apt_lr_mult": 10.0}),
    "distinct_lr10_pooled": ({"apt_placeholder": "distinct"}, {"div_space": "pooled"}, {"apt_lr_mult": 10.0}),
    "shared_lr10_pooled": ({}, {"div_space": "pooled"}, {"apt_lr_mult": 10.0}),
}
SECTIONS = ("text_encoder", "model", "loss", "train")


def prepare(tmp: Path, train_images: int) -> Path:
    """Generated benchmark -> download-stage shards; returns the shards folder."""
    gen = tmp / "generated"
    generate(SynthParams(train_images=train_images, val_images=10, test_images=10, train_videos=0, test_videos=0),
             gen)
    shards = tmp / "shards"
    download_stage(DownloadParams(url_list=str(gen / "urls" / "train.parquet"), output_dir=str(shards),
                                  stats_file=str(tmp / "stats.json"), extra_columns=["image_id"],
                                  processes_count=1, thread_count=8, number_sample_per_shard=1000))
    return shards


def run_variant(name: str, base: dict, shards: Path, tmp: Path, epochs: int) -> dict:
    te, loss, tr = VARIANTS[name]
    s = {k: dict(base[k]) for k in SECTIONS}
    s["text_encoder"].update(te)
    s["loss"].update(loss)
    cache = tmp / f"cache-{s['text_encoder'].get('apt_placeholder', 'shared')}"
    s["train"].update(tr, shards_dir=str(shards), cache_dir=str(cache), out_dir=str(tmp / name), epochs=epochs,
                      steps=0, metrics_file="", tracking_uri="", progress=False)
    cfg = resolve_run_config(s)
    if not (cache / "manifest.json").exists():
        cp = from_dict(CacheParams, {**base["cache"], "shards_dir": str(shards), "output_dir": str(cache)}, "cache")
        cache_stage(cp, cfg.text_encoder)
    init = text_diagnostics(build_run_model(cfg)[0].text)
    t0 = time.perf_counter()
    summary = train(cfg)
    metrics = json.loads((tmp / name / "metrics.json").read_text())
    return {"init": {k: round(v, 6) for k, v in init.items()},
            "trained": {k: metrics[k] for k in init}, "steps": summary["step"],
            "final_loss": metrics.get("mean_last10_loss"), "train_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--params", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "params.yaml"))
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.params).read_text())
    results = {}
    with tempfile.TemporaryDirectory(prefix="campe-fidelity-") as d:
        tmp = Path(d)
        shards = prepare(tmp, args.train_images)
        for name in args.variants:
            results[name] = run_variant(name, base, shards, tmp, args.epochs)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    keys = ("prompt_state_cosine", "prompt_state_cosine_centred", "apt_movement", "apt_pairwise_cosine")
    print(f"reduced default: {args.train_images} train images x 2 captions, {args.epochs} epochs; "
          f"diagnostics on 64 fixed val captions (init -> trained)")
    print(f"{'variant':<22}" + "".join(f" {k:>30}" for k in keys) + f" {'final loss':>11}")
    for name, r in results.items():
        cells = "".join(f" {r['init'][k]:>14.4f} -> {r['trained'][k]:<12.4f}" for k in keys)
        print(f"{name:<22}{cells} {r['final_loss'] or float('nan'):>11.4f}")
    print(json.dumps({"bench": "prompt_fidelity", "train_images": args.train_images, "epochs": args.epochs,
                      **results}))


if __name__ == "__main__":
    main()
