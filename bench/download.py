"""Benchmark the download stage on the embedded default set: images/s through img2dataset.

    python bench/download.py                 # default sizes from params.yaml
    python bench/download.py --http          # also over a loopback HTTP server

Generates the default benchmark into a temp folder, then runs `stages.download.run_stage` with params.yaml's `download`
section (same processes/threads/shard size as `dvc repro`). Reports the end-to-end rate (including img2dataset's
~9 s of process start-up) and the rate inside img2dataset's shards (from its own _stats.json). Last line: JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from campe.core.config import load_params  # noqa: E402
from campe.data.synth import SynthParams, generate  # noqa: E402
from stages.download import DownloadParams, run_stage as download_stage  # noqa: E402


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request would bury the table
        pass


def shard_rate(out: Path) -> float:
    """Images/s inside img2dataset: successes over the span from the first shard's start to the last's end."""
    stats = [json.loads(p.read_text()) for p in out.glob("pass-*/*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return sum(s["count"] for s in stats) / span


def run_once(p: DownloadParams, label: str) -> dict:
    t0 = time.perf_counter()
    stats = download_stage(p)
    wall = time.perf_counter() - t0
    return {"source": label, "samples": stats["samples"], "success_rate": stats["success_rate"],
            "wall_s": round(wall, 2), "images_per_s": round(stats["samples"] / wall, 1),
            "in_shards_images_per_s": round(shard_rate(Path(p.output_dir)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--http", action="store_true", help="also download over a loopback HTTP server")
    args = ap.parse_args()
    gen = load_params(args.params, "generate", SynthParams)
    dl = load_params(args.params, "download", DownloadParams)
    rows = []
    with tempfile.TemporaryDirectory(prefix="campe-bench-") as tmp:
        tmp = Path(tmp)
        generate(gen, tmp / "gen")
        p = dataclasses.replace(dl, url_list=str(tmp / "gen/urls/train.parquet"), output_dir=str(tmp / "file"),
                                stats_file=str(tmp / "file_stats.json"))
        rows.append(run_once(p, "file://"))
        if args.http:
            import pandas as pd

            handler = functools.partial(QuietHandler, directory=str(tmp / "gen"))
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            base = f"http://127.0.0.1:{server.server_address[1]}/images/"
            df = pd.read_parquet(p.url_list)
            df["url"] = base + df["url"].str.rsplit("/", n=1).str[1]
            df.to_parquet(tmp / "http.parquet")
            rows.append(run_once(dataclasses.replace(p, url_list=str(tmp / "http.parquet"),
                                                     output_dir=str(tmp / "http"),
                                                     stats_file=str(tmp / "http_stats.json")), "http://127.0.0.1"))
            server.shutdown()
    print(f"\ndownload benchmark: {rows[0]['samples']} images of {gen.image_size}px, "
          f"processes={dl.processes_count} threads={dl.thread_count} shard={dl.number_sample_per_shard}, "
          f"{os.cpu_count()} cores")
    cols = ["source", "samples", "success_rate", "wall_s", "images_per_s", "in_shards_images_per_s"]
    print("  ".join(f"{c:>22}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>22}" for c in cols))
    print(json.dumps({"images_per_s": rows[0]["images_per_s"],
                      "in_shards_images_per_s": rows[0]["in_shards_images_per_s"],
                      "success_rate": rows[0]["success_rate"]}))


if __name__ == "__main__":
    main()
