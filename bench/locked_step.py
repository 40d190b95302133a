"""Training step time of the two image-tower protocols in one run: scratch (the ViT trained from scratch) vs locked
(frozen EfficientNet-Lite0 features read from the feature cache; only the pool and projections train).

    .venv/bin/python bench/locked_step.py                   # default config, batch 64 (~1 min on 2 CPU cores)
    .venv/bin/python bench/locked_step.py --config tiny --batch 16 --repeats 2

Both steps are the same training step (campe.train.checkpoint.build_run_model for method vanilla: image tower +
the vanilla text tower forward, softmax InfoNCE, backward, AdamW step); only train.image_tower differs. The locked
step includes what it costs in training: the images' content keys (sha256) and the cache lookup; the backbone never
runs in it. Also reported: the one-time cost of the cache (backbone forward, images/s). The steps alternate, so a
burst of load from another process hits both alike; times are the fastest of --repeats after one warm-up. The last
line is a JSON object with the headline figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._timing import alternate, bench_args, clip_step, print_rows, random_captions  # noqa: E402
from campe.core.losses import CampeObjective  # noqa: E402
from campe.locked import build_feature_cache  # noqa: E402
from campe.model import CONFIGS  # noqa: E402
from campe.train.checkpoint import build_run_model  # noqa: E402
from campe.train.optim import make_optimizer  # noqa: E402
from campe.train.run_config import resolve_run_config  # noqa: E402

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="default", choices=list(CONFIGS))
    args = bench_args(ap, repeats=5)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    rows, headline, steps = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="campe-bench-") as tmp:
        for tower in ("scratch", "locked"):
            cfg = resolve_run_config({"model": dict(CONFIGS[args.config]), "train": {
                "method": "vanilla", "image_tower": tower, "image_features_dir": os.path.join(tmp, "feat")}})
            model, _, _ = build_run_model(cfg)
            s = cfg.model.image_size
            images = (torch.rand(B, 3, s, s, generator=g) * 255).to(torch.uint8)
            captions = random_captions(B, g)
            if tower == "locked":
                t = time.perf_counter()
                store = build_feature_cache(os.path.join(tmp, "feat"), model.visual, images=images, progress=False)
                t_cache = time.perf_counter() - t
                model.visual.attach(store, strict=True)
                calls = model.visual.backbone.calls
                rows.append((f"feature cache, {B} images (once per image)", f"{t_cache * 1e3:.0f} ms",
                             f"{B / t_cache:.0f} images/s"))
                headline["cache_images_per_s"] = round(B / t_cache, 1)
            n_img = sum(p.numel() for p in model.visual.parameters() if p.requires_grad)
            rows.append((f"trainable image-side parameters ({tower})", f"{n_img / 1e6:.2f} M", ""))
            headline[f"{tower}_image_params_M"] = round(n_img / 1e6, 3)
            steps[tower] = clip_step(model, CampeObjective("softmax"), images, model.text.tokenize(captions),
                                     make_optimizer(model, cfg.train))
            steps[tower]()  # warm-up
        times = alternate(steps, args.repeats, warmup=False)
        assert model.visual.backbone.calls == calls, "a locked step ran the backbone"
    for tower, ts in times.items():
        t_step = min(ts)
        rows.append((f"train step ({tower}), batch {B}", f"{t_step * 1e3:.0f} ms", f"{B / t_step:.0f} pairs/s"))
        headline[f"train_step_{tower}_ms"] = round(t_step * 1e3, 1)
    headline["speedup_locked"] = round(headline["train_step_scratch_ms"] / headline["train_step_locked_ms"], 2)
    headline.update(config=args.config, batch=B, threads=torch.get_num_threads())
    print_rows(f"campe locked-vs-scratch step bench: config={args.config} batch={B} threads={torch.get_num_threads()}",
               rows, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
