"""Prompt pools (L2P-style keys and values), the query projection and top-N retrieval.

    q = QueryProjection(d_v, d_k)(centres, counts)            # (B, K, d_v), (B, K) -> (B, d_k), L2-normalised
    pool = PromptPool(size=M, tokens=T, width=d_t, key_dim=d_k)
    r = pool.retrieve(q, top_n=2, mode="hard")               # r.prompt (B, N*T, d_t), r.index (B, N), r.pull (B,)

Hard: the selected entries' values concatenated in ascending index order, so two images that picked the same set
share the same composition (and, in the trainer, one text pass). Soft: the softmax over the top-N similarities
(temperature tau_r) weighs the entries' values into T tokens, so the CE gradient reaches the keys too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class QueryProjection(nn.Module):
    """Cluster centres of one layer -> a query: aggregate (size-weighted or plain mean), linear, LayerNorm, L2."""

    def __init__(self, vision_width: int, key_dim: int, aggregate: str = "weighted_mean"):
        super().__init__()
        if aggregate not in ("weighted_mean", "mean"):
            raise ValueError(f"unknown aggregate {aggregate!r} (weighted_mean or mean)")
        self.aggregate = aggregate
        self.proj = nn.Linear(vision_width, key_dim)
        self.norm = nn.LayerNorm(key_dim)

    def forward(self, centres: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """centres (B, K, d_v), counts (B, K) -> (B, d_k)."""
        if self.aggregate == "weighted_mean":
            w = counts / counts.sum(-1, keepdim=True).clamp_min(1e-6)
            agg = (w[..., None] * centres).sum(1)
        else:
            agg = centres.mean(1)
        return nn.functional.normalize(self.norm(self.proj(agg)), dim=-1)


@dataclass
class Retrieved:
    prompt: torch.Tensor  # (B, n, d_t)
    index: torch.Tensor  # (B, N) selected entries, ascending
    sim: torch.Tensor  # (B, M) cosine of the query with every key
    pull: torch.Tensor  # (B,) sum over the selected keys of cos(q, k)


class PromptPool(nn.Module):
    """M entries: a key (d_k) and a value of T tokens (T, d_t). Keys uniform in [-1, 1] (L2P), values N(0, 0.02)
    (CoOp's context init)."""

    def __init__(self, size: int, tokens: int, width: int, key_dim: int):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(size, key_dim).uniform_(-1, 1))
        self.values = nn.Parameter(torch.randn(size, tokens, width) * 0.02)

    def retrieve(self, q: torch.Tensor, top_n: int, mode: str = "hard", temperature: float = 0.1) -> Retrieved:
        """q (B, d_k) normalised -> the composed prompt of the top-N entries by cosine."""
        M, T, d = self.values.shape
        if not 1 <= top_n <= M:
            raise ValueError(f"top_n {top_n} outside 1..{M} (the pool size)")
        sim = q @ nn.functional.normalize(self.keys, dim=-1).T  # (B, M)
        top = sim.topk(top_n, dim=-1)
        index, order = top.indices.sort(dim=-1)
        top_sim = top.values.gather(1, order)
        if mode == "hard":
            prompt = self.values[index].reshape(q.shape[0], top_n * T, d)
        elif mode == "soft":
            w = torch.softmax(top_sim / temperature, dim=-1)  # (B, N)
            prompt = (w[..., None, None] * self.values[index]).sum(1)  # (B, T, d)
        else:
            raise ValueError(f"unknown retrieval mode {mode!r} (hard or soft)")
        return Retrieved(prompt, index, sim, top_sim.sum(-1))
