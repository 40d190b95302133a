"""Losses against plain full-matrix references (values and gradients), and two gloo ranks vs one process."""
from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from campe.core.config import ConfigError, from_dict
from campe.core.losses import (ClipLoss, CampeObjective, LossConfig, SigLipLoss, diversity_loss, negation_loss,
                               total_loss)
from tests.conftest import join_spawned

DT = torch.float64


def _feats(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT, requires_grad=True)


# ---------------------------------------------------------------------------------------------------- references
# Written element by element from the definitions, on purpose unlike the matrix code under test.

def ref_clip(img, txt, s):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = [torch.exp(s * torch.dot(img[i], txt[j])) for j in range(n)]
        col = [torch.exp(s * torch.dot(img[j], txt[i])) for j in range(n)]
        total = total - torch.log(row[i] / sum(row)) - torch.log(col[i] / sum(col))
    return total / (2 * n)


def ref_siglip(img, txt, s, b):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            y = 1.0 if i == j else -1.0
            total = total - torch.log(1.0 / (1.0 + torch.exp(-y * (s * torch.dot(img[i], txt[j]) + b))))
    return total / n


def ref_diversity(seg, margin):
    b, k, _ = seg.shape
    out = 0.0
    for c in range(b):
        pairs = []
        for p in range(k):
            for q in range(p + 1, k):
                cos = torch.dot(seg[c, p], seg[c, q]) / (seg[c, p].norm() * seg[c, q].norm())
                pairs.append(cos if margin is None else torch.clamp(cos - margin, min=0.0))
        out = out + sum(pairs) / len(pairs)
    return out / b


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


# ---------------------------------------------------------------------------------------------------- single process

def test_clip_loss_matches_reference_values_and_gradients():
    img_raw, txt_raw = _feats(6, 5, 0), _feats(6, 5, 1)
    log_s = torch.tensor(math.log(7.0), dtype=DT, requires_grad=True)
    img, txt, s = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1), log_s.exp()
    got = ClipLoss()(img, txt, s)["contrastive_loss"]
    want = ref_clip(img, txt, s)
    assert torch.allclose(got, want, atol=1e-10)
    for g, w in zip(_grads(got, [img_raw, txt_raw, log_s]), _grads(want, [img_raw, txt_raw, log_s])):
        assert torch.allclose(g, w, atol=1e-10)
    assert _grads(got, [log_s])[0].abs() > 0


def test_siglip_loss_matches_reference_with_bias():
    img_raw, txt_raw = _feats(5, 4, 2), _feats(5, 4, 3)
    log_s = torch.tensor(math.log(10.0), dtype=DT, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=DT, requires_grad=True)
    img, txt, s = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1), log_s.exp()
    got = SigLipLoss()(img, txt, s, bias)["contrastive_loss"]
    want = ref_siglip(img, txt, s, bias)
    assert torch.allclose(got, want, atol=1e-10)
    params = [img_raw, txt_raw, log_s, bias]
    for g, w in zip(_grads(got, params), _grads(want, params)):
        assert torch.allclose(g, w, atol=1e-10)
    # the bias really enters: a different bias, a different loss
    assert not torch.allclose(SigLipLoss()(img, txt, s, bias + 1)["contrastive_loss"], got)


def test_diversity_zero_for_orthogonal_one_for_identical_and_matches_reference():
    eye = torch.eye(4, dtype=DT)[None].repeat(3, 1, 1)  # 3 captions, K=4 orthogonal unit segments
    assert diversity_loss(eye).item() == pytest.approx(0.0, abs=1e-12)
    assert diversity_loss(eye, margin=None).item() == pytest.approx(0.0, abs=1e-12)
    same = torch.randn(3, 1, 8, dtype=DT).repeat(1, 5, 1) * torch.rand(3, 5, 1, dtype=DT).add(0.5)  # scaled copies
    assert diversity_loss(same).item() == pytest.approx(1.0, abs=1e-12)
    assert diversity_loss(same, margin=0.25).item() == pytest.approx(0.75, abs=1e-12)
    seg = torch.randn(4, 5, 3, dtype=DT, requires_grad=True)
    for margin in (None, 0.0, 0.2):
        got, want = diversity_loss(seg, margin), ref_diversity(seg, margin)
        assert torch.allclose(got, want, atol=1e-12)
        assert torch.allclose(_grads(got, [seg])[0], _grads(want, [seg])[0], atol=1e-12)
    # margin 0 ignores anti-correlated pairs, the raw cosine does not
    anti = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=DT)
    assert diversity_loss(anti).item() == 0.0 and diversity_loss(anti, margin=None).item() == pytest.approx(-1.0)
    assert diversity_loss(torch.randn(2, 1, 4)).item() == 0.0  # K=1: no pairs


