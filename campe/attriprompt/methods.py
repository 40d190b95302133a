"""The prompt-learning methods on a frozen CLIP, behind one registry (CoOp/PromptSRC style: one trainer, a
`method` value picks the prompt learner).

    m = build_method("attriprompt", backbone, params)       # METHODS: zsclip coop cocoop ivlp promptsrc attriprompt
    vis = vision_pass(backbone, pixels, m.vision_layers(), params)   # frozen image side, computed once per image
    ct = class_text(backbone, classnames, params.templates)   # class tokens + frozen ensemble features t0
    logits = m.logits(vis, ct)                                # (B, C)
    terms = m.losses(vis, ct, labels)                         # dict of named terms, "loss" their sum

Text features are (G, C, D) with `group` (B,) naming each image's row: G = 1 for static prompts, G = B for
image-conditioned ones, and for AttriPrompt with hard retrieval G = the number of distinct compositions in the
batch (one text pass per composition and class, shared by the images that retrieved it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from campe.attriprompt.backbone import Backbone
from campe.attriprompt.config import PromptLearnParams
from campe.attriprompt.kmeans import kmeans
from campe.attriprompt.losses import ce_term, key_pull_term, logit_kl_term, text_l1_term
from campe.attriprompt.pool import PromptPool, QueryProjection


@dataclass
class VisionOut:
    """The frozen image side of a batch: feat (B, D) normalised global features; centres (B, V, K, d_v) and counts
    (B, V, K) of the k-means of vision layers `layers` (1-based, V of them; empty when no method needs them)."""
    feat: torch.Tensor
    centres: torch.Tensor
    counts: torch.Tensor
    layers: tuple[int, ...]

    def __getitem__(self, idx) -> "VisionOut":
        return VisionOut(self.feat[idx], self.centres[idx], self.counts[idx], self.layers)

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.layers.index(layer)
        return self.centres[:, i], self.counts[:, i]

    @staticmethod
    def cat(parts: list["VisionOut"]) -> "VisionOut":
        return VisionOut(torch.cat([p.feat for p in parts]), torch.cat([p.centres for p in parts]),
                         torch.cat([p.counts for p in parts]), parts[0].layers)


@torch.no_grad()
def vision_pass(bb: Backbone, pixels: torch.Tensor, layers: tuple[int, ...], p: PromptLearnParams) -> VisionOut:
    """pixels (B, 3, H, W) -> VisionOut: global feature and the per-image k-means of each layer in `layers`."""
    feat, hidden = bb.encode_image(pixels)
    cs, ns = [], []
    for layer in layers:
        tokens = hidden[layer - 1] if p.include_cls else hidden[layer - 1][:, 1:]
        c, n, _ = kmeans(tokens, p.clusters, p.kmeans_iters)
        cs.append(c)
        ns.append(n)
    B = feat.shape[0]
    centres = torch.stack(cs, 1) if cs else feat.new_zeros(B, 0, p.clusters, bb.vision_width)
    counts = torch.stack(ns, 1) if ns else feat.new_zeros(B, 0, p.clusters)
    return VisionOut(F.normalize(feat, dim=-1), centres, counts, tuple(layers))


@dataclass
class ClassText:
    """Class names tokenized as "<name>." (ids (C, L), eos (C,)) and t0 (C, D): the frozen CLIP features of the
    template ensemble (mean of normalised features, normalised)."""
    names: list[str]
    ids: torch.Tensor
    eos: torch.Tensor
    t0: torch.Tensor


@torch.no_grad()
def class_text(bb: Backbone, names: list[str], templates: list[str]) -> ClassText:
    ids, eos = bb.tokenize([f"{n}." for n in names])
    feats = []
    for t in templates:
        tid, teos = bb.tokenize([t.format(n) for n in names])
        feats.append(F.normalize(bb.encode_text(tid, teos)[0], dim=-1))
    return ClassText(list(names), ids, eos, F.normalize(torch.stack(feats).mean(0), dim=-1))


def init_context(bb: Backbone, n_ctx: int, words: str, generator: torch.Generator) -> torch.Tensor:
    """(n_ctx, d_t): the token embeddings of `words` when they make exactly n_ctx tokens (CoOp's ctx_init), else
    N(0, 0.02)."""
    if words:
        ids, eos = bb.tokenize([words])
        if int(eos[0]) - 1 == n_ctx:
            return bb.token_embedding(ids[0, 1:1 + n_ctx]).detach().clone()
    return torch.randn(n_ctx, bb.text_width, generator=generator) * 0.02


class PromptMethod(nn.Module):
    """Base: the logits from text features, CE as the loss. Subclasses give text_features (and more terms)."""
    trains = True
    gpa = False

    def __init__(self, bb: Backbone, p: PromptLearnParams, generator: torch.Generator):
        super().__init__()
        self.bb = [bb]  # a list: the frozen backbone is not a submodule (not in state_dict(), not trained)
        self.p = p

    @property
    def backbone(self) -> Backbone:
        return self.bb[0]

    def vision_layers(self) -> tuple[int, ...]:
        return ()

    def text_features(self, vis: VisionOut, ct: ClassText) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> normalised text features (G, C, D), group (B,) and auxiliary outputs."""
        raise NotImplementedError

    def scores(self, img: torch.Tensor, text: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """tau * cos: img (B, D), text (G, C, D), group (B,) -> (B, C)."""
        return self.backbone.logit_scale * torch.einsum("bd,bcd->bc", img, text[group])

    def logits(self, vis: VisionOut, ct: ClassText) -> torch.Tensor:
        text, group, _ = self.text_features(vis, ct)
        return self.scores(vis.feat, text, group)

    def losses(self, vis: VisionOut, ct: ClassText, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = ce_term(self.logits(vis, ct), labels)
        terms["loss"] = sum(terms.values())
        return terms


def _static(text: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    return F.normalize(text, dim=-1), torch.zeros(B, dtype=torch.long, device=text.device)


class ZeroShotCLIP(PromptMethod):
    """Frozen CLIP with the template ensemble: nothing to train."""
    trains = False

    def text_features(self, vis, ct):
        return ct.t0[None], torch.zeros(vis.feat.shape[0], dtype=torch.long, device=vis.feat.device), {}


class CoOp(PromptMethod):
    """Shallow learned context (n_ctx, d_t) shared by every class, in place of the words before the name."""

    def __init__(self, bb, p, generator):
        super().__init__(bb, p, generator)
        self.ctx = nn.Parameter(init_context(bb, p.n_ctx, p.ctx_init, generator))

    def text_features(self, vis, ct):
        return (*_static(self.backbone.encode_text(ct.ids, ct.eos, {0: self.ctx[None]}), vis.feat.shape[0]), {})


class CoCoOp(CoOp):
    """CoOp + a meta-net (Linear-ReLU-Linear, D -> D/16 -> d_t) whose output shifts the context per image."""

    def __init__(self, bb, p, generator):
        super().__init__(bb, p, generator)
        hidden = max(bb.embed_dim // 16, 4)
        self.meta_net = nn.Sequential(nn.Linear(bb.embed_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, bb.text_width))

    def text_features(self, vis, ct):
        ctx = self.ctx[None] + self.meta_net(vis.feat)[:, None]  # (B, n_ctx, d_t)
        text = self.backbone.encode_text(ct.ids, ct.eos, {0: ctx})
        return F.normalize(text, dim=-1), torch.arange(vis.feat.shape[0], device=vis.feat.device), {}


def text_depth(bb: Backbone, p: PromptLearnParams) -> int:
    if p.depth > bb.text_layers:
        raise ValueError(f"depth {p.depth} exceeds the text tower's {bb.text_layers} blocks")
    return p.depth or bb.text_layers


class IVLP(PromptMethod):
    """Deep language prompting (IVLP, text side only): n_ctx learned tokens per block, blocks 0..depth-1."""

    def __init__(self, bb, p, generator):
        super().__init__(bb, p, generator)
        depth = text_depth(bb, p)
        first = init_context(bb, p.n_ctx, p.ctx_init, generator)[None]
        rest = torch.randn(depth - 1, p.n_ctx, bb.text_width, generator=generator) * 0.02
        self.ctx = nn.Parameter(torch.cat([first, rest]))  # (depth, n_ctx, d_t)

    def text_features(self, vis, ct):
        prompts = {i: self.ctx[i][None] for i in range(self.ctx.shape[0])}
        return (*_static(self.backbone.encode_text(ct.ids, ct.eos, prompts), vis.feat.shape[0]), {})


class PromptSRC(IVLP):
    """IVLP + PromptSRC's self-regularisation (text side): L1 to the frozen ensemble features, the logit KL against
    zero-shot CLIP, and Gaussian prompt aggregation over epochs (in the trainer)."""
    gpa = True

    def losses(self, vis, ct, labels):
        text, group, _ = self.text_features(vis, ct)
        logits = self.scores(vis.feat, text, group)
        zs = self.backbone.logit_scale * vis.feat @ ct.t0.T
        terms = {**ce_term(logits, labels), **text_l1_term(text, ct.t0, self.p.text_loss_weight),
                 **logit_kl_term(logits, zs, self.p.kl_weight)}
        terms["loss"] = sum(terms.values())
        return terms


METHODS: dict[str, type[PromptMethod]] = {"zsclip": ZeroShotCLIP, "coop": CoOp, "cocoop": CoCoOp, "ivlp": IVLP,
                                          "promptsrc": PromptSRC}


def register(name: str):
    def deco(cls):
        METHODS[name] = cls
        return cls
    return deco


def build_method(name: str, bb: Backbone, p: PromptLearnParams, seed: int = 0) -> PromptMethod:
    """The method `name` with its learnable parts initialised from `seed` (a torch.Generator: reproducible)."""
    import campe.attriprompt.attri  # noqa: F401  (registers "attriprompt")

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # modules that draw from the global generator (nn.Linear) stay reproducible
        return METHODS[name](bb, p, g)


def vision_layer_for(text_block: int, text_layers: int, vision_layers: int) -> int:
    """The vision layer (1-based) whose clusters feed text block `text_block` (0-based): the hierarchical map,
    block i <- layer i+1 when the towers are equally deep, scaled otherwise."""
    return max(1, math.ceil((text_block + 1) * vision_layers / text_layers))
