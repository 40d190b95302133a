"""The generated benchmark: determinism, caption/scene consistency, split sizes, file formats."""
from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from campe.data.synth import SynthParams, generate
from campe.data.synth_scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, item_rng, make_captions, sample_scene
from campe.data.synth_video import make_video_captions, sample_clip

WORDS = re.compile(r"[a-z]+")


def _decode_mp4(path):
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_same_seed_same_benchmark_other_seed_differs(tiny_generated, tmp_path):
    p, root = tiny_generated
    again = tmp_path / "again"
    generate(p, again)
    assert (root / "dataset_karpathy.json").read_text() == (again / "dataset_karpathy.json").read_text()
    for f in sorted((root / "images").iterdir()):
        assert f.read_bytes() == (again / "images" / f.name).read_bytes(), f.name
    for f in sorted((root / "msrvtt" / "videos").iterdir()):
        a, b = _decode_mp4(f), _decode_mp4(again / "msrvtt" / "videos" / f.name)
        assert len(a) == len(b) == p.video_frames and all(np.array_equal(x, y) for x, y in zip(a, b))
    other = tmp_path / "other"
    generate(dataclasses.replace(p, seed=p.seed + 1), other)
    assert (root / "dataset_karpathy.json").read_text() != (other / "dataset_karpathy.json").read_text()


def test_split_sizes_and_caption_counts(tiny_generated):
    p, root = tiny_generated
    images = json.loads((root / "dataset_karpathy.json").read_text())["images"]
    by_split = {s: [im for im in images if im["split"] == s] for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [p.train_images, p.val_images, p.test_images]
    assert all(len(im["sentences"]) == p.test_captions for im in by_split["test"])
    assert all(len(im["sentences"]) == p.train_captions for im in by_split["train"] + by_split["val"])
    # Each image's captions are distinct paraphrases.
    assert all(len({s["raw"] for s in im["sentences"]}) == len(im["sentences"]) for im in images)
    for split in ("train", "val", "test"):
        t = pq.read_table(root / "urls" / f"{split}.parquet").to_pylist()
        assert len(t) == sum(len(im["sentences"]) for im in by_split[split])
        assert {"url", "caption", "image_id", "split", "aspects", "scene"} <= set(t[0])


def _check_caption(caption: str, scene: dict, aspects: list[str]) -> None:
    words = set(WORDS.findall(caption))
    objs, bg = scene["objects"], scene["background"]
    assert words & set(COLOURS) <= {o["colour"] for o in objs} | set(bg["colours"]), caption
    assert words & set(SHAPES) <= {o["shape"] for o in objs}, caption
    assert words & set(SIZES) <= {o["size"] for o in objs}, caption
    assert words & set(BACKGROUNDS) <= {bg["kind"]}, caption
    if "subject" in aspects:
        assert objs[0]["shape"] in words and objs[0]["colour"] in words, caption
    if "background" in aspects:
        assert "background" in caption and bg["colours"][0] in words, caption
    if "position" in aspects:
        assert POSITIONS[tuple(objs[0]["cell"])] in caption, caption
    if "secondary" in aspects:
        assert all(o["shape"] in words for o in objs[1:2]), caption
    if "count" in aspects:
        assert ["one", "two", "three"][len(objs) - 1] in words, caption


def test_every_caption_matches_its_drawn_scene(tiny_generated):
    _, root = tiny_generated
    images = json.loads((root / "dataset_karpathy.json").read_text())["images"]
    for im in images:
        for s in im["sentences"]:
            _check_caption(s["raw"], im["scene"], s["aspects"])
    # And on many more scenes than the tiny set holds, all caption templates included.
    for i in range(400):
        rng = item_rng(123, "train", i)
        scene = sample_scene(rng)
        for c in make_captions(scene, 6, rng):
            _check_caption(c["caption"], scene, c["aspects"])


def test_scene_invariants():
    for i in range(300):
        scene = sample_scene(item_rng(5, "test", i))
        objs, bg = scene["objects"], scene["background"]
        cells = [tuple(o["cell"]) for o in objs]
        assert len(set(cells)) == len(cells)
        assert all(o["colour"] not in bg["colours"] for o in objs)  # every object visible on its background
        assert all(o["size"] == "small" for o in objs[1:])
        if objs[0]["size"] == "large" and len(objs) > 1:
            assert all(max(abs(c[0] - cells[0][0]), abs(c[1] - cells[0][1])) >= 2 for c in cells[1:])


def test_video_captions_name_motion_and_attributes():
    verbs = {"move_right": "right", "move_left": "left", "move_up": "up", "move_down": "down", "grow": "larger",
             "shrink": "smaller", "spin": "rotates", "recolour": "colour"}
    for i in range(200):
        rng = item_rng(1, "video-train", i)
        clip = sample_clip(rng)
        for c in make_video_captions(clip, 6, rng):
            words = set(WORDS.findall(c["caption"]))
            assert clip["subject"]["shape"] in words, c
            assert words & set(COLOURS) <= ({clip["subject"]["colour"], clip.get("to_colour")}
                                             | set(clip["background"]["colours"])
                                             | ({clip["still"]["colour"]} if "still" in clip else set())), c
            assert "motion" in c["aspects"]


def test_annotation_files_parse_and_reference_existing_files(tiny_generated):
    p, root = tiny_generated
    kp = json.loads((root / "dataset_karpathy.json").read_text())
    for im in kp["images"]:
        assert (root / im["filepath"] / im["filename"]).is_file()
        assert all(s["raw"] for s in im["sentences"])
    for row in pq.read_table(root / "urls" / "train.parquet").to_pylist():
        assert row["url"].startswith("../images/")  # relative to the list's folder: no checkout path inside
        assert (root / "urls" / row["url"]).is_file()
    msr = json.loads((root / "msrvtt" / "MSRVTT_data.json").read_text())
    ids = {v["video_id"] for v in msr["videos"]}
    assert len(ids) == p.train_videos + p.test_videos
    assert {s["video_id"] for s in msr["sentences"]} == ids
    with open(root / "msrvtt" / "MSRVTT_JSFUSION_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == p.test_videos and {r["video_id"] for r in rows} <= ids
    for r in rows:
        frames = _decode_mp4(root / "msrvtt" / "videos" / f"{r['video_id']}.mp4")
        assert len(frames) == p.video_frames and frames[0].shape == (p.image_size, p.image_size, 3)


def test_generate_replaces_output_atomically_and_validates(tiny_generated, tmp_path):
    p, _ = tiny_generated
    out = tmp_path / "g"
    generate(dataclasses.replace(p, train_images=2, test_images=1, train_videos=0, test_videos=0), out)
    generate(dataclasses.replace(p, train_images=3, test_images=1, train_videos=0, test_videos=0), out)
    assert len(list((out / "images").glob("train_*.jpg"))) == 3  # no stale files from the earlier run
    assert [x.name for x in tmp_path.iterdir()] == ["g"]  # no temp folders left behind
    with pytest.raises(ValueError, match="test_captions"):
        generate(dataclasses.replace(p, test_captions=9), tmp_path / "h")
