"""The optimizer of a training run: AdamW with weight decay on matrices only, linear warm-up then cosine decay.
The APT vectors get lr x train.apt_lr_mult (their own group when it is not 1): Adam moves every coordinate by about
the lr per step whatever its scale, so at the one lr APTs of norm ~13 move by well under 1 % of it.

    from campe.train.optim import make_optimizer, lr_factor
    optimizer = make_optimizer(model, cfg.train)     # only the parameters that require grad
    scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_lr_ratio))
"""
from __future__ import annotations

import math

import torch
from torch import nn

from campe.train.run_config import TrainParams


NO_DECAY_NAMES = ("positional_embedding", "pos_embed", "temporal_pos", "probe", "apt")


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Trainable parameter names -> (decayed, not decayed). No decay on gains and biases (ndim < 2 or named
    *bias), embeddings (nn.Embedding, positional tables, the pooling probe, APT vectors) and the logit scale/bias."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (p.ndim < 2 or id(p) in embeddings or leaf in NO_DECAY_NAMES or leaf.endswith("bias")
                or leaf.startswith("logit_")):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    apt = [n for n in no_decay if n.rsplit(".", 1)[-1] == "apt"] if tp.apt_lr_mult != 1.0 else []
    groups = [{"params": [params[n] for n in decay], "weight_decay": tp.weight_decay},
              {"params": [params[n] for n in no_decay if n not in apt], "weight_decay": 0.0},
              {"params": [params[n] for n in apt], "weight_decay": 0.0, "lr": tp.lr * tp.apt_lr_mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tp.lr, betas=(tp.beta1, tp.beta2), eps=tp.eps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warm-up, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
