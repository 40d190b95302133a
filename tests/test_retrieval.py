"""Retrieval/zero-shot metrics: the chunked single-pass implementation against a dense, loop-by-loop reference.

The reference below is written independently and as plainly as possible (one query at a time, over the full score
matrix) with the same documented tie rules; the fast path is checked against it on random data, on exact-arithmetic
data full of ties, over many chunk sizes and with the t2i window forced fully on and fully off.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from campe.core.config import ConfigError, from_dict
from campe.core.threads import torch_threads
from campe.core.retrieval import (RetrievalParams, class_embeddings, eval_record, retrieval_metrics, retrieval_ranks,
                                  segment_similarity, zero_shot_classify)


# ------------------------------------------------------------------------------------------------ dense reference
def dense_ranks(scores: torch.Tensor, txt_to_img: list[int], ties: str, img=None, txt=None,
                tie_tol: float = 1e-5) -> tuple[list[int], list[int]]:
    """Ranks from a full [N, M] score matrix. pessimistic: 1 + #negatives >= positive - tie; optimistic:
    1 + #negatives > positive + tie, where tie = tie_tol * |query| * max|gallery| (0 when img/txt are not given)."""
    n, m = scores.shape
    s = scores.tolist()
    if img is None:
        tie_i, tie_t = [0.0] * n, [0.0] * m
    else:
        ni, nt = img.double().norm(dim=1).tolist(), txt.double().norm(dim=1).tolist()
        tie_i = [tie_tol * x * max(nt) for x in ni]
        tie_t = [tie_tol * x * max(ni) for x in nt]

    def beats(a, b, tie):
        return a >= b - tie if ties == "pessimistic" else a > b + tie

    i2t = []
    for i in range(n):
        pos = [j for j in range(m) if txt_to_img[j] == i]
        best = max(s[i][j] for j in pos)
        i2t.append(1 + sum(1 for j in range(m) if txt_to_img[j] != i and beats(s[i][j], best, tie_i[i])))
    t2i = []
    for j in range(m):
        p = s[txt_to_img[j]][j]
        t2i.append(1 + sum(1 for i in range(n) if i != txt_to_img[j] and beats(s[i][j], p, tie_t[j])))
    return i2t, t2i


def dense_metrics(scores, txt_to_img, ks=(1, 5, 10), ties="pessimistic", img=None, txt=None) -> dict[str, float]:
    i2t, t2i = dense_ranks(scores, txt_to_img, ties, img, txt)
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * sum(x <= k for x in r) / len(r)
        out[f"{name}_mean_rank"] = statistics.fmean(r)
        out[f"{name}_median_rank"] = float(statistics.median(r))
    out["rsum"] = sum(v for key, v in out.items() if "_R@" in key)
    return out


def assert_metrics_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


