"""Cost of the model towers on this machine: parameters, image/video encoding throughput, one training step.

    .venv/bin/python bench/model_step.py                    # default config, batch 64 (~1 min on 2 CPU cores)
    .venv/bin/python bench/model_step.py --config tiny --batch 16 --repeats 2

Rows: image encode (no grad, images/s), video encode (no grad, `frames` frames per clip, clips/s), and a full
training step of the vanilla-CLIP model (image tower + text tower forward, softmax InfoNCE, backward, AdamW step;
s/step and pairs/s), also with SigLIP (sigmoid) loss. Captions are ~12-token synthetic ones, tokenised once.
Times are the fastest of --repeats runs after one warm-up. The last line is a JSON object with the headline
figures.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._timing import alternate, bench_args, clip_step, fastest, print_rows, random_captions  # noqa: E402
from campe.core.losses import CampeObjective  # noqa: E402
from campe.model import build_model  # noqa: E402

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="default")
    args = bench_args(ap, repeats=3)
    g = torch.Generator().manual_seed(0)
    rows, headline, steps = [], {}, {}
    for kind in ("softmax", "sigmoid"):
        model, cfg = build_model(args.config, contrastive=kind)
        B, s = args.batch, cfg["image_size"]
        images = torch.rand(B, 3, s, s, generator=g)
        captions = random_captions(B, g)
        steps[kind] = clip_step(model, CampeObjective(kind), images, model.text.tokenize(captions),
                                torch.optim.AdamW(model.parameters(), lr=1e-4))
        if kind == "softmax":
            n_vis = sum(p.numel() for p in model.visual.parameters())
            n_txt = sum(p.numel() for p in model.text.parameters())
            rows.append(("parameters (vision / text)", f"{n_vis / 1e6:.2f} M / {n_txt / 1e6:.2f} M", ""))
            model.eval()
            with torch.no_grad():
                t_img = fastest(lambda: model.encode_image(images), args.repeats)
                clips = torch.rand(max(1, B // cfg["frames"]), cfg["frames"], 3, s, s, generator=g)
                t_vid = fastest(lambda: model.encode_video(clips), args.repeats)
            model.train()
            rows.append((f"image encode, batch {B}", f"{t_img * 1e3:.1f} ms", f"{B / t_img:.0f} images/s"))
            rows.append((f"video encode, {clips.shape[0]} clips x {cfg['frames']} frames", f"{t_vid * 1e3:.1f} ms",
                         f"{clips.shape[0] / t_vid:.1f} clips/s"))
            headline.update(images_per_s=round(B / t_img, 1), clips_per_s=round(clips.shape[0] / t_vid, 2),
                            vision_params_M=round(n_vis / 1e6, 3), text_params_M=round(n_txt / 1e6, 3))
    times = alternate(steps, args.repeats)  # the two objectives' steps alternate
    for kind, ts in times.items():
        t_step = min(ts)
        rows.append((f"train step ({kind}), batch {args.batch}", f"{t_step * 1e3:.0f} ms",
                     f"{args.batch / t_step:.0f} pairs/s"))
        headline[f"train_step_{kind}_ms"] = round(t_step * 1e3, 1)
    headline.update(config=args.config, batch=args.batch, threads=torch.get_num_threads())
    print_rows(f"campe model bench: config={args.config} batch={args.batch} threads={torch.get_num_threads()}",
               rows, headline, time_width=12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
