"""Retrieval and zero-shot metrics on precomputed embeddings, in bounded memory.

    from campe.core.retrieval import retrieval_metrics, zero_shot_classify
    m = retrieval_metrics(img_emb, txt_emb, txt_to_img)            # {"i2t_R@1": 71.2, ..., "rsum": 512.3}
    m_w = retrieval_metrics(img_emb, txt_emb, txt_to_img, weights=[1.5, 1, 1, 0.5])   # aspect re-weighted
    z = zero_shot_classify(img_emb, class_text_emb, labels)         # {"top1": 63.0, "top5": 91.5}
    pred = zero_shot_predict(img_emb, class_text_emb)               # [N] top-1 class of each image

Conventions (the usual ones for Flickr30k/COCO/MSR-VTT; CLIP_benchmark's positive-pairs formulation):
  - Scores are dot products of the embeddings as given (cosine when the caller has L2-normalised them).
  - Image -> text: an image query has several positive captions; its rank is the best rank among them, i.e. counted
    against the *negative* captions only. Text -> image: each caption has exactly one positive image.
  - Ranks are 1-based; R@k is the percentage of queries with rank <= k; rsum is the sum of all R@k of both directions.
  - Ties, `ties="pessimistic"` (default): rank = 1 + number of negatives that tie with or beat the (best) positive.
    So a tie is always lost, and a collapsed model whose embeddings are all equal gets rank ~M, not rank 1.
    `ties="optimistic"`: rank = 1 + number of negatives that beat it outright (the common `1 + #greater` rule).
  - What a tie is: two scores of one query tie when they differ by at most `tie_tol * |q| * max|g|` (q the query
    embedding, g the gallery's; for unit-norm embeddings: by at most `tie_tol` in cosine, default 1e-5). Why not
    exact float equality: a matmul kernel sums different columns of one row in different orders (vector body vs.
    tail, thread blocks), so scores that are equal in exact arithmetic come out a few ulps apart, and which ones
    depends on the BLAS kernel and the thread count. A float32 dot product of unit vectors is off by ~sqrt(D) ulps
    (~1e-6 for D=384); 1e-5 leaves a margin, and two cosines 1e-5 apart are not a meaningful ranking either.
  - Mean rank is the arithmetic mean; median rank is numpy's median (mean of the two middle ranks for an even count).

Aspect re-weighting (the paper's inference-time knob): the D-dim embeddings are K concatenated D/K segments, one per
prompt/aspect, and similarity = sum_k w_k <t_k, v_k>. That equals <t, v * w_rep> with w_rep = each w_k repeated D/K
times, so the weighted retrieval costs one elementwise scaling of the image embeddings and nothing else; all-ones
weights give the plain dot product exactly.

Memory: the N x M score matrix is never materialised. One pass over chunks of image rows computes S = V_c T^T
[chunk, M] once and uses it for both directions (the matmul is the cost, so it is done once):
  - i2t: per image, the best positive score is gathered from the chunk and the negatives >= it are counted.
  - t2i: a caption's positive score lives in one chunk but its negatives are in all of them. Its tie threshold
    (p - tie, or p + tie for the optimistic rule) is estimated up front from a row-wise dot product a ~ p, and the
    negatives are counted against a window [a' - w, a' + w] around that estimate a' (w = `window` relative, since a
    row-wise dot product can differ from the matmul's value by rounding); the matmul's own positive score is
    recorded when its chunk comes by. If no negative falls inside the window and the recorded score is within w of
    a, every threshold the positive could give counts the same negatives; otherwise (ties, near-ties, duplicates)
    that caption is recomputed with its own caption-row matmul. So the result is the rule's, and the fast path
    covers almost every caption of a non-degenerate model.
Peak extra memory ~ 2 * chunk * M * 4 bytes (+ O(N + M) vectors); `chunk=None` keeps that near 128 MB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

TIES = ("pessimistic", "optimistic")
METRIC_DECIMALS = 6  # metrics as written (eval records): far below any difference that matters, no float noise
_AUTO_CHUNK_ELEMS = 1 << 24  # chunk * M float32 elements per buffer: 64 MB, two buffers


@dataclass
class RetrievalParams:
    """Settings of the retrieval/zero-shot computation (suggested params.yaml section `evaluate`, retrieval part)."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    zero_shot_ks: list[int] = field(default_factory=lambda: [1, 5])
    chunk: int = 0  # rows of the score matrix per chunk; 0 = auto (~64 MB per buffer)
    ties: str = "pessimistic"  # or "optimistic" (1 + #strictly greater)
    tie_tol: float = 1e-5  # scores within tie_tol * |q| * max|g| tie (cosine units for unit-norm embeddings)
    aspect_weights: list[float] = field(default_factory=list)  # K weights; empty = all ones (plain cosine)

    def validate(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks) or not self.zero_shot_ks or any(k < 1 for k in self.zero_shot_ks):
            raise ValueError("ks and zero_shot_ks must be non-empty lists of integers >= 1")
        if self.chunk < 0:
            raise ValueError("chunk must be >= 0 (0 = auto)")
        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {self.ties!r}")
        _check_tie_tol(self.tie_tol)
        if self.aspect_weights:
            _check_weights(torch.tensor(self.aspect_weights, dtype=torch.float64), "aspect_weights")


