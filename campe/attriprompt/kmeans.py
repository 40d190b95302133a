"""Batched k-means of each image's patch tokens: deterministic (farthest-point initialisation), no gradient.

    centres, counts, assign = kmeans(tokens, k=4, iters=5)   # tokens (B, N, d) -> (B, k, d), (B, k), (B, N)
"""
from __future__ import annotations

import torch


@torch.no_grad()
def farthest_point_init(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (B, N, d) -> k starting centres (B, k, d): the token farthest from the mean, then repeatedly the token
    farthest from the centres so far (ties: the lowest index). No randomness, so no seed to carry."""
    B, N, _ = x.shape
    if k > N:
        raise ValueError(f"k-means with {k} clusters over {N} tokens")
    rows = torch.arange(B, device=x.device)
    first = ((x - x.mean(1, keepdim=True)) ** 2).sum(-1).argmax(1)  # (B,)
    idx = [first]
    dist = ((x - x[rows, first][:, None]) ** 2).sum(-1)  # (B, N): squared distance to the nearest chosen centre
    for _ in range(1, k):
        nxt = dist.argmax(1)
        idx.append(nxt)
        dist = torch.minimum(dist, ((x - x[rows, nxt][:, None]) ** 2).sum(-1))
    return x[rows[:, None], torch.stack(idx, 1)]


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's iterations per image. x (B, N, d) -> centres (B, k, d), counts (B, k) (tokens per cluster, float),
    assign (B, N). An emptied cluster keeps its previous centre."""
    x = x.detach().float()
    centres = farthest_point_init(x, k)
    for _ in range(max(iters, 1)):
        assign = torch.cdist(x, centres).argmin(-1)  # (B, N)
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # (B, N, k)
        counts = onehot.sum(1)  # (B, k)
        sums = onehot.transpose(1, 2) @ x  # (B, k, d)
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    assign = torch.cdist(x, centres).argmin(-1)
    counts = torch.nn.functional.one_hot(assign, k).to(x.dtype).sum(1)
    return centres, counts, assign
