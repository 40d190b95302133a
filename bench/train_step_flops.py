"""FLOPs of one training step per sample, with and without the text cache; cache size and cache throughput.

    .venv/bin/python bench/train_step_flops.py                      # default configs (~1-2 min on 2 CPU cores)
    .venv/bin/python bench/train_step_flops.py --batch 16 --captions 128 --threads 1

Rows (FLOPs per image-caption pair of one step: forward, softmax InfoNCE, backward; counted by
torch.utils.flop_counter.FlopCounterMode, so deterministic and not timed):
  (a) vanilla CLIP: campe.model.build_model("default"): the ViT image tower + a 4-layer, 256-wide causal text
      transformer trained from scratch (every parameter trained).
  (b) multi-prompt without cache: the same image tower + the default multi-prompt MiniLM-L6 encoder
      (MultiPromptConfig(): K=6, last layer trainable): all 6 LM layers run forward every step, backward goes
      through the last layer (the APT enters there).
  (c) multi-prompt from the cache with the query-only last layer (campe.text.cached_tower.CachedTextTower): inject, last layer
      (keys/values at every position; queries, attention and MLP at the K pooled positions), heads.
  (c') the same from the cache with the full last layer (what query-only saves).
The optimiser update (elementwise) is not counted, as in the paper's figures. Attention runs on the math SDPA
backend while counting: the fused CPU kernels are not in the counter's table and would count as 0.
Captions and images come from the embedded benchmark's generator (campe.data.synth).

Cache: the cache stage (stages/cache.py) on --captions generated captions in webdataset shards written here in the
download stage's layout; bytes per caption of the Parquet shards, write throughput (captions/s, the stage's own
figure), read throughput (open_training_data + collate_samples, JPEG decode included, one process; and the cache
shards alone). Times are wall clock on this machine (shared: see the load average printed).
The last line is a JSON object with the headline figures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CAMPE_NO_PROGRESS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from campe.text.cache_shards import read_cache_shard  # noqa: E402
from campe.text.cached_tower import CachedTextTower  # noqa: E402
from campe.train.data import collate_samples, open_training_data  # noqa: E402
from campe.core.losses import CampeObjective, total_loss  # noqa: E402
from campe.model import build_model  # noqa: E402
from campe.text.multiprompt import MultiPromptConfig, build_text_encoder  # noqa: E402
from campe.data.synth_scenes import make_captions, render_scene, sample_scene  # noqa: E402
from stages.cache import CacheParams, run_stage as cache_stage  # noqa: E402


def scenes(n: int, size: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """n (caption, jpeg bytes) pairs from the benchmark generator."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        caption = make_captions(scene, 1, rng)[0]["caption"]
        buf = io.BytesIO()
        render_scene(scene, size).convert("RGB").save(buf, format="JPEG", quality=95)
        out.append((caption, buf.getvalue()))
    return out


