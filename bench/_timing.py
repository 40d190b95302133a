"""The timing loop the step benches share (model_step, locked_step, apt_entry, lora_step).

    from bench._timing import alternate, bench_args, clip_step, print_rows, random_captions
    args = bench_args(ap, repeats=5)                            # --batch, --repeats, --threads (torch threads set)
    times = alternate({"a": step_a, "b": step_b}, repeats=5)    # {name: [seconds per call]}, after one warm-up
    t_a = min(times["a"])                                       # the fastest: least disturbed on a shared machine
    print_rows("campe model bench: ...", rows, headline)        # the table, then the headline as one JSON line
    print_ratio_table(title, {"a": {...}, "b": {...}}, [("ms_per_step", "ms/step", ".1f", True)], "a", headline)
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from campe.core.losses import total_loss

WORDS = "a red blue green small large circle square triangle on the near beside with two three striped".split()


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each call of each fn over `repeats` rounds; within a round the fns alternate, so a burst of load
    from another process hits all alike. warmup: one untimed call of each first."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def fastest(fn: Callable[[], object], repeats: int) -> float:
    """One warm-up, then the fastest of `repeats` calls (seconds)."""
    return min(alternate({"fn": fn}, repeats)["fn"])


def clip_step(model, objective, images: torch.Tensor, tokens, opt: torch.optim.Optimizer) -> Callable[[], None]:
    """One training step of a CLIP-style model: forward both towers, the objective, backward, `opt`, logit-scale
    clamp. images [B,3,H,W]; tokens: the text tower's tokenisation of B captions."""
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        total_loss(objective(model(images=images, text=tokens))).backward()
        opt.step()
        model.clamp_logit_scale_()
    return step


def random_captions(n: int, g: torch.Generator, words: int = 10) -> list[str]:
    """n synthetic captions of `words` words drawn from WORDS with generator g."""
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=g)) for _ in range(n)]


def bench_args(ap: argparse.ArgumentParser, repeats: int, batch: int = 64) -> argparse.Namespace:
    """Add --batch, --repeats, --threads to `ap`, parse, and set torch's threads (0: torch's default)."""
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def print_rows(title: str, rows: list[tuple[str, str, str]], headline: dict, time_width: int = 10) -> None:
    """The readable table (what, time, rate) under `title`, then `headline` as one JSON line."""
    w = max(len(r[0]) for r in rows)
    print(title)
    print(f"{'what':<{w}}  {'time':>{time_width}}  rate")
    for name, t, rate in rows:
        print(f"{name:<{w}}  {t:>{time_width}}  {rate}")
    print(json.dumps(headline))


def print_ratio_table(title: str, rows: dict[str, dict[str, float]], columns: list[tuple[str, str, str, bool]],
                      base: str, headline: dict | None) -> None:
    """The readable table of rows (name -> {key: value}) under `title`: a column per (key, header, format, ratio),
    followed, where ratio, by "x (a)" = value / rows[base][key]; then `headline` as one JSON line (None: none, for
    a table that another follows)."""
    w = max(3, *map(len, rows))
    widths = [max(len(header), 9) for _, header, _, _ in columns]
    print(title)
    print(f"{'row':<{w}}" + "".join(f" {header:>{cw}}" + (f" {'x (a)':>6}" if ratio else "")
                                    for (_, header, _, ratio), cw in zip(columns, widths)))
    for name, r in rows.items():
        print(f"{name:<{w}}" + "".join(f" {r[key]:>{cw}{fmt}}" + (f" {r[key] / rows[base][key]:>6.1f}" if ratio else "")
                                        for (key, _, fmt, ratio), cw in zip(columns, widths)))
    if headline is not None:
        print(json.dumps(headline))