# ---------------------------------------------------------------------------------------------------- input checks
def _as_emb(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor [n, D], got shape {tuple(x.shape)} dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or inf (check the model output / checkpoint)")
    return x.detach().to("cpu", torch.float32).contiguous()


def _check_weights(w: torch.Tensor, name: str) -> None:
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"{name}: expected a 1-D list of K weights, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
        raise ValueError(f"{name}: weights must be finite, >= 0 and not all zero, got {w.tolist()}")


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties: expected one of {TIES}, got {ties!r}")


def _check_tie_tol(tie_tol: float) -> None:
    if not (0.0 <= tie_tol < 1.0):
        raise ValueError(f"tie_tol: expected a relative tolerance in [0, 1), got {tie_tol!r}")


def _beats(s: torch.Tensor, pos: torch.Tensor, tie: torch.Tensor, ties: str, out: torch.Tensor | None = None):
    """0/1 float mask of the scores s that count against a positive score pos under the tie rule (broadcasting):
    pessimistic s >= pos - tie (a tie is lost), optimistic s > pos + tie (only a clear win counts)."""
    if ties == "pessimistic":
        return torch.ge(s, pos - tie, out=out)
    return torch.gt(s, pos + tie, out=out)


def aspect_scale(dim: int, weights=None, k_segments: int | None = None) -> torch.Tensor | None:
    """Per-dimension scale [D] that turns a dot product into sum_k w_k <t_k, v_k> (None when no weights given).

    The K segments are contiguous D/K slices, in the order the multi-prompt encoder concatenates them.
    """
    if weights is None:
        if k_segments is not None and (k_segments < 1 or dim % k_segments):
            raise ValueError(f"k_segments={k_segments} does not divide the embedding dim {dim}")
        return None
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    _check_weights(w, "weights")
    k = w.numel()
    if k_segments is not None and k_segments != k:
        raise ValueError(f"weights has {k} entries but k_segments={k_segments}: give one weight per aspect")
    if dim % k:
        raise ValueError(f"{k} aspect weights do not divide the embedding dim {dim} into equal segments "
                         f"(the checkpoint's K must match params)")
    return w.repeat_interleave(dim // k)


def segment_similarity(img: torch.Tensor, txt: torch.Tensor, k: int, weights=None) -> torch.Tensor:
    """Dense aspect-weighted similarity [N, M] = sum_k w_k <v_k, t_k> over the K segments of img [N,D], txt [M,D].

    Written per segment, as the definition; `retrieval_metrics` uses the equivalent scaling trick (see module doc).
    """
    img, txt = torch.as_tensor(img), torch.as_tensor(txt)
    d = img.shape[1]
    if txt.shape[1] != d or d % k:
        raise ValueError(f"segment_similarity: dims {img.shape[1]} / {txt.shape[1]} must match and be divisible by k={k}")
    w = torch.ones(k, dtype=img.dtype) if weights is None else torch.as_tensor(weights, dtype=img.dtype)
    if w.numel() != k:
        raise ValueError(f"segment_similarity: {w.numel()} weights for k={k} segments")
    s = d // k
    return sum(w[i] * (img[:, i * s:(i + 1) * s] @ txt[:, i * s:(i + 1) * s].T) for i in range(k))


# ------------------------------------------------------------------------------------------------------- ranking
def _count(buf: torch.Tensor, ones: torch.Tensor, dim: int) -> torch.Tensor:
    """Row (dim=1) or column (dim=0) sums of a 0/1 float buffer via a matrix-vector product (much faster than a
    bool .sum on CPU; exact since every partial sum is an integer < 2^24)."""
    return (buf @ ones[: buf.shape[1]]).squeeze(1) if dim == 1 else (ones[:, : buf.shape[0]] @ buf).squeeze(0)


def _t2i_exact(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, tie: torch.Tensor, chunk: int,
               ties: str) -> torch.Tensor:
    """Text->image ranks [m] computed per caption row (tie [m]: each caption's absolute tie tolerance)."""
    n = img.shape[0]
    rows = max(1, min(txt.shape[0], chunk))
    buf, ones = torch.empty(rows, n), torch.ones(n, 1)
    out = torch.empty(txt.shape[0], dtype=torch.int64)
    for a in range(0, txt.shape[0], rows):
        b = min(txt.shape[0], a + rows)
        s = torch.mm(txt[a:b], img.T, out=buf[: b - a])
        pos = s.gather(1, t2i[a:b, None])
        # the positive always meets the pessimistic threshold (pos >= pos - tie) and never the optimistic one
        self_count = 1 if ties == "pessimistic" else 0
        cnt = _count(_beats(s, pos, tie[a:b, None], ties, out=s), ones, 1) - self_count
        out[a:b] = 1 + cnt.round().to(torch.int64)
    return out


def retrieval_ranks(img: torch.Tensor, txt: torch.Tensor, txt_to_img: torch.Tensor, chunk: int | None = None,
                    ties: str = "pessimistic", tie_tol: float = 1e-5, window: float = 2.0 ** -22,
                    stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks (i2t [N], t2i [M]) for img [N,D], txt [M,D] float32, txt_to_img [M] in [0, N).

    `tie_tol`: scores within tie_tol * |query| * max|gallery| tie (module doc). `window` is the relative half-width
    of the t2i fast-path window; it trades fast-path coverage against false alarms and never changes the result
    (tests run it at 0 and at 1e9). If `stats` is a dict, it receives `t2i_recomputed`: how many captions needed the
    per-caption pass.
    """
    n, m = img.shape[0], txt.shape[0]
    rows = chunk or max(1, _AUTO_CHUNK_ELEMS // m)
    rows = max(1, min(n, rows))
    t2i = txt_to_img

    order, starts, ends, valid, pos_idx = _positive_table(t2i, n)

    # Absolute tie tolerances: per image query [N, 1] and per caption query [M].
    img_norm, txt_norm = img.norm(dim=1), txt.norm(dim=1)
    tie_i = (tie_tol * img_norm * txt_norm.max())[:, None]
    tie_t = tie_tol * txt_norm * img_norm.max()
    approx, w, lo, hi = _t2i_window(img, txt, t2i, img_norm, txt_norm, tie_t, window, ties)
    c_lo = torch.zeros(m, dtype=torch.float64)  # negatives-or-positive with score >= lo
    c_hi = torch.zeros(m, dtype=torch.float64)  # ... with score > hi
    pos_exact = torch.empty(m)  # the positive's score as the matmul produced it

    s_buf, f_buf = torch.empty(rows, m), torch.empty(rows, m)
    ones_m, ones_r = torch.ones(m, 1), torch.ones(1, rows)
    i2t = torch.empty(n, dtype=torch.int64)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        s, f = torch.mm(img[a:b], txt.T, out=s_buf[: b - a]), f_buf[: b - a]
        # image -> text: best positive, then count negatives at or above it.
        pv = s.gather(1, pos_idx[a:b])
        best = pv.max(1, keepdim=True).values  # padding repeats a real positive, so max is unaffected
        all_beat = _count(_beats(s, best, tie_i[a:b], ties, out=f), ones_m, 1).round().to(torch.int64)
        pos_beat = (_beats(pv, best, tie_i[a:b], ties).bool() & valid[a:b]).sum(1)  # positives are not negatives
        i2t[a:b] = 1 + all_beat - pos_beat
        # text -> image: record the matmul's positive scores of this chunk's captions, accumulate window counts.
        js = order[int(starts[a]):int(ends[b - 1])]
        pos_exact[js] = s[t2i[js] - a, js]
        c_lo += _count(torch.ge(s, lo, out=f), ones_r, 0)
        c_hi += _count(torch.gt(s, hi, out=f), ones_r, 0)

    # Remove the positive itself from the counts. Where no negative is inside [lo, hi] and the matmul's positive is
    # within w of the estimate (so its threshold is inside [lo, hi]), every possible threshold counts c_hi negatives.
    c_lo -= (pos_exact >= lo).double()
    c_hi -= (pos_exact > hi).double()
    inside = (pos_exact - approx).abs() <= w
    ambiguous = ~inside | (c_lo != c_hi)
    t2i_rank = 1 + c_hi.round().to(torch.int64)
    if stats is not None:
        stats["t2i_recomputed"] = int(ambiguous.sum())
    if bool(ambiguous.any()):
        idx = ambiguous.nonzero().squeeze(1)
        t2i_rank[idx] = _t2i_exact(img, txt[idx], t2i[idx], tie_t[idx], chunk or max(1, _AUTO_CHUNK_ELEMS // n),
                                   ties)
    return i2t, t2i_rank


def _positive_table(t2i: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Positives of each image as a padded [N, P] index table (padding repeats the first positive; `valid` [N, P]
    marks the real ones). -> (order [M]: captions sorted by image, starts [N], ends [N] into order, valid, pos_idx)."""
    order = torch.argsort(t2i, stable=True)
    counts = torch.bincount(t2i, minlength=n)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    p_max = int(counts.max())
    offs = torch.arange(p_max)
    valid = offs[None, :] < counts[:, None]
    pos_idx = order[(starts[:, None] + torch.where(valid, offs[None, :], 0))]
    return order, starts, ends, valid, pos_idx


def _t2i_window(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, img_norm: torch.Tensor,
                txt_norm: torch.Tensor, tie_t: torch.Tensor, window: float, ties: str) -> tuple[torch.Tensor, ...]:
    """The t2i window around each caption's tie threshold, from a row-wise dot product (chunked: bounded memory).
    -> (approx [M] positive scores, w [M] half-widths, lo [M], hi [M])."""
    m = txt.shape[0]
    approx = torch.empty(m)
    scale = torch.empty(m)
    for a in range(0, m, 1 << 14):
        b = min(m, a + (1 << 14))
        approx[a:b] = (txt[a:b] * img[t2i[a:b]]).sum(1)
        scale[a:b] = txt_norm[a:b] * img_norm[t2i[a:b]]
    w = window * scale
    thr = approx - tie_t if ties == "pessimistic" else approx + tie_t
    return approx, w, thr - w, thr + w


def _summary(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    r = ranks.numpy()
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(r))
    out[f"{prefix}_median_rank"] = float(np.median(r))
    return out


def retrieval_metrics(img_emb, txt_emb, txt_to_img, ks: Sequence[int] = (1, 5, 10), chunk: int | None = None,
                      weights=None, k_segments: int | None = None, ties: str = "pessimistic",
                      tie_tol: float = 1e-5) -> dict[str, float]:
    """Recall@k (percent), mean and median rank in both directions, plus rsum.

    img_emb [N, D], txt_emb [M, D] (float, normally L2-normalised); txt_to_img [M] int: the image of each caption
    (every image needs >= 1 caption). weights [K]: aspect re-weighting over K equal segments (None = plain).
    chunk: image rows per chunk (None = auto, ~128 MB of buffers). ties, tie_tol: the tie rule (module doc).
    Keys: i2t_R@k, t2i_R@k, {i2t,t2i}_mean_rank, {i2t,t2i}_median_rank, rsum.
    """
    _check_ties(ties)
    _check_tie_tol(tie_tol)
    img, txt = _as_emb(img_emb, "img_emb"), _as_emb(txt_emb, "txt_emb")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"img_emb dim {img.shape[1]} != txt_emb dim {txt.shape[1]} (image and text towers disagree)")
    t2i = torch.as_tensor(txt_to_img)
    if t2i.ndim != 1 or t2i.shape[0] != txt.shape[0] or t2i.is_floating_point():
        raise ValueError(f"txt_to_img: expected an integer tensor [{txt.shape[0]}] (one image index per caption), "
                         f"got shape {tuple(t2i.shape)} dtype {t2i.dtype}")
    t2i = t2i.to(torch.int64)
    n = img.shape[0]
    if int(t2i.min()) < 0 or int(t2i.max()) >= n:
        raise ValueError(f"txt_to_img: indices must be in [0, {n}), got range [{int(t2i.min())}, {int(t2i.max())}]")
    no_caption = (torch.bincount(t2i, minlength=n) == 0).nonzero().squeeze(1)
    if no_caption.numel():
        raise ValueError(f"txt_to_img: {no_caption.numel()} image(s) have no caption, e.g. index "
                         f"{no_caption[:5].tolist()}; drop them before evaluating")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks: expected integers >= 1, got {list(ks)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk: expected >= 1 rows (or None for auto), got {chunk}")
    w = aspect_scale(img.shape[1], weights, k_segments)
    if w is not None:
        img = img * w  # sum_k w_k <t_k, v_k> == <t, v * w_rep>
    i2t, t2i_rank = retrieval_ranks(img, txt, t2i, chunk, ties, tie_tol)
    out = {**_summary(i2t, ks, "i2t"), **_summary(t2i_rank, ks, "t2i")}
    out["rsum"] = float(sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks))
    return out


# --------------------------------------------------------------------------------------------------- zero-shot
def class_embeddings(class_text_emb) -> torch.Tensor:
    """[C, T, D] per-template text embeddings -> [C, D] class embeddings, CLIP style: normalise each template
    embedding, average over templates, renormalise."""
    e = torch.as_tensor(class_text_emb)
    if e.ndim != 3 or not e.is_floating_point():
        raise ValueError(f"class_text_emb: expected a float tensor [C, T, D] (classes, templates, dim), got "
                         f"shape {tuple(e.shape)}")
    e = torch.nn.functional.normalize(e.to(torch.float32), dim=-1).mean(1)
    return torch.nn.functional.normalize(e, dim=-1)


def zero_shot_classify(img_emb, class_text_emb, labels, ks: Sequence[int] = (1, 5), weights=None,
                       k_segments: int | None = None, ties: str = "pessimistic", tie_tol: float = 1e-5,
                       chunk: int = 4096) -> dict[str, float]:
    """Top-k accuracy (percent) of img_emb [N, D] against class_text_emb [C, T, D] (T prompt templates per class).

    labels [N] int in [0, C). The true class's rank follows the same tie rule as retrieval (pessimistic: a tie with
    another class is a miss; tie_tol as there). weights: aspect re-weighting as in `retrieval_metrics`.
    Keys: top1, top5, ...
    """
    _check_ties(ties)
    _check_tie_tol(tie_tol)
    img = _as_emb(img_emb, "img_emb")
    cls = class_embeddings(class_text_emb)
    if not bool(torch.isfinite(cls).all()):
        raise ValueError("class_text_emb: contains NaN or inf")
    if cls.shape[1] != img.shape[1]:
        raise ValueError(f"class_text_emb dim {cls.shape[1]} != img_emb dim {img.shape[1]}")
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.shape[0] != img.shape[0] or y.is_floating_point():
        raise ValueError(f"labels: expected an integer tensor [{img.shape[0]}], got shape {tuple(y.shape)}")
    y = y.to(torch.int64)
    c = cls.shape[0]
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise ValueError(f"labels: must be in [0, {c}) (one per class of class_text_emb), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    w = aspect_scale(img.shape[1], weights, k_segments)
    if w is not None:
        img = img * w
    tie = (tie_tol * img.norm(dim=1) * cls.norm(dim=1).max())[:, None]
    self_count = 1 if ties == "pessimistic" else 0  # the true class meets its own pessimistic threshold
    ranks = torch.empty(img.shape[0], dtype=torch.int64)
    for a in range(0, img.shape[0], chunk):
        b = min(img.shape[0], a + chunk)
        s = img[a:b] @ cls.T
        true = s.gather(1, y[a:b, None])
        ranks[a:b] = 1 + _beats(s, true, tie[a:b], ties).sum(1) - self_count
    r = ranks.numpy()
    return {f"top{k}": float(100.0 * np.mean(r <= k)) for k in ks}


def zero_shot_predict(img_emb, class_text_emb, weights=None, k_segments: int | None = None) -> torch.Tensor:
    """Top-1 class [N] (int64) of img_emb [N, D] against class_text_emb [C, T, D] (class_embeddings; the first
    class on an exact tie), e.g. to ask what the wrong predictions are."""
    img = _as_emb(img_emb, "img_emb")
    cls = class_embeddings(class_text_emb)
    w = aspect_scale(img.shape[1], weights, k_segments)
    return ((img * w if w is not None else img) @ cls.T).argmax(1)


# ------------------------------------------------------------------------------------------------------ records
def eval_record(metrics: dict[str, float], *, dataset: str, split: str, caption_policy: str, checkpoint: str,
                params_hash: str, weights=None, ties: str = "pessimistic", tie_tol: float = 1e-5,
                **extra) -> dict:
    """The JSON written per evaluation: what was measured on what, and how (metrics stay a flat name -> float map,
    rounded to 6 decimals: 103 / 500 * 100 is written 20.6, not 20.599999999999998)."""
    return {"dataset": dataset, "split": split, "caption_policy": caption_policy, "checkpoint": str(checkpoint),
            "params_hash": params_hash, "aspect_weights": None if weights is None else [float(x) for x in weights],
            "ties": ties, "tie_tol": tie_tol, **extra,
            "metrics": {k: round(float(v), METRIC_DECIMALS) for k, v in metrics.items()}}
