"""What `text_encoder.apt_entry: input` costs: one text-tower training step, APT at the last layer vs at the input.

    .venv/bin/python bench/apt_entry.py                    # default encoder (MiniLM-L6, K=6 + negation), batch 64
    .venv/bin/python bench/apt_entry.py --batch 32 --repeats 3 --threads 1

Rows (the text tower only: the image tower, loss and optimiser are the same for every row):
  (a) first_trainable, cached: the default training path: cached frozen states -> inject -> query-only last layer
      -> heads (campe.text.cached_tower.CachedTextTower(online=False)); backward through the last layer.
  (b) first_trainable, online: the frozen layers run under no_grad each step, then as (a).
  (c) input, online: the APT replaces the input embedding; every layer runs forward with autograd and the backward
      goes through all of them to the APTs (not cacheable).
Per row: FLOPs per caption of forward + backward (torch.utils.flop_counter, deterministic; math SDPA backend while
counting) and the median wall time of --repeats steps on this machine (shared: the load average is printed).
Captions: the generated benchmark's val captions (campe.text.diagnostics.fidelity_captions). The last line is a
JSON object with the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench._timing import alternate, bench_args, print_ratio_table  # noqa: E402
from campe.text.cached_tower import CachedTextTower  # noqa: E402
from campe.text.diagnostics import fidelity_captions  # noqa: E402
from campe.text.multiprompt import MultiPromptConfig, build_text_encoder  # noqa: E402


def step(tower: CachedTextTower, batch: dict) -> None:
    """One forward + backward of the text tower (a stand-in loss on the embeddings)."""
    tower.zero_grad(set_to_none=True)
    out = tower(batch)
    (out["embedding"].sum() + out["neg_embedding"].sum()).backward()


def measure(tower: CachedTextTower, batch: dict, repeats: int) -> tuple[float, float]:
    """(FLOPs per caption, median seconds per step)."""
    n = batch["layout"].input_ids.shape[0]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        step(tower, batch)
    times = alternate({"step": lambda: step(tower, batch)}, repeats)["step"]  # after one warm-up
    return fc.get_total_flops() / n, statistics.median(times)


def main() -> None:
    args = bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=5)
    captions = fidelity_captions(args.batch)
    rows = {}
    for name, entry, online in (("first_trainable_cached", "first_trainable", False),
                                ("first_trainable_online", "first_trainable", True),
                                ("input_online", "input", True)):
        enc = build_text_encoder(MultiPromptConfig(negation=True, apt_entry=entry))
        tower = CachedTextTower(enc, online=online).train()
        layout = enc.layout(captions)
        batch = {"layout": layout}
        if not online:
            batch["hidden"] = enc.frozen_hidden(layout).half()  # as the cache stores it
        flops, secs = measure(tower, batch, args.repeats)
        rows[name] = {"gflops_per_caption": round(flops / 1e9, 3), "ms_per_step": round(secs * 1e3, 1)}
    print_ratio_table(f"text tower step, MiniLM-L6, K=6 + negation, batch {args.batch}, "
                      f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", rows,
                      [("gflops_per_caption", "GFLOP/caption", ".3f", True), ("ms_per_step", "ms/step", ".1f", True)],
                      "first_trainable_cached",
                      {"bench": "apt_entry", "batch": args.batch, "threads": torch.get_num_threads(), **rows})

if __name__ == "__main__":
    main()