def _ce_row(logits_row, target):
    return -torch.log(torch.exp(logits_row[target]) / torch.exp(logits_row).sum())


def test_negation_as_duplicate_of_another_caption_is_an_extra_column():
    n = 6
    img, txt = F.normalize(_feats(n, 4, 4), dim=-1), F.normalize(_feats(n, 4, 5), dim=-1)
    s = torch.tensor(6.0, dtype=DT)
    perm = torch.tensor([(i + 2) % n for i in range(n)])  # a derangement: neg_i is caption i+2's embedding
    neg = txt[perm]
    z = s * img @ txt.T
    # own-image form: row i sees the usual N columns plus one more copy of column perm[i]
    want = sum(_ce_row(torch.cat([z[i], z[i, perm[i]].view(1)]), i) for i in range(n)) / n
    assert torch.allclose(negation_loss(img, txt, neg, s), want, atol=1e-12)
    # all-images form: every column appears twice, so the row's normaliser doubles: the i->t CE plus log 2
    i2t = sum(_ce_row(z[i], i) for i in range(n)) / n
    assert torch.allclose(negation_loss(img, txt, neg, s, all_images=True), i2t + math.log(2), atol=1e-12)
    # a hard negative: once images match their captions, a negated embedding close to the caption costs more
    # than one equal to another caption
    aligned = F.normalize(txt + 0.1 * torch.randn(n, 4, dtype=DT), dim=-1)
    assert negation_loss(aligned, txt, txt, s) > negation_loss(aligned, txt, neg, s)


def test_negation_sigmoid_form_matches_reference_and_reaches_negated():
    n = 5
    neg_raw = _feats(n, 4, 8)
    img, txt, neg = F.normalize(_feats(n, 4, 6), dim=-1), F.normalize(_feats(n, 4, 7), dim=-1), F.normalize(
        neg_raw, dim=-1)
    s, b = torch.tensor(4.0, dtype=DT), torch.tensor(-2.0, dtype=DT, requires_grad=True)
    own = sum(-torch.log(torch.sigmoid(-(s * torch.dot(img[i], neg[i]) + b))) for i in range(n)) / n
    every = sum(-torch.log(torch.sigmoid(-(s * torch.dot(img[i], neg[j]) + b)))
                for i in range(n) for j in range(n)) / n
    got = negation_loss(img, txt, neg, s, logit_bias=b)
    assert torch.allclose(got, own, atol=1e-12)
    assert torch.allclose(negation_loss(img, txt, neg, s, logit_bias=b, all_images=True), every, atol=1e-12)
    g_neg, g_b = _grads(got, [neg_raw, b])
    assert g_neg.abs().sum() > 0 and g_b.abs() > 0


def test_objective_terms_weights_and_logs():
    n, k = 4, 3
    img, txt = F.normalize(_feats(n, 6, 9), dim=-1), _feats(n, 6, 10)
    seg = txt.view(n, k, 2)
    txtn, neg = F.normalize(txt, dim=-1), F.normalize(_feats(n, 6, 11), dim=-1)
    s = torch.tensor(5.0, dtype=DT)
    out = {"image_features": img, "text_features": txtn, "segments": seg, "negated": neg, "logit_scale": s}
    plain = CampeObjective("softmax")(out)
    assert set(k for k in plain if k.endswith("_loss")) == {"contrastive_loss"}
    full = CampeObjective("softmax", lambda_div=0.5, lambda_neg=0.25)(out)
    assert torch.allclose(full["contrastive_loss"], ref_clip(img, txtn, s))
    assert torch.allclose(full["diversity_loss"], 0.5 * ref_diversity(seg, 0.0))
    assert torch.allclose(full["negation_loss"], 0.25 * negation_loss(img, txtn, neg, s))
    assert torch.allclose(total_loss(full), full["contrastive_loss"] + full["diversity_loss"] + full["negation_loss"])
    assert full["temperature"].item() == pytest.approx(0.2)
    assert full["positive_cosine"].item() == pytest.approx(float((img * txtn).sum(-1).mean().detach()))
    assert not any(v.requires_grad for k, v in full.items() if not k.endswith("_loss"))
    assert total_loss(full).requires_grad


