"""Retrieval aspect by aspect (campe.core.aspects) on a constructed example whose answers are known by construction.

Four images, D = 8 in K = 2 segments of 4: image i is (e_i | e_i), so each segment alone identifies every image.
Captions carry the information of their aspect in one segment and a distractor (pointing at another image) in the
other, so which segment retrieves which caption, and where up-weighting helps, can be counted by hand:

    caption  image  aspects                 t = (segment 1 | segment 2)   rank: all  seg1  seg2
    c0       0      subject, position       (e0       | 0.5 e1)                1     1     4
    c1       1      subject, position       (e1       | 0.5 e2)                1     1     4
    c2       2      subject, background     (0.8 e3   | e2)                    1     4     1
    c3       3      subject, background     (1.2 e0   | e3)                    2     4     1
    c4       0      subject                 (e0       | e0)                    1     1     1
    c5       1      background, count       (1.2 e2   | e1)                    2     4     1

(all: c3 scores 1 with its image, 1.2 with image 0; a zero score ties with the other zeros and a tie is lost, so
rank 4 = behind all three negatives.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from campe.core import aspects as asp

ORDER = ("subject", "position", "secondary", "relation", "background", "count", "motion")


def _example():
    e = torch.eye(4)
    img = torch.cat([e, e], 1)
    txt = torch.stack([torch.cat([e[0], 0.5 * e[1]]), torch.cat([e[1], 0.5 * e[2]]), torch.cat([0.8 * e[3], e[2]]),
                       torch.cat([1.2 * e[0], e[3]]), torch.cat([e[0], e[0]]), torch.cat([1.2 * e[2], e[1]])])
    t2i = [0, 1, 2, 3, 0, 1]
    aspects = [["subject", "position"], ["subject", "position"], ["subject", "background"],
               ["subject", "background"], ["subject"], ["background", "count"]]
    return img, txt, t2i, aspects


def test_ranks_of_the_constructed_example_are_the_hand_counted_ones():
    img, txt, t2i, _ = _example()
    assert asp.t2i_ranks(img, txt, t2i).tolist() == [1, 1, 1, 2, 1, 2]
    assert asp.t2i_ranks(img, txt, t2i, [1.0, 0.0], 2).tolist() == [1, 1, 4, 4, 1, 4]
    assert asp.t2i_ranks(img, txt, t2i, [0.0, 1.0], 2).tolist() == [4, 4, 1, 1, 1, 1]


def test_breakdown_by_mix_and_by_aspect_type_hand_computed():
    img, txt, t2i, aspects = _example()
    m = asp.aspect_breakdown(img, txt, t2i, aspects, ks=(1, 2), order=ORDER)
    # mixes: in order of size, then of the aspects; R@1 and R@2 from the "all" ranks 1 1 | 1 2 | 1 | 2
    assert m == pytest.approx({
        "mix/subject/t2i_R@1": 100.0, "mix/subject/t2i_R@2": 100.0,
        "mix/subject-position/t2i_R@1": 100.0, "mix/subject-position/t2i_R@2": 100.0,
        "mix/subject-background/t2i_R@1": 50.0, "mix/subject-background/t2i_R@2": 100.0,
        "mix/background-count/t2i_R@1": 0.0, "mix/background-count/t2i_R@2": 100.0,
        # aspect types overlap: subject = c0..c4 (ranks 1 1 1 2 1), background = c2 c3 c5 (1 2 2)
        "aspect/subject/t2i_R@1": 80.0, "aspect/subject/t2i_R@2": 100.0,
        "aspect/position/t2i_R@1": 100.0, "aspect/position/t2i_R@2": 100.0,
        "aspect/background/t2i_R@1": 100.0 / 3, "aspect/background/t2i_R@2": 100.0,
        "aspect/count/t2i_R@1": 0.0, "aspect/count/t2i_R@2": 100.0})
    assert list(m)[:8:2] == ["mix/subject/t2i_R@1", "mix/subject-position/t2i_R@1",
                             "mix/subject-background/t2i_R@1", "mix/background-count/t2i_R@1"]
    assert asp.aspect_counts(aspects, ORDER) == {
        "mix": {"subject": 1, "subject-position": 2, "subject-background": 2, "background-count": 1},
        "aspect": {"subject": 5, "position": 2, "background": 3, "count": 1}}


def test_specialisation_matrix_hand_computed_and_specialists():
    img, txt, t2i, aspects = _example()
    spec = asp.specialisation(img, txt, t2i, aspects, k=2, order=ORDER)
    assert spec["rows"] == ["APT-1", "APT-2", "all"]
    assert spec["aspects"] == ["subject", "position", "background", "count"]
    # segment 1 alone: c0 c1 c4 found, c2 c3 c5 at rank 4; segment 2 alone: the reverse except c4 (found by both)
    assert np.allclose(spec["t2i_R@1"], [[60, 100, 0, 0], [60, 0, 100, 100], [80, 100, 100 / 3, 0]])
    assert np.allclose(spec["t2i_R@5"], 100.0)  # 4 images: every rank <= 5
    # score R@1 + R@5 minus the row mean: segment 1 [160 200 100 100] - 140, segment 2 [160 100 200 200] - 165
    assert np.allclose(asp.specialisation_scores(spec), [[20, 60, -40, -40], [-5, -65, 35, 35]])
    assert asp.specialists(spec) == {"subject": 0, "position": 0, "background": 1, "count": 1}
    flat = asp.specialisation_metrics(spec)
    assert flat["seg1/aspect/position/t2i_R@1"] == 100.0 and flat["seg2/aspect/position/t2i_R@1"] == 0.0
    assert not any(k.startswith("seg3") for k in flat)
    with pytest.raises(ValueError, match="K >= 2"):
        asp.specialisation(img, txt, t2i, aspects, k=1)


def test_reweighting_is_chosen_on_val_and_measured_on_test():
    img, txt, t2i, aspects = _example()
    plan = asp.choose_reweighting(img, txt, t2i, aspects, k=2, grid=(1.5, 2.0), order=ORDER)
    # background / count: up-weighting segment 2 by 1.5 lifts c3 and c5 (1.5 > 1.2); the first weight that helps
    assert (plan["background"]["segment"], plan["background"]["weight"]) == (1, 1.5)
    assert plan["background"]["weights"] == [1.0, 1.5]
    assert (plan["count"]["segment"], plan["count"]["weight"]) == (1, 1.5)
    # position: already found at weight 1 (kept on a tie); subject: up-weighting segment 1 only hurts (c2, c3)
    assert (plan["position"]["segment"], plan["position"]["weight"]) == (0, 1.0)
    assert (plan["subject"]["segment"], plan["subject"]["weight"]) == (0, 1.0)
    assert plan["background"]["val_score"] == pytest.approx(200.0)
    assert plan["background"]["val_score_plain"] == pytest.approx(100 / 3 + 100)

    # "test": the same captions without c4, so the other captions of background are c0 c1 (found either way)
    keep = [0, 1, 2, 3, 5]
    m = asp.reweighting_effect(img, txt[keep], [t2i[j] for j in keep], [aspects[j] for j in keep], plan, k=2,
                               ks=(1,), order=ORDER)
    assert m["reweight/background/t2i_R@1"] == pytest.approx(100.0)
    assert m["reweight/background/delta_t2i_R@1"] == pytest.approx(100.0 - 100 / 3)
    assert m["reweight/background/others_delta_t2i_R@1"] == pytest.approx(0.0)
    assert m["reweight/position/delta_t2i_R@1"] == 0.0
    # count (c5) is lifted; the others then also gain c3 (c2 was found already): 3/4 -> 4/4
    assert m["reweight/count/delta_t2i_R@1"] == pytest.approx(100.0)
    assert m["reweight/count/others_delta_t2i_R@1"] == pytest.approx(25.0)


def test_weighted_segment_ranks_equal_the_per_segment_definition():
    """t2i_ranks' scaling trick against sum_k w_k <v_k, t_k> written out, on random embeddings (no ties)."""
    from campe.core.retrieval import segment_similarity

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 12, generator=g), torch.randn(15, 12, generator=g)
    t2i = torch.arange(15) % 7
    w = [0.5, 2.0, 1.0]
    s = segment_similarity(img, txt, 3, w).T  # [M, N]
    pos = s.gather(1, t2i[:, None])
    ref = 1 + (s > pos).sum(1)
    assert asp.t2i_ranks(img, txt, t2i, w, 3).tolist() == ref.tolist()


