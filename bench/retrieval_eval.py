"""Benchmark retrieval_metrics on given embeddings: time and peak extra memory for N images x 5N captions.

    python bench/retrieval_eval.py                          # N = 1000, 5000, 25000; D = 384; 2 threads
    python bench/retrieval_eval.py --sizes 1000,5000        # skip the slow 25k x 125k case
    python bench/retrieval_eval.py --threads 2 --dim 512

Embeddings are random unit vectors (D = 384 by default, the size of a MiniLM text tower), each image with 5
captions. That is the hardest case for the t2i fast path (positives sit in the bulk of the score distribution, so
near-ties are most frequent); the table reports how many captions needed the exact second pass.

Each size runs in a fresh subprocess, so one size's peak cannot hide the next. Memory = peak RSS during the call
minus RSS just before it (getrusage ru_maxrss, which the kernel tracks exactly). The embeddings are generated chunk
by chunk into preallocated tensors and a small warm-up call loads MKL/OpenMP first, so the process's earlier peak
sits just above the pre-call RSS; if the call never exceeds that earlier peak the value is only an upper bound and
is marked '<='. tracemalloc cannot see torch's allocations, and torch keeps no CPU allocator statistics; RSS also
counts MKL's own buffers, which is what matters for "fits in memory". The goal (issue 6): 5k x 25k in <= 3 s and
<= 1 GB extra. `mm_s` is one chunked matmul pass over the same scores alone: the floor for any exact method.
Last line: JSON with s_<size>, peak_mb_<size> (MiB) for the sizes that ran.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(n: int, caps: int, dim: int, threads: int, chunk: int | None, seed: int) -> dict:
    import torch

    from campe.core.retrieval import _AUTO_CHUNK_ELEMS, retrieval_metrics, retrieval_ranks

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    m = n * caps

    def unit_rows(rows: int) -> torch.Tensor:
        out = torch.empty(rows, dim)
        for a in range(0, rows, 8192):  # in place, chunk by chunk: no big temporaries before the measurement
            b = min(rows, a + 8192)
            out[a:b] = torch.nn.functional.normalize(torch.randn(b - a, dim, generator=g), dim=1)
        return out

    img, txt = unit_rows(n), unit_rows(m)
    t2i = torch.arange(n).repeat_interleave(caps)
    retrieval_metrics(img[:200], txt[: 200 * caps], t2i[: 200 * caps], chunk=chunk)  # warm-up: MKL/OpenMP pools

    rss0, peak0 = rss_mib(), maxrss_mib()
    t0 = time.perf_counter()
    metrics = retrieval_metrics(img, txt, t2i, chunk=chunk)
    seconds = time.perf_counter() - t0
    peak1 = maxrss_mib()
    exact = peak1 > peak0
    extra = (peak1 if exact else peak0) - rss0

    stats: dict = {}
    retrieval_ranks(img, txt, t2i, chunk=chunk, stats=stats)  # same run again, for the fast-path coverage
    rows = chunk or max(1, _AUTO_CHUNK_ELEMS // m)
    buf = torch.empty(min(rows, n), m)
    t0 = time.perf_counter()
    for a in range(0, n, rows):
        torch.mm(img[a:a + rows], txt.T, out=buf[: min(rows, n - a)])
    mm_s = time.perf_counter() - t0
    return {"n": n, "m": m, "s": seconds, "peak_mb": extra, "peak_exact": exact, "mm_s": mm_s,
            "chunk_rows": min(rows, n), "t2i_recomputed": stats["t2i_recomputed"], "t2i_R@1": metrics["t2i_R@1"],
            "i2t_mean_rank": metrics["i2t_mean_rank"], "base_rss_mb": rss0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,5000,25000", help="comma-separated numbers of images N")
    ap.add_argument("--captions", type=int, default=5, help="captions per image (M = captions * N)")
    ap.add_argument("--dim", type=int, default=384, help="embedding dim D")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--chunk", type=int, default=None, help="image rows per chunk (default: auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per size before it is reported as skipped")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        print(json.dumps(child(args.child, args.captions, args.dim, args.threads, args.chunk, args.seed)))
        return 0

    results = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        cmd = [sys.executable, __file__, "--child", str(n), "--captions", str(args.captions), "--dim", str(args.dim),
               "--threads", str(args.threads), "--seed", str(args.seed)]
        if args.chunk:
            cmd += ["--chunk", str(args.chunk)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"N={n}: did not finish within {args.timeout} s, skipped", file=sys.stderr)
            results.append({"n": n, "m": n * args.captions, "skipped": f"timeout {args.timeout}s"})
            continue
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            results.append({"n": n, "m": n * args.captions, "skipped": f"exit {p.returncode}"})
            continue
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))

    print(f"retrieval_metrics, D={args.dim}, {args.captions} captions/image, {args.threads} threads, "
          f"random unit embeddings, both directions + ranks")
    head = f"{'images':>7} {'captions':>9} {'chunk':>6} {'time s':>8} {'mm-only s':>9} {'peak extra MiB':>15} " \
           f"{'t2i recomputed':>15}"
    print(head)
    print("-" * len(head))
    summary: dict = {"dim": args.dim, "threads": args.threads}
    for r in results:
        if "skipped" in r:
            print(f"{r['n']:>7} {r['m']:>9}  skipped ({r['skipped']})")
            continue
        peak = ("" if r["peak_exact"] else "<=") + f"{r['peak_mb']:.0f}"
        print(f"{r['n']:>7} {r['m']:>9} {r['chunk_rows']:>6} {r['s']:>8.2f} {r['mm_s']:>9.2f} {peak:>15} "
              f"{r['t2i_recomputed']:>8} ({100 * r['t2i_recomputed'] / r['m']:.1f}%)")
        tag = f"{r['n'] // 1000}k" if r["n"] % 1000 == 0 else str(r["n"])
        summary[f"s_{tag}"] = round(r["s"], 3)
        summary[f"peak_mb_{tag}"] = round(r["peak_mb"], 1)
    if "s_5k" in summary:
        ok = summary["s_5k"] <= 3 and summary["peak_mb_5k"] <= 1024
        print(f"goal 5k x 25k in <= 3 s and <= 1 GB extra: {'met' if ok else 'NOT met'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