def write_shards(pairs: list[tuple[str, bytes]], root: Path, per_shard: int) -> None:
    """Webdataset shards in the download stage's layout: pass-00/NNNNN.tar (KEY.jpg/.txt/.json) + _stats.json."""
    d = root / "pass-00"
    d.mkdir(parents=True)
    for s in range(0, len(pairs), per_shard):
        chunk = pairs[s:s + per_shard]
        name = d / f"{s // per_shard:05d}"
        with tarfile.open(f"{name}.tar", "w") as tar:
            for i, (caption, jpg) in enumerate(chunk):
                key = f"{s + i:07d}"
                for ext, data in (("jpg", jpg), ("txt", caption.encode()),
                                  ("json", json.dumps({"uid": s + i, "key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (d / f"{name.name}_stats.json").write_text(json.dumps({"count": len(chunk), "successes": len(chunk)}))


def _count(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def step_flops(model, images, text, objective) -> tuple[int, dict[str, int]]:
    """FLOPs of forward + loss + backward; and each tower's forward + backward counted on its own (the counter's
    per-module split is unreliable in backward, where both towers' modules are active at once)."""
    def step():
        total_loss(objective(model(images=images, text=text))).backward()

    def tower(fn):
        def run():
            out = fn()
            out.backward(torch.ones_like(out))
        return run
    model.zero_grad(set_to_none=True)
    total = _count(step)
    parts = {"image": _count(tower(lambda: model.encode_image(images))),
             "text": _count(tower(lambda: model.encode_text(text)["text"]))}
    model.zero_grad(set_to_none=True)
    return total, parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="pairs per counted step")
    ap.add_argument("--captions", type=int, default=512, help="captions cached for the size/throughput rows")
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B = args.batch
    pairs = scenes(max(B, args.captions), 64)
    captions = [c for c, _ in pairs[:B]]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(j)).convert("RGB")).copy())
                          for _, j in pairs[:B]]).permute(0, 3, 1, 2).float() / 255
    objective = CampeObjective("softmax")

    # (a) vanilla CLIP
    vanilla, _ = build_model("default")
    fa, pa = step_flops(vanilla, images, vanilla.text.tokenize(captions), objective)
    # (b) multi-prompt, no cache
    cfg = MultiPromptConfig()
    encoder = build_text_encoder(cfg)
    mp, _ = build_model("default", text_tower=encoder)
    layout = encoder.layout(captions)
    fb, pb = step_flops(mp, images, layout, objective)
    # (c) from the cache, query-only; (c') full last layer
    with torch.no_grad():
        hidden = encoder.frozen_hidden(layout).half()  # as stored
    batch = {"hidden": hidden, "layout": layout}
    cached, _ = build_model("default", text_tower=CachedTextTower(encoder))
    fc_, pc = step_flops(cached, images, batch, objective)
    cached_full, _ = build_model("default", text_tower=CachedTextTower(encoder, query_only=False))
    fcf, pcf = step_flops(cached_full, images, batch, objective)

    tokens = float(layout.lengths.float().mean())
    g = lambda f: f / B / 1e9  # noqa: E731  GFLOPs per pair
    rows = [("(a) vanilla CLIP", fa, pa), ("(b) multi-prompt, no cache", fb, pb),
            ("(c) multi-prompt, cache + query-only last layer", fc_, pc),
            ("(c') multi-prompt, cache, full last layer", fcf, pcf)]
    print(f"FLOPs per image-caption pair, one training step (batch {B}; MiniLM-L6, K={cfg.k}, "
          f"trainable_layers={cfg.trainable_layers}, {tokens:.1f} tokens per packed sequence; vanilla text: "
          f"{int(vanilla.text.tokenize(captions)['attention_mask'].sum(1).float().mean())} tokens)")
    print(f"{'step':<50} {'GFLOPs':>8} {'image':>8} {'text':>8} {'/ (a)':>7}   (image, text: each tower's "
          f"forward + backward alone)")
    for name, f, p in rows:
        print(f"{name:<50} {g(f):8.4f} {g(p['image']):8.4f} {g(p['text']):8.4f} {f / fa:7.3f}")
    print(f"(b)/(c) = {fb / fc_:.2f}   (c')/(c) = {fcf / fc_:.2f}")

    # Cache size and throughput.
    with tempfile.TemporaryDirectory(prefix="campe-bench-cache-") as tmp:
        root = Path(tmp)
        write_shards(pairs[:args.captions], root / "shards", args.per_shard)
        p = CacheParams(shards_dir=str(root / "shards"), output_dir=str(root / "cache"), batch_size=64,
                        threads=args.threads or torch.get_num_threads())
        s = cache_stage(p, cfg, encoder=encoder)
        t = time.perf_counter()
        n = 0
        for path in sorted((root / "cache").glob("pass-*/*.parquet")):
            n += sum(1 for _ in read_cache_shard(path))
        shard_read = n / (time.perf_counter() - t)
        data = open_training_data(root / "shards", root / "cache", encoder)
        t = time.perf_counter()
        buf, n = [], 0
        for sample in data:
            buf.append(sample)
            if len(buf) == 64:
                n += len(collate_samples(buf)["keys"])
                buf = []
        read = n / (time.perf_counter() - t)
    print()
    print(f"{'cache (float16, ' + str(args.captions) + ' captions)':<50} {'value':>12}")
    print(f"{'bytes per caption (Parquet shard)':<50} {s['bytes_per_caption']:12.0f}")
    write_row = f"write: captions/s (cache stage, {s['device']}, {s['threads']} threads)"
    print(f"{write_row:<50} {s['captions_per_s']:12.1f}")
    print(f"{'read: cache rows/s (read_cache_shard)':<50} {shard_read:12.1f}")
    print(f"{'read: samples/s (open_training_data + collate)':<50} {read:12.1f}")
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(json.dumps({"cached_over_vanilla_flops": round(fc_ / fa, 4), "uncached_over_cached_flops": round(fb / fc_, 3),
                      "cache_bytes_per_caption": round(s["bytes_per_caption"], 1),
                      "gflops_per_pair": {"vanilla": round(g(fa), 4), "uncached": round(g(fb), 4),
                                          "cached_query_only": round(g(fc_), 4), "cached_full_last": round(g(fcf), 4)},
                      "cache_write_captions_per_s": s["captions_per_s"], "cache_read_samples_per_s": round(read, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
