"""AttriPrompt, reconstructed (../shared/notes/attriprompt.md §2): image-conditioned deep text prompts composed
from prompt pools by the k-means clusters of the frozen image encoder's layers.

    for each prompted text block i (0..depth-1), fed by vision layer l(i) (the hierarchical map):
        C, n = kmeans(patch tokens of layer l(i))               # (B, K, d_v), no gradient (in vision_pass)
        q = phi(C, n)                                           # (B, d_k), L2-normalised
        P_i(x) = [static ctx_i ; top-N pool_i entries by cos(q, keys)]   # inserted after SOS, replace style
    L = CE(tau cos(f, t(x))) + lambda_f CE(tau cos(u(x), t(x)))  [DCL, reading A]
        + lambda_t |t(x) - t0|_1  [SR]  - lambda_key mean sum cos(q, k_sel)  [pull]

Switches (PromptLearnParams): retrieval (AR off: static deep prompts of the same length), dcl (global_fine |
prompted_static | none), sr / sr_kl, selection (hard | soft), shared_passes, phi_shared, pool_per_layer, aggregate,
include_cls, infer_fine.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from campe.attriprompt.losses import ce_term, key_pull_term, logit_kl_term, text_l1_term
from campe.attriprompt.methods import (PromptMethod, init_context, register, text_depth, vision_layer_for,
                                       VisionOut, ClassText)
from campe.attriprompt.pool import PromptPool, QueryProjection, Retrieved


def first_of_group(group: torch.Tensor, G: int) -> torch.Tensor:
    """group (B,) in 0..G-1 -> (G,) the first image of each group."""
    B = group.shape[0]
    first = torch.full((G,), B, dtype=torch.long, device=group.device)
    return first.scatter_reduce(0, group, torch.arange(B, device=group.device), reduce="amin")


@register("attriprompt")
class AttriPrompt(PromptMethod):

    def __init__(self, bb, p, generator):
        super().__init__(bb, p, generator)
        self.depth = text_depth(bb, p)
        self.vmap = [vision_layer_for(i, bb.text_layers, bb.vision_layers) for i in range(self.depth)]
        key_dim = p.key_dim or bb.text_width
        n_static = p.static_ctx if p.retrieval else p.prompt_tokens()
        if p.retrieval:
            self.phi = nn.ModuleList([QueryProjection(bb.vision_width, key_dim, p.aggregate)
                                      for _ in range(1 if p.phi_shared else self.depth)])
            self.pools = nn.ModuleList([PromptPool(p.pool_size, p.pool_tokens, bb.text_width, key_dim)
                                        for _ in range(self.depth if p.pool_per_layer else 1)])
        self.ctx = None
        if n_static:
            first = init_context(bb, n_static, p.ctx_init, generator)[None]
            rest = torch.randn(self.depth - 1, n_static, bb.text_width, generator=generator) * 0.02
            self.ctx = nn.Parameter(torch.cat([first, rest]))  # (depth, n_static, d_t)

    def vision_layers(self) -> tuple[int, ...]:
        layers = set(self.vmap) if self.p.retrieval else set()
        if self.p.dcl == "global_fine":
            layers.add(self.backbone.vision_layers)
        return tuple(sorted(layers))

    def retrieve(self, vis: VisionOut) -> list[Retrieved]:
        """One retrieval per prompted block."""
        out = []
        for i, layer in enumerate(self.vmap):
            phi = self.phi[0 if self.p.phi_shared else i]
            pool = self.pools[i if self.p.pool_per_layer else 0]
            out.append(pool.retrieve(phi(*vis.at(layer)), self.p.top_n, self.p.selection, self.p.soft_temperature))
        return out

    def static_prompts(self) -> dict[int, torch.Tensor]:
        return {i: self.ctx[i][None] for i in range(self.depth)} if self.ctx is not None else {}

    def text_features(self, vis, ct):
        B = vis.feat.shape[0]
        if not self.p.retrieval:
            text = self.backbone.encode_text(ct.ids, ct.eos, self.static_prompts())
            return F.normalize(text, dim=-1), torch.zeros(B, dtype=torch.long, device=text.device), {}
        rs = self.retrieve(vis)
        prompts = {i: r.prompt if self.ctx is None else torch.cat([self.ctx[i][None].expand(B, -1, -1), r.prompt], 1)
                   for i, r in enumerate(rs)}
        index = torch.cat([r.index for r in rs], 1)  # (B, depth * N): the composition of each image
        group = torch.arange(B, device=index.device)
        if self.p.selection == "hard" and self.p.shared_passes:
            # images that retrieved the same entries at every block have identical prompts: one pass per class
            uniq, group = torch.unique(index, dim=0, return_inverse=True)
            first = first_of_group(group, uniq.shape[0])
            prompts = {i: v[first] for i, v in prompts.items()}
        text = self.backbone.encode_text(ct.ids, ct.eos, prompts)
        return F.normalize(text, dim=-1), group, {"pull": torch.stack([r.pull for r in rs], 1), "index": index}

    def fine_feature(self, vis: VisionOut) -> torch.Tensor:
        """u(x) (B, D): the CLS head applied to the mean cluster centre of the last vision layer, normalised."""
        centres, _ = vis.at(self.backbone.vision_layers)
        return F.normalize(self.backbone.vision_head(centres.mean(1)), dim=-1)

    def logits(self, vis, ct):
        text, group, _ = self.text_features(vis, ct)
        logits = self.scores(vis.feat, text, group)
        if self.p.infer_fine and self.p.dcl == "global_fine":
            logits = logits + self.scores(self.fine_feature(vis), text, group)
        return logits

    def losses(self, vis: VisionOut, ct: ClassText, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.p
        text, group, aux = self.text_features(vis, ct)
        logits = self.scores(vis.feat, text, group)
        terms = ce_term(logits, labels)
        if p.dcl == "global_fine":
            terms["ce_fine"] = p.lambda_fine * ce_term(self.scores(self.fine_feature(vis), text, group), labels)["ce"]
        elif p.dcl == "prompted_static":
            static = F.normalize(self.backbone.encode_text(ct.ids, ct.eos, self.static_prompts()), dim=-1)
            zero = torch.zeros_like(group)
            terms["ce_static"] = p.lambda_fine * ce_term(self.scores(vis.feat, static, zero), labels)["ce"]
        if p.sr:
            terms.update(text_l1_term(text[group], ct.t0, p.text_loss_weight))
        if p.sr_kl:
            terms.update(logit_kl_term(logits, self.backbone.logit_scale * vis.feat @ ct.t0.T, p.kl_weight))
        if p.retrieval and p.lambda_key > 0:
            terms.update(key_pull_term(aux["pull"], p.lambda_key))
        terms["loss"] = sum(terms.values())
        return terms
