"""Step cost of AttriPrompt's image-conditioned prompts: naive (one text pass per image and class) vs shared passes
(one per distinct retrieved composition and class) vs CoOp (one static pass per class), as ratios in one run.

    .venv/bin/python bench/attriprompt_step.py                           # small CLIPConfig in code, ~1 min
    .venv/bin/python bench/attriprompt_step.py --batch 4 --classes 50 --repeats 3
    .venv/bin/python bench/attriprompt_step.py --clip data/clip          # a real CLIP folder instead

A step = the method's loss from cached frozen image outputs (features + k-means centres, as with augment: false)
+ backward + SGD; the frozen image pass (with the k-means) is timed on its own row. The batch is `--distinct`
images each repeated (with light noise), so that some images may retrieve the same composition; how many distinct
compositions the batch had (G) is printed, since the sharing gain is B / G at best. Random weights: the cost of a
step does not depend on them, but G does (a trained pool on real images may share more or less). Times: the
fastest of --repeats after one warm-up. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from campe.attriprompt.backbone import load_backbone  # noqa: E402
from campe.attriprompt.config import PromptLearnParams  # noqa: E402
from campe.attriprompt.methods import build_method, class_text, vision_pass  # noqa: E402
from tests.attri_tiny import class_names, save_tiny_clip  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def step_fn(method, vis, ct, labels, lr: float):
    opt = torch.optim.SGD([q for q in method.parameters() if q.requires_grad], lr=lr, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        method.losses(vis, ct, labels)["loss"].backward()
        opt.step()
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default="", help="a CLIP folder (default: a small random CLIPConfig built here)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--distinct", type=int, default=4, help="distinct images in the batch (each repeated)")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.clip or save_tiny_clip(tempfile.mkdtemp(prefix="attri-bench-"), layers=4, width=128,
                                         image_size=32, patch=4)
    bb = load_backbone(folder)
    size = bb.model.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.distinct, 3, size, size, generator=g)
    pixels = base.repeat((args.batch + args.distinct - 1) // args.distinct, 1, 1, 1)[:args.batch]
    pixels = pixels + 0.01 * torch.randn(pixels.shape, generator=g)
    labels = torch.arange(args.batch) % args.classes
    p = PromptLearnParams(pool_size=10, top_n=2)
    ct = class_text(bb, class_names(args.classes), p.templates[:1])
    rows, groups = {}, 0
    for name, method, params in (("coop", "coop", p), ("attriprompt naive", "attriprompt",
                                                        dataclasses.replace(p, shared_passes=False)),
                                 ("attriprompt shared", "attriprompt", p)):
        m = build_method(method, bb, params, seed=0)
        vis = vision_pass(bb, pixels, m.vision_layers(), params)
        if name == "attriprompt shared":
            groups = m.text_features(vis, ct)[0].shape[0]
            rows["image pass + k-means"] = timed(lambda: vision_pass(bb, pixels, m.vision_layers(), params),
                                                 args.repeats)
        rows[name] = timed(step_fn(m, vis, ct, labels, p.lr), args.repeats)
    cfg = bb.model.config
    print(f"CLIP: text {cfg.text_config.num_hidden_layers}x{cfg.text_config.hidden_size}, vision "
          f"{cfg.vision_config.num_hidden_layers}x{cfg.vision_config.hidden_size} ({size} px); batch {args.batch} "
          f"({args.distinct} distinct images), {args.classes} classes, threads {torch.get_num_threads()}; "
          f"distinct compositions G = {groups}")
    print(f"{'row':<24} {'s/step':>9} {'x CoOp':>8}")
    for k, v in rows.items():
        print(f"{k:<24} {v:>9.4f} {v / rows['coop']:>8.2f}")
    out = {"bench": "attriprompt_step", "batch": args.batch, "distinct_images": args.distinct,
           "classes": args.classes, "compositions": groups, "threads": torch.get_num_threads(),
           **{k.replace(" ", "_").replace("+", "and").replace("-", "_") + "_s": round(v, 5) for k, v in rows.items()},
           "naive_over_coop": round(rows["attriprompt naive"] / rows["coop"], 3),
           "shared_over_coop": round(rows["attriprompt shared"] / rows["coop"], 3),
           "naive_over_shared": round(rows["attriprompt naive"] / rows["attriprompt shared"], 3)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