def random_set(n: int, caps: list[int], d: int, seed: int):
    """Unit-norm random embeddings; image i has caps[i] captions, captions interleaved (not grouped by image)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    t2i = torch.tensor([i for i in range(n) for _ in range(caps[i])])
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    # captions near their image, so ranks spread over 1..N instead of all being random
    txt = torch.nn.functional.normalize(img[t2i] + 1.2 * torch.randn(len(t2i), d, generator=g), dim=1)
    return img, txt, t2i


def tie_set(seed: int):
    """Exact-arithmetic embeddings (multiples of 1/4, D=6): every dot product is exact in float32 whatever the
    summation order, so ties are real ties for both implementations. Duplicate images and captions on purpose."""
    g = torch.Generator().manual_seed(seed)
    n = 13
    img = torch.randint(-2, 3, (n, 6), generator=g).float() / 4
    img[4] = img[1]                      # two identical images
    img[7] = 0                           # an all-zero image ties with everything at score 0
    caps = [1 + int(c) for c in torch.randint(0, 4, (n,), generator=g)]
    t2i = torch.tensor([i for i in range(n) for _ in range(caps[i])])
    txt = torch.randint(-2, 3, (len(t2i), 6), generator=g).float() / 4
    txt[3] = txt[0]                      # identical captions
    return img, txt, t2i


# ----------------------------------------------------------------------------------------------- rank correctness
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_matches_dense_reference_random(seed):
    n = 23
    caps = [1 + (i * 7 + seed) % 5 for i in range(n)]  # 1..5 captions per image
    img, txt, t2i = random_set(n, caps, d=16, seed=seed)
    ref = dense_metrics(img @ txt.T, t2i.tolist(), img=img, txt=txt)
    ref_ranks = dense_ranks(img @ txt.T, t2i.tolist(), "pessimistic", img, txt)
    for chunk in (1, 2, 5, 7, n - 1, n, 1000, None):
        assert_metrics_equal(retrieval_metrics(img, txt, t2i, chunk=chunk), ref)
    for window in (0.0, 1e9):  # window never / always ambiguous: the slow path and the fast path must agree too
        i2t, t2i_r = retrieval_ranks(img, txt, t2i, chunk=4, window=window)
        assert (i2t.tolist(), t2i_r.tolist()) == ref_ranks


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_matches_dense_reference_with_ties(ties, seed):
    img, txt, t2i = tie_set(seed)
    ref = dense_ranks(img @ txt.T, t2i.tolist(), ties)
    other = dense_ranks(img @ txt.T, t2i.tolist(), "optimistic" if ties == "pessimistic" else "pessimistic")
    assert ref != other, "the data must contain ties that the two rules score differently"
    for chunk in (1, 3, 4, 13, None):
        for window in (0.0, 2.0 ** -22, 1e9):
            for tie_tol in (0.0, 1e-5):  # exact multiples of 1/16 apart: any small tolerance gives the same ranks
                i2t, t2i_r = retrieval_ranks(img, txt, t2i, chunk=chunk, ties=ties, tie_tol=tie_tol, window=window)
                assert (i2t.tolist(), t2i_r.tolist()) == ref, (chunk, window, tie_tol)
    assert_metrics_equal(retrieval_metrics(img, txt, t2i, chunk=5, ties=ties),
                         dense_metrics(img @ txt.T, t2i.tolist(), ties=ties))


def test_hand_checked_tiny_case():
    # Two images, three captions; caption 0 and 1 belong to image 0, caption 2 to image 1. 1-D embeddings, so the
    # scores are products: img = [1, 2], txt = [3, 1, 2]  ->  S = [[3, 1, 2],
    #                                                              [6, 2, 4]]
    # i2t image 0: positives {3, 1}, best 3 > the negative 2 -> rank 1. image 1: positive 4, negatives {6, 2}: one
    #   higher -> rank 2.
    # t2i caption 0 (img 0, score 3): image 1 scores 6 -> rank 2. caption 1 (img 0, score 1): 2 > 1 -> rank 2.
    #   caption 2 (img 1, score 4): image 0 scores 2 -> rank 1.
    img, txt, t2i = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [1.0], [2.0]]), torch.tensor([0, 0, 1])
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2), chunk=1)
    assert m["i2t_R@1"] == 50.0 and m["i2t_R@2"] == 100.0
    assert m["t2i_R@1"] == pytest.approx(100 / 3) and m["t2i_R@2"] == 100.0
    assert m["i2t_mean_rank"] == 1.5 and m["i2t_median_rank"] == 1.5      # median of [1, 2]
    assert m["t2i_mean_rank"] == pytest.approx(5 / 3) and m["t2i_median_rank"] == 2.0
    assert m["rsum"] == pytest.approx(50 + 100 + 100 / 3 + 100)


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    """Run a test under 1 and 2 intra-op threads: the matmul kernel, and so the rounding of each score, can differ."""
    with torch_threads(request.param):
        yield request.param


def tied_by_construction(n: int, caps: list[int], d: int, seed: int):
    """Embeddings whose N x M scores are all equal in exact arithmetic but not as float32 matmul results.

    Image i = [P_i(r), 1 * a], caption j = [1 * b, Q_j(q)] for random vectors r, q and random permutations P_i, Q_j:
    every score is b * sum(r) + a * sum(q), summed in a different order per pair, so the float32 scores differ in
    their last bits (whatever the kernel), while every pair is a tie.
    """
    g = torch.Generator().manual_seed(seed)
    r, q = torch.randn(d, generator=g), torch.randn(d, generator=g)
    a, b = 0.3 + torch.rand(1, generator=g), 0.3 + torch.rand(1, generator=g)
    t2i = torch.tensor([i for i in range(n) for _ in range(caps[i])])
    m = len(t2i)
    img = torch.stack([torch.cat([r[torch.randperm(d, generator=g)], a.expand(d)]) for _ in range(n)])
    txt = torch.stack([torch.cat([b.expand(d), q[torch.randperm(d, generator=g)]]) for _ in range(m)])
    norm = torch.nn.functional.normalize
    return norm(img, dim=1), norm(txt, dim=1), t2i


@pytest.mark.parametrize("d", [4, 64, 192, 256])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_ties_do_not_depend_on_the_kernel_or_thread_count(threads, d, ties):
    n, caps = 9, [1, 2, 3, 1, 1, 4, 2, 1, 3]
    img, txt, t2i = tied_by_construction(n, caps, d, seed=d)
    m = len(t2i)
    scores = img @ txt.T
    # the instrument: the float scores really are not all equal, so exact equality would not see the ties
    assert scores.unique().numel() > 1
    worst = ([m - c + 1 for c in caps], [n] * m) if ties == "pessimistic" else ([1] * n, [1] * m)
    for chunk in (1, 2, 3, n, None):
        for window in (0.0, 2.0 ** -22, 1e9):
            i2t, t2i_r = retrieval_ranks(img, txt, t2i, chunk=chunk, ties=ties, window=window)
            assert (i2t.tolist(), t2i_r.tolist()) == worst, (chunk, window)
    z = zero_shot_classify(img, txt[:, None, :], torch.arange(n) % m, ks=(1,), ties=ties, chunk=4)
    assert z["top1"] == (0.0 if ties == "pessimistic" else 100.0)


def test_collapsed_embeddings_score_worst_under_pessimistic_ties(threads):
    # All embeddings equal: every score ties. Pessimistic: image i is beaten by all M - P_i negative captions
    # (rank M - P_i + 1), a caption by the N - 1 other images (rank N). Optimistic: everything at rank 1.
    n, caps = 4, [1, 2, 3, 1]
    t2i = torch.tensor([i for i in range(n) for _ in range(caps[i])])
    m = len(t2i)
    for d in (8, 384):
        img, txt = torch.ones(n, d) / d ** 0.5, torch.ones(m, d) / d ** 0.5
        for chunk in (1, 3, None):
            i2t, t2i_r = retrieval_ranks(img, txt, t2i, chunk=chunk)
            assert i2t.tolist() == [m - c + 1 for c in caps] and t2i_r.tolist() == [n] * m, (d, chunk)
        opt = retrieval_metrics(img, txt, t2i, ties="optimistic")
        assert opt["i2t_R@1"] == opt["t2i_R@1"] == 100.0
        assert retrieval_metrics(img, txt, t2i)["t2i_R@1"] == 0.0


def test_tie_tolerance_separates_near_ties_from_real_differences():
    # One image, two captions: the positive scores 1.0; the negative scores 1 - delta. Within the tolerance it
    # ties (pessimistic: lost), beyond it the positive wins; tie_tol=0 is plain float comparison.
    img = torch.tensor([[1.0, 0.0]])
    for delta, tol, rank in ((5e-6, 1e-5, 2), (2e-5, 1e-5, 1), (5e-6, 0.0, 1)):
        txt = torch.tensor([[1.0, 0.0], [1.0 - delta, 0.0]])
        i2t, _ = retrieval_ranks(torch.cat([img, torch.tensor([[0.0, 1.0]])]), txt, torch.tensor([0, 1]),
                                 tie_tol=tol)
        assert i2t[0].item() == rank, (delta, tol)


# ------------------------------------------------------------------------------------------- aspect re-weighting
def test_segment_similarity_all_ones_equals_dot_product():
    img, txt, _ = random_set(9, [2] * 9, d=24, seed=3)
    torch.testing.assert_close(segment_similarity(img, txt, 4, torch.ones(4)), img @ txt.T)
    torch.testing.assert_close(segment_similarity(img, txt, 4), img @ txt.T)
    # per-segment definition: weights that keep only segment 2 give the dot product of the third D/K slice
    only2 = segment_similarity(img, txt, 4, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(only2, img[:, 12:18] @ txt[:, 12:18].T)


def test_weighted_retrieval_matches_dense_reference_and_ones_is_plain():
    img, txt, t2i = random_set(17, [1 + i % 4 for i in range(17)], d=24, seed=4)
    plain = retrieval_metrics(img, txt, t2i, chunk=5)
    assert retrieval_metrics(img, txt, t2i, chunk=5, weights=[1.0, 1.0, 1.0]) == plain  # exactly equal
    w = torch.tensor([2.0, 0.5, 0.0, 1.0])
    weighted = retrieval_metrics(img, txt, t2i, chunk=5, weights=w, k_segments=4)
    assert_metrics_equal(weighted, dense_metrics(segment_similarity(img, txt, 4, w), t2i.tolist(),
                                                 img=img * w.repeat_interleave(6), txt=txt))
    assert weighted != plain


def test_weights_can_flip_a_ranking():
    # D=2, K=2: caption matches image 0 on aspect 1 only, image 1 on aspect 2 only, aspect 2 slightly stronger.
    # plain: scores 0.6 vs 0.8 -> image 1 first. Weights [2, 1]: 1.2 vs 0.8 -> image 0 first.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    t2i = torch.tensor([0, 1])
    assert retrieval_metrics(img, txt, t2i, ks=(1,))["t2i_R@1"] == 50.0
    assert retrieval_metrics(img, txt, t2i, ks=(1,), weights=[2.0, 1.0])["t2i_R@1"] == 100.0


# ---------------------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_matches_reference_and_template_averaging():
    g = torch.Generator().manual_seed(5)
    c, t, d, n = 7, 3, 12, 40
    cls_t = torch.randn(c, t, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    # CLIP style: normalise each template embedding, average, renormalise
    ref_cls = torch.stack([torch.nn.functional.normalize(
        torch.stack([e / e.norm() for e in cls_t[k]]).mean(0), dim=0) for k in range(c)])
    torch.testing.assert_close(class_embeddings(cls_t), ref_cls)
    s = (img @ ref_cls.T).tolist()
    ranks = [1 + sum(1 for k in range(c) if k != y and s[i][k] >= s[i][y]) for i, y in enumerate(labels.tolist())]
    z = zero_shot_classify(img, cls_t, labels, ks=(1, 3, 5), chunk=6)
    for k in (1, 3, 5):
        assert z[f"top{k}"] == pytest.approx(100.0 * sum(r <= k for r in ranks) / n)
    assert zero_shot_classify(img, cls_t, labels, weights=[1.0, 1.0]) == zero_shot_classify(img, cls_t, labels)


def test_zero_shot_ties_and_weights():
    # Image [1, 1]; classes "a" = [1, 0] and "b" = [0, 1] tie at score 1: pessimistic -> the true class is not top-1.
    img = torch.tensor([[1.0, 1.0]])
    cls = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert zero_shot_classify(img, cls, [0], ks=(1,))["top1"] == 0.0
    assert zero_shot_classify(img, cls, [0], ks=(1,), ties="optimistic")["top1"] == 100.0
    # weighting aspect 1 up breaks the tie in favour of class a
    assert zero_shot_classify(img, cls, [0], ks=(1,), weights=[2.0, 1.0])["top1"] == 100.0


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"txt_emb": torch.randn(3, 5)}, "dim"),
    ({"txt_to_img": torch.tensor([0, 1, 2])}, r"\[0, 2\)"),
    ({"txt_to_img": torch.tensor([0, 0, 0])}, "no caption"),
    ({"txt_to_img": torch.tensor([0, 1])}, "txt_to_img"),
    ({"img_emb": torch.tensor([[float("nan")] * 4, [0.0] * 4])}, "NaN"),
    ({"weights": [1.0, 1.0, 1.0]}, "divide"),
    ({"weights": [1.0, -1.0]}, ">= 0"),
    ({"weights": [1.0, 1.0], "k_segments": 4}, "k_segments"),
    ({"ties": "random"}, "ties"),
    ({"chunk": 0}, "chunk"),
    ({"tie_tol": -1e-5}, "tie_tol"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    args = {"img_emb": torch.randn(2, 4), "txt_emb": torch.randn(3, 4), "txt_to_img": torch.tensor([0, 1, 1]),
            **kwargs}
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**args)


def test_params_section_and_record():
    p = from_dict(RetrievalParams, {"ks": [1, 5], "aspect_weights": [1, 2]}, "params.yaml:evaluate")
    assert p.ks == [1, 5] and p.aspect_weights == [1.0, 2.0] and p.ties == "pessimistic"
    with pytest.raises(ConfigError, match="ties"):
        from_dict(RetrievalParams, {"ties": "best"}, "params.yaml:evaluate")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(RetrievalParams, {"chunks": 4}, "params.yaml:evaluate")
    rec = eval_record({"t2i_R@1": 1.0}, dataset="flickr30k", split="test", caption_policy="5-per-image",
                      checkpoint="ckpt.pt", params_hash="abc", weights=[1, 2])
    assert rec["metrics"] == {"t2i_R@1": 1.0} and rec["aspect_weights"] == [1.0, 2.0] and rec["dataset"] == "flickr30k"


def test_fast_path_covers_most_captions_of_a_non_degenerate_model():
    # The window trick must actually avoid the second pass (the benchmark's speed depends on it). Scores sitting
    # right at a caption's tie threshold must fall back: with tie_tol=0 the collapsed model's negatives all sit
    # at the threshold; with the default tolerance they are clearly inside the tie, and the fast path decides.
    img, txt, t2i = random_set(60, [5] * 60, d=32, seed=6)
    stats: dict = {}
    retrieval_ranks(img, txt, t2i, chunk=16, stats=stats)
    assert stats["t2i_recomputed"] < len(t2i) // 4
    ones = torch.ones(4, 8)
    _, ranks = retrieval_ranks(ones, ones, torch.arange(4), chunk=3, tie_tol=0.0, stats=stats)
    assert stats["t2i_recomputed"] == 4 and ranks.tolist() == [4] * 4
    _, ranks = retrieval_ranks(ones, ones, torch.arange(4), chunk=3, stats=stats)
    assert stats["t2i_recomputed"] == 0 and ranks.tolist() == [4] * 4
