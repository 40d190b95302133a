"""CAMPE objective: contrastive (softmax InfoNCE or SigLIP sigmoid), prompt diversity, negation-aware; multi-rank.

    from campe.core.losses import CampeObjective, total_loss
    objective = CampeObjective(kind="softmax", lambda_div=0.1, lambda_neg=0.1, rank=rank, world_size=world_size)
    terms = objective(model(images=images, text=batch))   # model: campe.model.CLIPModel (or DDP around it)
    loss = total_loss(terms)                               # sum of the "*_loss" entries
    loss.backward()
    log({k: float(v) for k, v in terms.items()})

Convention (open_clip style): every loss returns a dict. Entries whose name ends in "_loss" are loss terms, already
multiplied by their weight, and the loop sums exactly those (`total_loss`); there is no "total_loss" entry, so a
sum over "*_loss" never counts anything twice. Every other entry is a detached scalar for logging
(`logit_scale`, `temperature`, `positive_cosine`, ...). A term whose weight is 0 is not computed and not present.

Terms (img_i, txt_j L2-normalised, s = exp(logit_scale), b = logit_bias, z_ij = s * <img_i, txt_j>):
  contrastive_loss  softmax: (CE_i(z_i., i) + CE_j(z_.j, j)) / 2, mean over rows (CLIP).
                    sigmoid: -(1/B) sum_ij log sigmoid(y_ij (z_ij + b)), y_ij = +1 if i == j else -1 (SigLIP).
  diversity_loss    lambda_div * mean over captions of the mean over the K(K-1)/2 prompt pairs of
                    relu(cos(seg_k, seg_l) - margin); margin=None uses the raw cosine (can go negative).
                    div_space "heads" (the paper's form): seg_k = prompt k's head output, each in its own head's
                    coordinates (near 0 at init whatever the prompts, so it hardly acts on them); "pooled": seg_k =
                    prompt k's pooled LM state before the heads, one space shared by all prompts.
  negation_loss     lambda_neg * the negation-aware term, see `negation_loss`.

Negation-aware, as implemented. For each caption the negated prompts ("the [APT-k] of the image does NOT mean:")
give one text embedding neg_i. The paper uses the negated prompts as extra contrastive signal: an embedding that
states what the image does *not* mean must score below the caption's own embedding for that image. We make neg_i a
hard negative for image i by appending it as an extra column to image i's image->text row:
    softmax: -log( e^{z_ii} / (sum_j e^{z_ij} + e^{s <img_i, neg_i>}) ), mean over images;
             all_images=True appends all negated embeddings as columns for every image:
             -log( e^{z_ii} / (sum_j e^{z_ij} + sum_j e^{s <img_i, neg_j>}) ).
    sigmoid: the negated pairs are extra negative pairs of the SigLIP sum (the usual pairs are already in the
             contrastive term): -(1/B) sum_i log sigmoid(-(s <img_i, neg_i> + b)) (all_images: sum over all i, j).
Only the image->text direction gets the extra column: a negated embedding is not a query for retrieval.

Distributed (gather-with-grad, open_clip's idea): each rank computes the loss of its own rows against the features
of all ranks (its rows are the positives: labels rank*B + arange(B)). `gather_features(..., with_grad=True)` uses
torch.distributed.nn.functional.all_gather, whose backward sums every rank's gradient into the local slice; with
DDP's gradient averaging the parameter gradients then equal one process on the concatenated batch, and the mean
of the ranks' losses equals its loss. Every rank must pass the same batch size (drop_last=True).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

KINDS = ("softmax", "sigmoid")
DIV_SPACES = ("heads", "pooled")  # where the diversity loss compares the prompts (see the module docstring)


@dataclass
class LossConfig:
    """The objective's params.yaml section."""
    kind: str = "softmax"  # softmax (InfoNCE) | sigmoid (SigLIP); must match the model's `contrastive`
    lambda_div: float = 0.0  # weight of the prompt diversity loss (needs a multi-prompt text tower)
    div_margin: float | None = 0.0  # relu(cos - margin); null: raw mean cosine
    lambda_neg: float = 0.0  # weight of the negation-aware loss (needs the negated prompts)
    neg_all_images: bool = False  # negated embeddings are negatives for every image, not only their own
    gather_with_grad: bool = True  # exact full-batch gradients across ranks (see campe/core/losses.py)
    div_space: str = "heads"  # heads (per-prompt head outputs) | pooled (the pooled LM states before the heads)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind '{self.kind}' is not one of: {', '.join(KINDS)}")
        if self.lambda_div < 0 or self.lambda_neg < 0:
            raise ValueError(f"lambda_div and lambda_neg must be >= 0, got {self.lambda_div}, {self.lambda_neg}")
        if self.div_margin is not None and not -1.0 <= self.div_margin < 1.0:
            raise ValueError(f"div_margin must be in [-1, 1) (a cosine) or null, got {self.div_margin}")
        if self.div_space not in DIV_SPACES:
            raise ValueError(f"div_space '{self.div_space}' is not one of: {', '.join(DIV_SPACES)}")


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the "*_loss" entries of a loss dict (the weighted terms)."""
    losses = [v for k, v in terms.items() if k.endswith("_loss")]
    if not losses:
        raise ValueError(f"no '*_loss' entries in {sorted(terms)}")
    return sum(losses[1:], losses[0])


# ---------------------------------------------------------------------------------------------------- distributed

def gather_features(x: torch.Tensor, rank: int = 0, world_size: int = 1, with_grad: bool = True) -> torch.Tensor:
    """Local [B,...] -> all ranks' rows [world_size*B,...] in rank order (rank r's rows at r*B:(r+1)*B).

    with_grad=True: autograd-aware all_gather; its backward sums the gradients that every rank's loss sends to
    this rank's rows, so the result is the exact full-batch gradient. with_grad=False (open_clip's cheaper
    default): other ranks' rows are constants and the local tensor is put back in, so gradients reach the local
    rows only through this rank's own loss (an approximation when each rank computes a local loss).
    """
    if world_size == 1:
        return x
    if with_grad:
        import torch.distributed.nn.functional as dist_fn
        return torch.cat(dist_fn.all_gather(x), 0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts, 0)


def _check_equal_rows(n: int, world_size: int, device: torch.device) -> None:
    # Labels are rank*B + arange(B): every rank must hold the same B (a ragged last batch would mislabel silently).
    if world_size == 1:
        return
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"batch sizes differ across ranks ({[int(s) for s in sizes]}): use drop_last=True")


def _labels(n: int, rank: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) + rank * n


# ---------------------------------------------------------------------------------------------------- contrastive

class ClipLoss(nn.Module):
    """Softmax InfoNCE in both directions (CLIP) with the model's learnable temperature.

    forward(image_features [B,D], text_features [B,D], logit_scale (scalar, already exp'd)) -> {"contrastive_loss"}.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        all_img = gather_features(image_features, self.rank, self.world_size, self.gather_with_grad)
        all_txt = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
        logits_per_image = logit_scale * image_features @ all_txt.T  # [B, N]
        logits_per_text = logit_scale * text_features @ all_img.T  # [B, N]
        labels = _labels(image_features.shape[0], self.rank, image_features.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive_loss": loss}


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP, open_clip's formulation) with learnable temperature and bias.

    forward(image_features [B,D], text_features [B,D], logit_scale, logit_bias) -> {"contrastive_loss"}: this
    rank's images against all ranks' texts, summed over pairs and divided by the local batch size.
    (open_clip passes text blocks around a ring instead of gathering; the sum is the same.)
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> dict[str, torch.Tensor]:
        B = image_features.shape[0]
        all_txt = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
        logits = logit_scale * image_features @ all_txt.T + logit_bias  # [B, N]
        signs = -torch.ones_like(logits)
        signs[torch.arange(B, device=logits.device), _labels(B, self.rank, logits.device)] = 1.0
        return {"contrastive_loss": -F.logsigmoid(signs * logits).sum() / B}


# ---------------------------------------------------------------------------------------------------- auxiliary

def pairwise_cosines(segments: torch.Tensor) -> torch.Tensor:
    """[B,K,d] -> cosines of the K(K-1)/2 distinct prompt pairs of each caption [B, K(K-1)/2]."""
    s = F.normalize(segments, dim=-1)
    cos = s @ s.transpose(1, 2)  # [B,K,K]
    i, j = torch.triu_indices(s.shape[1], s.shape[1], offset=1, device=s.device)
    return cos[:, i, j]


def diversity_loss(segments: torch.Tensor, margin: float | None = 0.0) -> torch.Tensor:
    """Mean over captions of the mean pairwise cosine between the K normalised prompt embeddings [B,K,d].

    margin (float): each pair contributes relu(cos - margin), so pairs already below the margin are left alone
    (margin 0: penalise positive similarity only; orthogonal prompts -> 0, identical -> 1 - margin).
    margin None: the raw cosine (pushes pairs towards anti-correlation too). K=1 gives 0 (no pairs).
    """
    if segments.ndim != 3:
        raise ValueError(f"segments must be [B,K,d], got {list(segments.shape)}")
    if segments.shape[1] < 2:
        return segments.sum() * 0.0  # keeps the graph (and DDP) happy
    pair = pairwise_cosines(segments)
    return (pair if margin is None else F.relu(pair - margin)).mean()


def negation_loss(image_features: torch.Tensor, text_features: torch.Tensor, negated: torch.Tensor,
                  logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, all_images: bool = False,
                  rank: int = 0, world_size: int = 1, gather_with_grad: bool = True) -> torch.Tensor:
    """Negated-prompt embeddings as hard negatives (formulation in the module docstring).

    image_features, text_features, negated: [B,D] L2-normalised (row i of each belongs to caption/image i).
    logit_bias None: softmax form (extra column(s) in the image->text cross-entropy, mean over images).
    logit_bias given: sigmoid form (extra negative pairs, summed, divided by B).
    """
    B = image_features.shape[0]
    all_neg = gather_features(negated, rank, world_size, gather_with_grad) if all_images else None
    if logit_bias is not None:
        if all_images:
            z = logit_scale * image_features @ all_neg.T + logit_bias  # [B, N]
        else:
            z = logit_scale * (image_features * negated).sum(-1) + logit_bias  # [B]
        return -F.logsigmoid(-z).sum() / B
    all_txt = gather_features(text_features, rank, world_size, gather_with_grad)
    logits = logit_scale * image_features @ all_txt.T  # [B, N]
    if all_images:
        extra = logit_scale * image_features @ all_neg.T  # [B, N]
    else:
        extra = logit_scale * (image_features * negated).sum(-1, keepdim=True)  # [B, 1]
    return F.cross_entropy(torch.cat([logits, extra], 1), _labels(B, rank, logits.device))


# ---------------------------------------------------------------------------------------------------- objective

class CampeObjective(nn.Module):
    """Contrastive + lambda_div * diversity + lambda_neg * negation-aware, as a dict of named terms.

    forward(out) with `out` = CLIPModel.forward's dict: "image_features" [B,D], "text_features" [B,D],
    "logit_scale" (exp'd), "logit_bias" (sigmoid), "segments" [B,K,D/K] (lambda_div > 0; "pooled_hidden" [B,K,H]
    with div_space pooled), "negated" [B,D] (lambda_neg > 0). Returns {"contrastive_loss", "diversity_loss"?, "negation_loss"?} (weighted) plus detached
    logs: logit_scale, temperature (= 1/logit_scale), logit_bias, positive_cosine (mean <img_i, txt_i>),
    negative_cosine (mean <img_i, txt_j>, j != i, local batch), prompt_cosine (mean pairwise cosine between prompts
    in div_space, unclipped), negated_cosine (mean <img_i, neg_i>), diversity_unweighted, negation_unweighted.
    """

    def __init__(self, kind: str = "softmax", lambda_div: float = 0.0, lambda_neg: float = 0.0,
                 div_margin: float | None = 0.0, neg_all_images: bool = False, rank: int = 0, world_size: int = 1,
                 gather_with_grad: bool = True, div_space: str = "heads"):
        super().__init__()
        LossConfig(kind=kind, lambda_div=lambda_div, div_margin=div_margin, lambda_neg=lambda_neg,
                   neg_all_images=neg_all_images, gather_with_grad=gather_with_grad, div_space=div_space).validate()
        self.div_space = div_space
        self.kind, self.lambda_div, self.lambda_neg = kind, float(lambda_div), float(lambda_neg)
        self.div_margin, self.neg_all_images = div_margin, neg_all_images
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad
        loss_cls = ClipLoss if kind == "softmax" else SigLipLoss
        self.contrastive = loss_cls(rank, world_size, gather_with_grad)

    @classmethod
    def from_config(cls, cfg: LossConfig, rank: int = 0, world_size: int = 1) -> CampeObjective:
        return cls(cfg.kind, cfg.lambda_div, cfg.lambda_neg, cfg.div_margin, cfg.neg_all_images, rank, world_size,
                   cfg.gather_with_grad, cfg.div_space)

    def _get(self, out: dict, key: str, why: str) -> torch.Tensor:
        v = out.get(key)
        if v is None:
            raise ValueError(f"the model output has no '{key}', needed for {why}")
        return v

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        img = self._get(out, "image_features", "the contrastive loss (pass images or videos to the model)")
        txt = self._get(out, "text_features", "the contrastive loss (pass text to the model)")
        scale = self._get(out, "logit_scale", "the contrastive loss")
        bias = out.get("logit_bias")
        if img.shape != txt.shape:
            raise ValueError(f"image_features {list(img.shape)} and text_features {list(txt.shape)} differ: "
                             f"the objective needs one caption per image in a batch")
        if self.kind == "sigmoid" and bias is None:
            raise ValueError("kind 'sigmoid' needs the model's logit_bias: build the model with contrastive='sigmoid'")
        if self.kind == "softmax" and bias is not None:
            raise ValueError("the model has a logit_bias (contrastive='sigmoid') but the objective is 'softmax': the "
                             "bias would get no gradient (and DDP fails on unused parameters); make them match")
        _check_equal_rows(img.shape[0], self.world_size, img.device)

        if self.kind == "softmax":
            terms = dict(self.contrastive(img, txt, scale))
        else:
            terms = dict(self.contrastive(img, txt, scale, bias))
        logs: dict[str, torch.Tensor] = {"logit_scale": scale, "temperature": 1.0 / scale}
        if bias is not None:
            logs["logit_bias"] = bias

        if self.lambda_div > 0:
            key = "segments" if self.div_space == "heads" else "pooled_hidden"
            seg = self._get(out, key, "the diversity loss (lambda_div > 0): use the multi-prompt text tower "
                                      "or set lambda_div to 0")
            raw = diversity_loss(seg, self.div_margin)
            terms["diversity_loss"] = self.lambda_div * raw
            logs["diversity_unweighted"] = raw
            if seg.shape[1] > 1:
                logs["prompt_cosine"] = pairwise_cosines(seg).mean()
        if self.lambda_neg > 0:
            neg = self._get(out, "negated", "the negation-aware loss (lambda_neg > 0): enable the negated prompts "
                                            "in the text tower or set lambda_neg to 0")
            raw = negation_loss(img, txt, neg, scale, bias if self.kind == "sigmoid" else None,
                                self.neg_all_images, self.rank, self.world_size, self.gather_with_grad)
            terms["negation_loss"] = self.lambda_neg * raw
            logs["negation_unweighted"] = raw
            logs["negated_cosine"] = (img * neg).sum(-1).mean()

        with torch.no_grad():
            sim = img @ txt.T
            B = sim.shape[0]
            logs["positive_cosine"] = sim.diagonal().mean()
            if B > 1:
                logs["negative_cosine"] = (sim.sum() - sim.diagonal().sum()) / (B * (B - 1))
        terms.update({k: v.detach() for k, v in logs.items()})
        return terms