def test_bad_inputs_name_the_problem():
    img, txt, t2i, aspects = _example()
    with pytest.raises(ValueError, match="5 entries for 6 captions"):
        asp.aspect_breakdown(img, txt, t2i, aspects[:5])
    with pytest.raises(ValueError, match="at least one aspect"):
        asp.aspect_breakdown(img, txt, t2i, aspects[:5] + [[]])


def test_aspect_pictures_are_written_and_refuse_mismatched_labels(tmp_path):
    from PIL import Image

    from campe.plots import grouped_bars, heatmaps

    img, txt, t2i, aspects = _example()
    spec = asp.specialisation(img, txt, t2i, aspects, k=2, order=ORDER)
    out = heatmaps({"R@1": (spec["t2i_R@1"], spec["rows"], spec["aspects"]),
                    "centred": (asp.specialisation_scores(spec), spec["rows"][:-1], spec["aspects"])},
                   tmp_path / "heat.png", title="constructed")
    bars = grouped_bars({"R@1 by mix": {"a": {"subject": [50.0, 60.0], "subject-position": [10.0]},
                                        "b": {"subject": [40.0]}}}, tmp_path / "bars.png")
    for png in (out, bars):
        with Image.open(png) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    with pytest.raises(ValueError, match="labels say"):
        heatmaps({"x": (spec["t2i_R@1"], spec["rows"][:2], spec["aspects"])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        grouped_bars({"empty": {}}, tmp_path / "none.png")
