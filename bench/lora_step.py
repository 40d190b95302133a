"""What the mean_lora baseline costs: one training step, mean pooling from the cache vs mean pooling + LoRA (online).

    .venv/bin/python bench/lora_step.py                    # default config (MiniLM-L6, model defaults), batch 64
    .venv/bin/python bench/lora_step.py --batch 32 --repeats 3 --threads 1

Rows (each a full training step of the default model: image tower + text tower forward, the softmax objective,
backward, AdamW step; built by campe.train.checkpoint.build_run_model from the default params sections):
  (a) mean, cached: cached frozen states (float16, as the cache stores them) -> the last LM layer -> mean pool ->
      head; backward through the last layer (the default training path of `mean`).
  (b) mean, online: the same, with the frozen layers run under no_grad in the step (no cache).
  (c) mean_lora, online: LoRA (r 8, alpha 16, query/value of every layer) on the frozen LM: every layer runs forward
      with autograd and the backward goes through all of them to the adapters; nothing can be cached.
Per row: trainable parameters, FLOPs per caption of the text tower's forward + backward (torch.utils.flop_counter,
deterministic; math SDPA backend while counting) and the fastest of --repeats steps after a warm-up (the rows
alternate, so a burst of load from another process hits all alike; the load average is printed). Captions: the
generated benchmark's val captions (campe.text.diagnostics.fidelity_captions). The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench._timing import alternate, bench_args, clip_step, print_ratio_table  # noqa: E402
from campe.core.losses import CampeObjective  # noqa: E402
from campe.text.diagnostics import fidelity_captions  # noqa: E402
from campe.train.checkpoint import build_run_model  # noqa: E402
from campe.train.run_config import resolve_run_config  # noqa: E402

ROWS = (("mean_cached", "mean", "cached"), ("mean_online", "mean", "online"), ("mean_lora_online", "mean_lora",
                                                                                 "online"))


def make_row(method: str, tower: str, captions: list[str], images: torch.Tensor):
    """-> (step function, text batch, model) for one row."""
    cfg = resolve_run_config({"train": {"method": method, "cache_dir": ""}})
    model, _, encoder = build_run_model(cfg, tower)
    model.train()
    layout = encoder.layout(captions)
    text = {"layout": layout}
    if tower == "cached":
        text["hidden"] = encoder.frozen_hidden(layout).half()  # as the cache stores it
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return clip_step(model, CampeObjective(cfg.loss.kind), images, text, opt), text, model


def text_flops(model, text: dict) -> float:
    """FLOPs per caption of the text tower's forward + backward (a stand-in loss on the embeddings)."""
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.encode_text(text)["text"].sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / text["layout"].input_ids.shape[0]


def main() -> None:
    args = bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=3)
    warnings.simplefilter("ignore", UserWarning)
    torch.manual_seed(0)
    captions = fidelity_captions(args.batch)
    size = resolve_run_config({"train": {"method": "mean"}}).model.image_size
    images = torch.rand(args.batch, 3, size, size)
    steps, rows = {}, {}
    for name, method, tower in ROWS:
        step, text, model = make_row(method, tower, captions, images)
        steps[name] = step
        trainable_text = sum(p.numel() for p in model.text.parameters() if p.requires_grad)
        rows[name] = {"text_trainable_M": round(trainable_text / 1e6, 3),
                      "text_gflops_per_caption": round(text_flops(model, text) / 1e9, 3)}
    times = alternate(steps, args.repeats)  # one warm-up each, then the rows alternate
    for name in rows:
        rows[name]["ms_per_step"] = round(min(times[name]) * 1e3, 1)
    threads, load = torch.get_num_threads(), round(os.getloadavg()[0], 1)
    print_ratio_table(f"training step, default model (MiniLM-L6 text, {size}px images), batch {args.batch}, "
                      f"{threads} threads, load average {load:.1f}", rows,
                      [("text_trainable_M", "text trainable M", ".3f", False),
                       ("text_gflops_per_caption", "text GFLOP/caption", ".3f", True),
                       ("ms_per_step", "ms/step", ".1f", True)], "mean_cached",
                      {"bench": "lora_step", "batch": args.batch, "threads": threads, "load_average": load, **rows})

if __name__ == "__main__":
    main()
