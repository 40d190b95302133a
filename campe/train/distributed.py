"""DDP set-up under torchrun (gloo on CPU, NCCL on GPU) and the per-rank RNG state that exact resume restores.

    from campe.train.distributed import init_distributed, rng_state, set_rng_state
    info = init_distributed("auto")        # DistInfo(rank, world_size, device, main, initialised_here)
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from campe.core.io import OutputInUse, output_lock
from campe.text.layout import PromptLayout


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, PromptLayout) or (hasattr(x, "to") and not isinstance(x, (str, bytes, nn.Module))):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], str):
        return type(x)(to_device(v, device) for v in x)
    return x


# ---------------------------------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) -> process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        return DistInfo(0, 1, 0, dev)
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, here)


def all_ranks_have(flag: bool, info: DistInfo) -> bool:
    """True when every rank has `flag` (ranks whose streams end at different lengths stop together)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


# ---------------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


@contextlib.contextmanager
def out_dir_lock(out_dir: str, info: DistInfo) -> Iterator[None]:
    """Rank 0 holds out_dir's lock (campe.core.io.output_lock) for the run (only rank 0 writes there); every rank learns
    whether it got it, so on a refusal all ranks stop at once and none waits in a collective."""
    with contextlib.ExitStack() as stack:
        error = None
        if info.main:
            try:
                stack.enter_context(output_lock(out_dir, "campe train"))
            except OutputInUse as e:
                error = str(e)
        if info.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            if info.main:
                raise OutputInUse(error)
            raise SystemExit(1)  # rank 0 reports it: one line, not one per rank
        yield
