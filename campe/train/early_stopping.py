"""Early stopping on the validation loss: one rule for every method, and the val loss it reads.

    from campe.train.early_stopping import EarlyStopping, ValPairs
    rule = EarlyStopping(patience=3)
    for loss in val_losses:            # one per evaluation (train.val_every steps, or once per epoch)
        rule.update(loss)
        if rule.stop: break            # `patience` evaluations in a row without a new best
    rule.best, rule.best_eval          # the best loss and the evaluation (1-based) that reached it

    val = ValPairs.from_karpathy("data/generated/dataset_karpathy.json", image_size=64)  # split "val", caption 1
    loss = val.loss(model, text_input, objective, batch_size=64)   # mean total loss over fixed full batches

The rule: after each evaluation, the loss improves when it is below the best so far by more than `min_delta`;
training stops once `patience` evaluations in a row have not improved (or at the max epochs). The training loop
keeps the weights of the best evaluation and saves those as the final model; the evaluation reached, the epoch of
the best one and whether the rule stopped the run go into metrics.json and the ablation table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


class EarlyStopping:
    """Stop once the val loss has not improved (by more than min_delta) for `patience` evaluations in a row."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_eval, self.evals, self.bad = math.inf, 0, 0, 0
        self.history: list[float] = []

    def update(self, loss: float) -> bool:
        """Record one evaluation's loss; True when it is a new best."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"val loss is {loss} at evaluation {self.evals + 1}")
        self.evals += 1
        self.history.append(loss)
        if loss < self.best - self.min_delta:
            self.best, self.best_eval, self.bad = loss, self.evals, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_eval": self.best_eval, "evals": self.evals, "bad": self.bad,
                "history": list(self.history)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best, self.best_eval, self.evals, self.bad = d["best"], d["best_eval"], d["evals"], d["bad"]
        self.history = list(d["history"])


@dataclass
class ValPairs:
    """The val split's (image, first caption) pairs, decoded once: images uint8 [N,3,S,S], N captions."""
    images: torch.Tensor
    captions: list[str]

    @classmethod
    def from_karpathy(cls, path: str | Path, image_size: int, split: str = "val") -> ValPairs:
        from campe.data.evaldata import load_karpathy
        from campe.data.imageprep import decode_image
        ds = load_karpathy(path, split=split, max_captions=1)
        if not ds.image_paths:
            raise ValueError(f"{path}: no images in split '{split}'; early stopping (train.patience > 0) needs a "
                             f"val split (campe generate makes one: generate.val_images)")
        first = {}
        for j, i in enumerate(ds.txt_to_img):
            first.setdefault(i, j)
        images = torch.stack([decode_image(p, image_size) for p in ds.image_paths])  # as evaluation loads them
        return cls(images, [ds.captions[first[i]] for i in range(len(ds.image_paths))])

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, text_input: Callable[[list[str]], Any], objective: Callable,
             batch_size: int, device: torch.device | str = "cpu") -> float:
        """Mean total loss over the fixed full batches of min(batch_size, N) pairs, in eval mode (the mode is
        restored)."""
        from campe.core.losses import total_loss
        from campe.train.distributed import to_device
        was = model.training
        model.eval()
        b = min(batch_size, len(self.captions))
        losses = []
        try:
            for i in range(0, len(self.captions) - b + 1, b):
                text = to_device(text_input(self.captions[i:i + b]), device)
                out = model(images=self.images[i:i + b].to(device), text=text)
                losses.append(float(total_loss(objective(out))))
        finally:
            model.train(was)
        return sum(losses) / len(losses)
