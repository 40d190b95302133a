"""Loss terms of the prompt-learning methods; each returns a dict of named terms (the caller sums what it uses).

Shapes: logits (B, C); labels (B,); text features (B, C, D) or (C, D), L2-normalised.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def ce_term(logits: torch.Tensor, labels: torch.Tensor, name: str = "ce") -> dict[str, torch.Tensor]:
    return {name: F.cross_entropy(logits, labels)}


def text_l1_term(text: torch.Tensor, frozen: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """PromptSRC's text self-consistency: weight * mean |t - t0| (t (B, C, D) or (C, D); t0 (C, D))."""
    return {"sr_l1": weight * F.l1_loss(text, frozen.expand_as(text), reduction="mean")}


def logit_kl_term(logits: torch.Tensor, zs_logits: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """PromptSRC's logit consistency: weight * KL(softmax(zs) || softmax(logits)), summed, / numel."""
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1), reduction="sum",
                  log_target=True) / logits.numel()
    return {"sr_kl": weight * kl}


def key_pull_term(pull: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """L2P's pull constraint: -weight * (1/B) sum over layers and selected keys of cos(q, k). pull (B, layers)."""
    return {"key": -weight * pull.sum() / pull.shape[0]}
