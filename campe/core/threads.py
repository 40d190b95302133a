"""torch's intra-op thread count for one piece of work, restored afterwards.

Stages run in-process from `campe ablate` and the Prefect flows, so a stage that set the count and left it would
change every later stage of that process (a grid started with OMP_NUM_THREADS=1 ran its cells on all cores after
the first cell's cache stage)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with `n` torch threads (0 = leave the count as it is); the previous count is restored on exit,
    also on an exception. Yields the count in effect."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