def test_objective_refuses_missing_inputs_and_mismatched_kind():
    n = 3
    img, txt = F.normalize(torch.randn(n, 4), dim=-1), F.normalize(torch.randn(n, 4), dim=-1)
    out = {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="segments"):
        CampeObjective(lambda_div=0.1)(out)
    with pytest.raises(ValueError, match="negated"):
        CampeObjective(lambda_neg=0.1)(out)
    with pytest.raises(ValueError, match="logit_bias"):
        CampeObjective("sigmoid")(out)
    with pytest.raises(ValueError, match="softmax"):
        CampeObjective("softmax")({**out, "logit_bias": torch.tensor(-1.0)})
    with pytest.raises(ValueError, match="kind"):
        CampeObjective("hinge")
    with pytest.raises(ConfigError, match="lambda_dvi"):
        from_dict(LossConfig, {"lambda_dvi": 0.1}, "params.yaml:loss")


# ---------------------------------------------------------------------------------------------------- two ranks

N_TOTAL, D_IMG, D_TXT, K = 8, 6, 5, 2
# (kind, neg_all_images, gather_with_grad)
CASES = [("softmax", False, True), ("softmax", True, True), ("sigmoid", False, True), ("sigmoid", True, True),
         ("softmax", True, False), ("sigmoid", True, False)]


class TinyPair(nn.Module):
    """Linear 'towers' producing everything the objective uses, with the temperature (and bias) as parameters."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(D_IMG, 8)
        self.txt = nn.Linear(D_TXT, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0)) if kind == "sigmoid" else None

    def forward(self, xi, xt, xn):
        t = self.txt(xt)
        out = {"image_features": F.normalize(self.img(xi), dim=-1), "text_features": F.normalize(t, dim=-1),
               "segments": t.view(t.shape[0], K, -1), "negated": F.normalize(self.txt(xn), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def _data():
    g = torch.Generator().manual_seed(123)
    return (torch.randn(N_TOTAL, D_IMG, generator=g), torch.randn(N_TOTAL, D_TXT, generator=g),
            torch.randn(N_TOTAL, D_TXT, generator=g))


def _step(model, objective, xs):
    model.zero_grad()
    terms = objective(model(*xs))
    total_loss(terms).backward()
    inner = model.module if hasattr(model, "module") else model
    return ({k: float(v.detach()) for k, v in terms.items()},
            {n: p.grad.detach().clone() for n, p in inner.named_parameters()})


def _worker(rank: int, world_size: int, port: int, out_dir: str, data) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        b = N_TOTAL // world_size
        xs = [x[rank * b:(rank + 1) * b] for x in data]
        results = []
        for kind, all_images, with_grad in CASES:
            model = nn.parallel.DistributedDataParallel(TinyPair(kind))
            objective = CampeObjective(kind, lambda_div=0.5, lambda_neg=0.3, neg_all_images=all_images, rank=rank,
                                       world_size=world_size, gather_with_grad=with_grad)
            results.append(_step(model, objective, xs))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_on_the_whole_batch(tmp_path):
    data = _data()
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), data), nprocs=2, join=False,
                             start_method="spawn")
    join_spawned(ctx)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case, r0, r1 in zip(CASES, *ranks):
        kind, all_images, with_grad = case
        objective = CampeObjective(kind, lambda_div=0.5, lambda_neg=0.3, neg_all_images=all_images)
        terms, grads = _step(TinyPair(kind), objective, data)
        for name in ("contrastive_loss", "diversity_loss", "negation_loss"):
            # each rank's loss covers its rows against the global batch; their mean is the full-batch loss
            assert (r0[0][name] + r1[0][name]) / 2 == pytest.approx(terms[name], rel=1e-5), (case, name)
        for name, g in grads.items():
            for rank_grads in (r0[1], r1[1]):
                assert rank_grads[name].abs().sum() > 0, (case, name)
                if with_grad:
                    assert torch.allclose(rank_grads[name], g, atol=1e-5, rtol=1e-4), (case, name, rank_grads[name], g)
        if not with_grad:
            # without the gradient path through the gather, the other ranks' losses no longer pull on the local
            # rows: same loss, not the full-batch gradient (so the check above is sensitive to it)
            assert not all(torch.allclose(r0[1][n], grads[n], atol=1e-5) for n in ("img.weight", "txt.weight")), case
