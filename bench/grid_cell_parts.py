"""The two parts of an ablation cell that repeat work across epochs and cells, each without and with its reuse:

    .venv/bin/python bench/grid_cell_parts.py               # default data and cache (after `make repro`), ~2 min
    .venv/bin/python bench/grid_cell_parts.py --captions 500 --threads 1

- text of an evaluation: the generated test captions through the default text encoder (multi_prompt_div_neg, K 6 +
  negation; the frozen layers run live, as evaluation does) -- the first time vs when the frozen states are in a
  campe.text.frozen_memo (what every later cell of that text layout gets in `campe ablate`);
- one epoch of training batches from the default cache (`train.cache_dir`): streamed from the tar + parquet shards
  (JPEG decode included) vs from memory (train.keep_in_memory, what every epoch after the first gets).
Both pairs give the same tensors (tests/test_frozen_memo.py, tests/test_cache.py); only time differs. The pairs
alternate over --repeats rounds, so a burst of load from another process hits both alike; times are the fastest
round. The last line is a JSON object with the headline figures.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._timing import alternate, bench_args, print_ratio_table  # noqa: E402
import yaml  # noqa: E402

from campe.data.evaldata import load_karpathy  # noqa: E402
from campe.text.cached_tower import CachedTextTower  # noqa: E402
from campe.text.frozen_memo import FrozenStateMemo, memoize_frozen_states  # noqa: E402
from campe.text.multiprompt import build_text_encoder  # noqa: E402
from campe.train.run_config import resolve_run_config  # noqa: E402
from campe.train.sources import CachedPairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--captions", type=int, default=0, help="test captions to embed (0: all)")
    args = bench_args(ap, repeats=2)
    with open(args.params) as f:
        params = yaml.safe_load(f)
    cfg = resolve_run_config({k: params.get(k) for k in ("text_encoder", "model", "loss", "train")})
    tp = cfg.train
    if not os.path.isdir(tp.cache_dir) or not os.path.exists(tp.val_set):
        raise SystemExit(f"{tp.cache_dir} or {tp.val_set} is missing: run `make repro` first (the default data and "
                         f"its text cache)")
    encoder = build_text_encoder(cfg.text_encoder, embed_dim=cfg.model.embed_dim)
    tower = CachedTextTower(encoder).eval()
    captions = load_karpathy(tp.val_set, split="test").captions
    captions = captions[:args.captions] if args.captions else captions

    def embed_texts() -> None:  # as campe.embed.Embedder.texts: batches of 256 captions
        for i in range(0, len(captions), 256):
            tower(captions[i:i + 256])

    memo = FrozenStateMemo(8 << 30)
    with torch.no_grad(), memoize_frozen_states(memo):
        embed_texts()  # fills the memo (the first cell of a layout)

    def text_live() -> None:
        with torch.no_grad():
            embed_texts()

    def text_memo() -> None:
        with torch.no_grad(), memoize_frozen_states(memo):
            embed_texts()

    streamed = CachedPairs(tp.shards_dir, tp.cache_dir, encoder)
    kept = CachedPairs(tp.shards_dir, tp.cache_dir, encoder, keep_in_memory=True)
    batches = sum(1 for _ in kept.epoch_batches(0, tp.batch_size, seed=0))  # the first epoch fills the memory

    def epoch(source: CachedPairs):
        return lambda: sum(1 for _ in source.epoch_batches(1, tp.batch_size, seed=0))

    times = alternate({"text_live": text_live, "text_memo": text_memo, "epoch_streamed": epoch(streamed),
                       "epoch_kept": epoch(kept)}, args.repeats, warmup=False)
    rows = {name: {"seconds": round(min(t), 2)} for name, t in times.items()}
    threads, load = torch.get_num_threads(), round(os.getloadavg()[0], 1)
    title = (f"ablation cell parts: {len(captions)} test captions through {cfg.train.method} (K {cfg.text_encoder.k}"
             f"{' + negation' if cfg.text_encoder.negation else ''}); one epoch = {batches} batches of "
             f"{tp.batch_size}; {threads} threads, load average {load:.1f}; x (a) = against the first row of its pair")
    table = {"text_live": rows["text_live"], "text_memo": rows["text_memo"]}
    print_ratio_table(title, table, [("seconds", "seconds", ".2f", True)], "text_live", None)
    print_ratio_table("", {"epoch_streamed": rows["epoch_streamed"], "epoch_kept": rows["epoch_kept"]},
                      [("seconds", "seconds", ".2f", True)], "epoch_streamed",
                      {"bench": "grid_cell_parts", "captions": len(captions), "batches": batches,
                       "threads": threads, "load_average": load, "memo_hits": memo.hits,
                       **{k: v["seconds"] for k, v in rows.items()}})


if __name__ == "__main__":
    main()
