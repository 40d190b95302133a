"""Retrieval aspect by aspect: what the query caption mentions, which prompt segment retrieves it, and what
up-weighting that segment buys.

    from campe.core.aspects import aspect_breakdown, specialisation, choose_reweighting, reweighting_effect
    m = aspect_breakdown(img, txt, txt_to_img, caption_aspects)        # {"mix/subject-position/t2i_R@1": 41.0, ...}
    spec = specialisation(img, txt, txt_to_img, caption_aspects, k=6)   # (K + 1) x A tables of t2i R@1 / R@5
    plan = choose_reweighting(val_img, val_txt, val_t2i, val_aspects, k=6)   # per aspect: its segment and weight
    m_w = reweighting_effect(img, txt, txt_to_img, caption_aspects, plan, k=6)  # on test: R@k with those weights

caption_aspects[j] lists the aspects caption j mentions (the generator's `aspects`, e.g. ["subject", "position"]).
Its *mix* is those names joined with "-" (in the order given: the loader gives the generator's order); an *aspect
type* a groups every caption that mentions a, so aspect-type groups overlap. Only text -> image is broken down: the
query is then a caption whose aspects are known (an image query has several captions with different mixes).

Segments: the D-dim embeddings are K contiguous D/K slices (campe.core.retrieval.aspect_scale); "segment k alone" is
the similarity <v_k, t_k> (weights one-hot at k), the "all" row the plain similarity. Ranks are
campe.core.retrieval.retrieval_ranks', so the tie rule is that of every headline figure.

Re-weighting is measured, not tuned on test: on the val split, the *specialist* of aspect a is the segment whose
selection score (t2i R@1 + R@5 with that segment alone, on a's captions) is highest relative to that segment's own
mean score over all aspect types (row-centred: a segment strong on everything does not specialise in everything);
its weight is the value of `grid` (1 = unchanged, always a candidate, preferred on ties) with the best selection
score of the re-weighted similarity on val's a-captions. On test, the weights are applied once; the figures are
R@k on a's captions and the change against the plain similarity, on a's captions and on the other captions.
Keys (flat, MLflow-safe): mix/<mix>/t2i_R@k, aspect/<a>/t2i_R@k, seg<k>/aspect/<a>/t2i_R@k (k 1-based),
reweight/<a>/t2i_R@k, reweight/<a>/delta_t2i_R@k, reweight/<a>/others_delta_t2i_R@k.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from campe.core.retrieval import aspect_scale, retrieval_ranks

ASPECT_KS = (1, 5)
REWEIGHT_GRID = (1.5, 2.0, 3.0, 5.0)


def mix_name(aspects: Sequence[str]) -> str:
    return "-".join(aspects)


def _groups(caption_aspects: Sequence[Sequence[str]], order: Sequence[str] | None
            ) -> tuple[list[str], list[str]]:
    """(aspect types, mixes) present, in `order` (unknown names after it, by first appearance); mixes by size, then
    by the order of their aspects."""
    seen: dict[str, None] = dict.fromkeys(a for asp in caption_aspects for a in asp)
    rank = {a: i for i, a in enumerate(order or [])}
    types = sorted(seen, key=lambda a: rank.get(a, len(rank) + list(seen).index(a)))
    pos = {a: i for i, a in enumerate(types)}
    mixes = dict.fromkeys(tuple(asp) for asp in caption_aspects)
    return types, [mix_name(m) for m in sorted(mixes, key=lambda m: (len(m), [pos[a] for a in m]))]


def _check(txt: torch.Tensor, caption_aspects: Sequence[Sequence[str]]) -> None:
    if len(caption_aspects) != txt.shape[0]:
        raise ValueError(f"caption_aspects: {len(caption_aspects)} entries for {txt.shape[0]} captions (one list of "
                         f"aspect names per caption)")
    if any(not asp for asp in caption_aspects):
        raise ValueError("caption_aspects: every caption needs at least one aspect name")


def t2i_ranks(img, txt, txt_to_img, weights=None, k: int | None = None, ties: str = "pessimistic",
              tie_tol: float = 1e-5) -> np.ndarray:
    """Text -> image ranks [M] (1-based) under sum_k w_k <v_k, t_k> (plain similarity when weights is None)."""
    img, txt = torch.as_tensor(img, dtype=torch.float32), torch.as_tensor(txt, dtype=torch.float32)
    w = aspect_scale(img.shape[1], weights, k)
    if w is not None:
        img = img * w
    t2i = torch.as_tensor(txt_to_img).to(torch.int64)
    return retrieval_ranks(img, txt, t2i, ties=ties, tie_tol=tie_tol)[1].numpy()


def _recall(ranks: np.ndarray, mask: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"t2i_R@{k}": float(100.0 * np.mean(ranks[mask] <= k)) for k in ks}


def _masks(caption_aspects, order) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    types, mixes = _groups(caption_aspects, order)
    by_type = {a: np.array([a in asp for asp in caption_aspects]) for a in types}
    names = np.array([mix_name(asp) for asp in caption_aspects])
    return by_type, {m: names == m for m in mixes}


def aspect_counts(caption_aspects: Sequence[Sequence[str]], order: Sequence[str] | None = None) -> dict:
    """{"mix": {mix: captions}, "aspect": {aspect type: captions}}."""
    by_type, by_mix = _masks(caption_aspects, order)
    return {"mix": {m: int(v.sum()) for m, v in by_mix.items()},
            "aspect": {a: int(v.sum()) for a, v in by_type.items()}}


def aspect_breakdown(img, txt, txt_to_img, caption_aspects: Sequence[Sequence[str]], ks: Sequence[int] = ASPECT_KS,
                     order: Sequence[str] | None = None, ties: str = "pessimistic", tie_tol: float = 1e-5
                     ) -> dict[str, float]:
    """t2i R@k (percent) per aspect mix (mix/<mix>/t2i_R@k) and per aspect type (aspect/<a>/t2i_R@k) of the query
    captions; img [N, D], txt [M, D], txt_to_img [M], caption_aspects [M] lists of names."""
    _check(torch.as_tensor(txt), caption_aspects)
    ranks = t2i_ranks(img, txt, txt_to_img, ties=ties, tie_tol=tie_tol)
    by_type, by_mix = _masks(caption_aspects, order)
    out = {}
    for m, mask in by_mix.items():
        out.update({f"mix/{m}/{key}": v for key, v in _recall(ranks, mask, ks).items()})
    for a, mask in by_type.items():
        out.update({f"aspect/{a}/{key}": v for key, v in _recall(ranks, mask, ks).items()})
    return out


def specialisation(img, txt, txt_to_img, caption_aspects: Sequence[Sequence[str]], k: int,
                   ks: Sequence[int] = ASPECT_KS, order: Sequence[str] | None = None, ties: str = "pessimistic",
                   tie_tol: float = 1e-5) -> dict:
    """The K x aspect specialisation matrix: t2i R@k per aspect type with segment k's similarity alone, and the
    all-segments row. Returns {"rows": ["APT-1", ..., "APT-K", "all"], "aspects": [...], "t2i_R@1": [[...]], ...}
    (one (K + 1) x A table per k in ks, percent)."""
    _check(torch.as_tensor(txt), caption_aspects)
    if k < 2:
        raise ValueError(f"specialisation: needs K >= 2 prompt segments, got k={k}")
    by_type, _ = _masks(caption_aspects, order)
    out: dict = {"rows": [f"APT-{i + 1}" for i in range(k)] + ["all"], "aspects": list(by_type)}
    tables = {f"t2i_R@{q}": [] for q in ks}
    for i in range(k + 1):
        w = None if i == k else [1.0 if j == i else 0.0 for j in range(k)]
        ranks = t2i_ranks(img, txt, txt_to_img, w, k if w else None, ties, tie_tol)
        row = {a: _recall(ranks, mask, ks) for a, mask in by_type.items()}
        for key, table in tables.items():
            table.append([row[a][key] for a in by_type])
    return {**out, **tables}


def specialisation_metrics(spec: dict) -> dict[str, float]:
    """Flat keys seg<k>/aspect/<a>/t2i_R@q of the segment rows (the all row is aspect/<a>/... of aspect_breakdown)."""
    out = {}
    for key in (x for x in spec if x.startswith("t2i_R@")):
        for i, row in enumerate(spec[key][:-1]):
            out.update({f"seg{i + 1}/aspect/{a}/{key}": v for a, v in zip(spec["aspects"], row)})
    return out


def specialisation_scores(spec: dict) -> np.ndarray:
    """[K, A] selection score (t2i R@1 + R@5 with segment k alone) minus segment k's mean over the aspect types:
    > 0 where a segment does better on an aspect than it does on average."""
    score = np.asarray(spec["t2i_R@1"], dtype=float)[:-1] + np.asarray(spec["t2i_R@5"], dtype=float)[:-1]
    return score - score.mean(axis=1, keepdims=True)


def specialists(spec: dict) -> dict[str, int]:
    """Per aspect type, the 0-based segment that specialises in it: the highest specialisation_scores entry of its
    column (ties: the first segment)."""
    centred = specialisation_scores(spec)
    return {a: int(np.argmax(centred[:, j])) for j, a in enumerate(spec["aspects"])}


def _score(ranks: np.ndarray, mask: np.ndarray) -> float:
    r = _recall(ranks, mask, ASPECT_KS)
    return r["t2i_R@1"] + r["t2i_R@5"]


def choose_reweighting(img, txt, txt_to_img, caption_aspects: Sequence[Sequence[str]], k: int,
                       grid: Sequence[float] = REWEIGHT_GRID, order: Sequence[str] | None = None,
                       ties: str = "pessimistic", tie_tol: float = 1e-5) -> dict[str, dict]:
    """On the val split: per aspect type, {"segment": 0-based specialist, "weight": the chosen up-weight,
    "weights": the K weights, "val_score": its selection score, "val_score_plain": that of the plain similarity}."""
    spec = specialisation(img, txt, txt_to_img, caption_aspects, k, ASPECT_KS, order, ties, tie_tol)
    by_type, _ = _masks(caption_aspects, order)
    cache: dict[tuple, np.ndarray] = {}

    def ranks(w: tuple) -> np.ndarray:
        if w not in cache:
            cache[w] = t2i_ranks(img, txt, txt_to_img, list(w), k, ties, tie_tol)
        return cache[w]

    plan = {}
    for a, seg in specialists(spec).items():
        cands = [tuple(lam if j == seg else 1.0 for j in range(k)) for lam in (1.0, *sorted(set(grid) - {1.0}))]
        scores = [_score(ranks(w), by_type[a]) for w in cands]
        best = int(np.argmax(scores))  # the first maximum: weight 1 (no change) unless another is strictly better
        plan[a] = {"segment": seg, "weight": cands[best][seg], "weights": list(cands[best]),
                   "val_score": scores[best], "val_score_plain": scores[0]}
    return plan


def reweighting_effect(img, txt, txt_to_img, caption_aspects: Sequence[Sequence[str]], plan: dict[str, dict], k: int,
                       ks: Sequence[int] = ASPECT_KS, order: Sequence[str] | None = None, ties: str = "pessimistic",
                       tie_tol: float = 1e-5) -> dict[str, float]:
    """On test, per aspect type of `plan` present here: t2i R@k on its captions with its weights
    (reweight/<a>/t2i_R@k), the change against the plain similarity (reweight/<a>/delta_t2i_R@k) and the change
    on the captions that do not mention it (reweight/<a>/others_delta_t2i_R@k; absent when there are none)."""
    _check(torch.as_tensor(txt), caption_aspects)
    by_type, _ = _masks(caption_aspects, order)
    plain = t2i_ranks(img, txt, txt_to_img, ties=ties, tie_tol=tie_tol)
    out = {}
    for a, choice in plan.items():
        if a not in by_type:
            continue
        mask = by_type[a]
        ranks = t2i_ranks(img, txt, txt_to_img, choice["weights"], k, ties, tie_tol)
        got, base = _recall(ranks, mask, ks), _recall(plain, mask, ks)
        for key in got:
            out[f"reweight/{a}/{key}"] = got[key]
            out[f"reweight/{a}/delta_{key}"] = got[key] - base[key]
        if (~mask).any():
            got, base = _recall(ranks, ~mask, ks), _recall(plain, ~mask, ks)
            out.update({f"reweight/{a}/others_delta_{key}": got[key] - base[key] for key in got})
    return out
