"""Evaluation data loaders, frame sampling, zero-shot folders and figures, on the tiny generated benchmark and on
broken copies of it (missing files, wrong formats, damaged mp4s)."""
from __future__ import annotations

import csv
import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from campe.core.config import ConfigError, from_dict
from campe.data.evaldata import (ZERO_SHOT_TEMPLATES, AnnotationFormatError, EvalDataParams, MissingFilesError,
                                 VideoDecodeError, class_folder, class_prompts, frame_indices, grammar_prompts,
                                 load_karpathy, load_msrvtt, load_scenes, make_zero_shot_folders, sample_frames,
                                 zero_shot_prompts)
from campe.core.retrieval import retrieval_metrics
from campe.data.synth_scenes import ASPECTS, COLOURS, PREFIXES, SHAPES, SIZES, item_rng, make_captions, sample_scene


@pytest.fixture()
def broken(tiny_generated, tmp_path):
    """A private, writable copy of the tiny benchmark to damage."""
    _, root = tiny_generated
    dst = tmp_path / "gen"
    shutil.copytree(root, dst)
    return dst


def karpathy_json(root):
    return json.loads((root / "dataset_karpathy.json").read_text())


# ------------------------------------------------------------------------------------------------------ Karpathy
def test_karpathy_round_trip(tiny_generated):
    p, root = tiny_generated
    ds = load_karpathy(root / "dataset_karpathy.json")
    assert len(ds.image_paths) == p.test_images and len(ds.captions) == p.test_images * p.test_captions
    assert ds.skipped == 0 and len(ds.image_ids) == p.test_images
    # every caption maps back to the JSON sentence list of its own image, in order
    by_file = {im["filename"]: [s["raw"] for s in im["sentences"]] for im in karpathy_json(root)["images"]}
    for path, image_id in zip(ds.image_paths, ds.image_ids):
        assert (root / "images" / f"{image_id}.jpg").samefile(path)
    for i, path in enumerate(ds.image_paths):
        mine = [c for c, t in zip(ds.captions, ds.txt_to_img) if t == i]
        assert mine == by_file[path.rsplit("/", 1)[-1]][:5]
    two = load_karpathy(root / "dataset_karpathy.json", max_captions=2)
    assert len(two.captions) == 2 * p.test_images
    assert len(load_karpathy(root / "dataset_karpathy.json", split="val").image_paths) == p.val_images


def test_karpathy_carries_each_captions_aspects_in_the_generators_order(tiny_generated, broken):
    _, root = tiny_generated
    ds = load_karpathy(root / "dataset_karpathy.json")
    by_caption = {s["raw"]: s["aspects"] for im in karpathy_json(root)["images"] for s in im["sentences"]}
    assert len(ds.aspects) == len(ds.captions)
    for caption, aspects in zip(ds.captions, ds.aspects):
        assert sorted(aspects) == sorted(by_caption[caption])  # the same aspects, in ASPECTS order
        assert aspects == sorted(aspects, key=ASPECTS.index)
    # dropping an image drops its captions' aspects with them
    less = ds.without([0])
    assert less.aspects == [a for a, t in zip(ds.aspects, ds.txt_to_img) if t != 0]
    # an annotation without aspects (Flickr30k, COCO): none; a malformed one: a clear error
    data = karpathy_json(broken)
    for im in data["images"]:
        for s in im["sentences"]:
            del s["aspects"]
    (broken / "dataset_karpathy.json").write_text(json.dumps(data))
    assert load_karpathy(broken / "dataset_karpathy.json").aspects == []
    data["images"][-1]["sentences"] = [dict(s, aspects="subject") for s in data["images"][-1]["sentences"]]
    for im in data["images"]:
        for s in im["sentences"]:
            s.setdefault("aspects", ["subject"])
    (broken / "dataset_karpathy.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationFormatError, match="'aspects' 'subject'; expected a non-empty list"):
        load_karpathy(broken / "dataset_karpathy.json")


def test_oracle_embeddings_score_perfect_and_shuffled_do_not(tiny_generated):
    # Loader -> metrics wiring: embeddings that encode the right image identity give R@1 = 100 both ways.
    _, root = tiny_generated
    ds = load_karpathy(root / "dataset_karpathy.json")
    n = len(ds.image_paths)
    img = torch.eye(n)
    txt = torch.eye(n)[ds.txt_to_img]
    m = retrieval_metrics(img, txt, ds.txt_to_img)
    assert m["i2t_R@1"] == m["t2i_R@1"] == 100.0 and m["t2i_mean_rank"] == 1.0
    shuffled = retrieval_metrics(img, txt, [(t + 1) % n for t in ds.txt_to_img])
    assert shuffled["t2i_R@1"] == 0.0


def test_karpathy_missing_image_error_and_skip(broken):
    gone = broken / "images" / "test_000002.jpg"
    gone.unlink()
    with pytest.raises(MissingFilesError, match="on_missing='skip'") as e:
        load_karpathy(broken / "dataset_karpathy.json")
    assert str(gone) in str(e.value) and "1 of 6" in str(e.value) and e.value.missing == [str(gone)]
    ds = load_karpathy(broken / "dataset_karpathy.json", on_missing="skip")
    assert ds.skipped == 1 and len(ds.image_paths) == 5 and "test_000002" not in ds.image_ids
    assert len(ds.captions) == 25 and sorted(set(ds.txt_to_img)) == list(range(5))
    gone_caps = next(im for im in karpathy_json(broken)["images"] if im["filename"] == gone.name)["sentences"]
    assert not {s["raw"] for s in gone_caps} & set(ds.captions)
    with pytest.raises(MissingFilesError, match="image_root"):
        load_karpathy(broken / "dataset_karpathy.json", image_root=broken / "nowhere")


def test_karpathy_wrong_format(broken):
    data = karpathy_json(broken)
    del data["images"][3]["sentences"]
    bad = broken / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(AnnotationFormatError, match=r"bad\.json.*images\[3\] has no 'sentences'"):
        load_karpathy(bad)
    with pytest.raises(AnnotationFormatError, match="no top-level 'images'"):
        load_karpathy(broken / "msrvtt" / "MSRVTT_data.json")  # the wrong annotation file
    (broken / "trunc.json").write_text((broken / "dataset_karpathy.json").read_text()[:500])
    with pytest.raises(AnnotationFormatError, match="not valid JSON"):
        load_karpathy(broken / "trunc.json")
    with pytest.raises(ValueError, match=r"no images with split 'testing'.*'test'"):
        load_karpathy(broken / "dataset_karpathy.json", split="testing")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_karpathy(broken / "absent.json")


# ------------------------------------------------------------------------------------------------------- MSR-VTT
def test_msrvtt_policies(tiny_generated):
    p, root = tiny_generated
    mv = root / "msrvtt"
    one = load_msrvtt(mv, policy="1k-A")
    with open(mv / "MSRVTT_JSFUSION_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert one.captions == [r["sentence"] for r in rows] and one.txt_to_video == list(range(p.test_videos))
    assert one.video_ids == [r["video_id"] for r in rows] and all(path.endswith(".mp4") for path in one.video_paths)
    full = load_msrvtt(mv, policy="full")
    data = json.loads((mv / "MSRVTT_data.json").read_text())
    test_ids = [v["video_id"] for v in data["videos"] if v["split"] == "test"]
    assert full.video_ids == test_ids and len(full.captions) == p.test_videos * p.video_captions
    for vi, vid in enumerate(test_ids):
        assert [c for c, t in zip(full.captions, full.txt_to_video) if t == vi] == \
            [s["caption"] for s in data["sentences"] if s["video_id"] == vid]
    # the 1k-A caption of each video is one of its full-policy captions
    assert all(c in full.captions for c in one.captions)
    assert len(load_msrvtt(mv, policy="full", max_captions=2).captions) == 2 * p.test_videos


def test_msrvtt_missing_video_and_bad_annotations(broken):
    mv = broken / "msrvtt"
    first = load_msrvtt(mv).video_paths[0]
    (mv / "videos" / first.rsplit("/", 1)[-1]).unlink()
    with pytest.raises(MissingFilesError, match="on_missing='skip'"):
        load_msrvtt(mv)
    vs = load_msrvtt(mv, policy="full", on_missing="skip")
    assert vs.skipped == 1 and len(vs.video_paths) == 2 and sorted(set(vs.txt_to_video)) == [0, 1]
    (mv / "MSRVTT_JSFUSION_test.csv").write_text("id,text\n1,a cat\n")
    with pytest.raises(AnnotationFormatError, match=r"MSRVTT_JSFUSION_test\.csv.*missing column"):
        load_msrvtt(mv)
    with pytest.raises(AnnotationFormatError, match="videos"):
        load_msrvtt(mv, policy="full", json_path=broken / "dataset_karpathy.json")
    with pytest.raises(ValueError, match="policy"):
        load_msrvtt(mv, policy="7k")


# -------------------------------------------------------------------------------------------------------- frames
def test_frame_indices_hand_checked():
    # centre of each of n equal segments: floor((i + 0.5) * total / n)
    assert frame_indices(8, 4) == [1, 3, 5, 7]            # 1, 3, 5, 7 exactly
    assert frame_indices(10, 3) == [1, 5, 8]              # 1.67, 5.0, 8.33
    assert frame_indices(4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]  # shorter clip: each frame twice, in order
    assert frame_indices(1, 3) == [0, 0, 0]


def test_sample_frames_matches_direct_decode(tiny_generated):
    p, root = tiny_generated
    path = load_msrvtt(root / "msrvtt").video_paths[0]
    with av.open(path) as c:
        every = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert len(every) == p.video_frames
    got = sample_frames(path, p.video_frames)
    assert got.dtype == np.uint8 and got.shape == (p.video_frames, p.image_size, p.image_size, 3)
    np.testing.assert_array_equal(got, every)
    np.testing.assert_array_equal(sample_frames(path, 2), every[[1, 3]])       # frame_indices(4, 2)
    np.testing.assert_array_equal(sample_frames(path, 8), every[frame_indices(4, 8)])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_mp4_is_a_clear_error(broken, damage):
    path = broken / "msrvtt" / "videos" / "video3.mp4"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a video" * 20, "empty": b""}[damage])
    with pytest.raises(VideoDecodeError, match=r"video3\.mp4: cannot decode"):
        sample_frames(path, 4)
    with pytest.raises(FileNotFoundError, match="absent.mp4"):
        sample_frames(broken / "absent.mp4", 4)


# ----------------------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_folders_round_trip(tiny_generated, tmp_path):
    p, root = tiny_generated
    scenes = {im["filename"]: im["scene"]["objects"][0] for im in karpathy_json(root)["images"]
              if im["split"] == "test"}
    folders = make_zero_shot_folders(root, tmp_path / "zs")
    for task, names in (("shape", SHAPES), ("colour", list(COLOURS))):
        paths, labels, classes = class_folder(folders[task])
        assert classes == sorted(names) and len(paths) == p.test_images  # absent classes stay as candidates
        for path, y in zip(paths, labels):
            assert scenes[path.rsplit("/", 1)[-1]][task] == classes[y]
            assert np.array_equal(np.asarray(Image.open(path)),
                                  np.asarray(Image.open(root / "images" / path.rsplit("/", 1)[-1])))
    again = make_zero_shot_folders(root, tmp_path / "zs", copy=True)  # rebuilds its own folder
    assert not any(f.is_symlink() for f in again["shape"].rglob("*.jpg"))
    foreign = tmp_path / "mine" / "shape"
    foreign.mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not made by"):
        make_zero_shot_folders(root, tmp_path / "mine")


def test_zero_shot_bad_inputs(broken, tmp_path):
    data = karpathy_json(broken)
    del data["images"][-1]["scene"]
    (broken / "dataset_karpathy.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationFormatError, match="scene.objects"):
        make_zero_shot_folders(broken, tmp_path / "zs")
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "a" / "x.jpg").symlink_to(tmp_path / "nothing.jpg")
    with pytest.raises(MissingFilesError, match="point nowhere"):
        class_folder(tmp_path / "cls")
    with pytest.raises(AnnotationFormatError, match="no class subfolders"):
        class_folder(tmp_path / "cls" / "a")


def test_class_prompts():
    prompts = class_prompts(["orange", "red", "fire_truck"], ZERO_SHOT_TEMPLATES["colour"][:1] + ["art of the {}."])
    assert prompts == [["a photo of an orange object.", "art of the orange."],
                       ["a photo of a red object.", "art of the red."],
                       ["a photo of a fire truck object.", "art of the fire truck."]]
    with pytest.raises(ValueError, match="slot"):
        class_prompts(["a"], ["no slot here"])


def test_grammar_prompts_are_the_generators_own_subject_captions():
    """Each class's prompts are exactly the captions the generator's subject-only template gives a main subject of
    that class (any size, any value of the other attribute, any prefix), so every class has the same count."""
    for task, classes, other in (("shape", SHAPES, list(COLOURS)), ("colour", list(COLOURS), SHAPES)):
        prompts = grammar_prompts(task, classes)
        assert [len(p) for p in prompts] == [len(SIZES) * len(other) * len(PREFIXES)] * len(classes)
        for name, row in zip(classes, prompts):
            expected = {pre + f"a{'n' if sz[0] in 'aeiou' else ''} {sz} "
                        + (f"{o} {name}" if task == "shape" else f"{name} {o}") for sz in SIZES for o in other
                        for pre in PREFIXES}
            assert set(row) == expected and len(set(row)) == len(row)
        assert zero_shot_prompts(task, classes) == prompts
        assert not any("object" in x or "shape." in x for row in prompts for x in row)
    # against the generator itself: every subject-only caption it writes is a prompt of its subject's classes
    seen = 0
    for i in range(300):
        rng = item_rng(3, "train", i)
        scene = sample_scene(rng)
        for c in make_captions(scene, 6, rng):
            if c["aspects"] == ["subject"]:
                main = scene["objects"][0]
                assert c["caption"] in grammar_prompts("shape", [main["shape"]])[0]
                assert c["caption"] in grammar_prompts("colour", [main["colour"]])[0]
                seen += 1
    assert seen > 100
    assert zero_shot_prompts("colour", ["red"], "templates") == class_prompts(["red"], ZERO_SHOT_TEMPLATES["colour"])
    with pytest.raises(ValueError, match="not shape classes"):
        grammar_prompts("shape", ["dog"])
    with pytest.raises(ValueError, match="prompt set 'clip'"):
        zero_shot_prompts("shape", SHAPES, "clip")


def test_load_scenes_maps_test_files_to_their_scenes(tiny_generated):
    p, root = tiny_generated
    scenes = load_scenes(root, "test")
    assert len(scenes) == p.test_images
    assert all(s["background"]["colours"] and s["objects"] for s in scenes.values())


def test_params_section():
    assert from_dict(EvalDataParams, {"msrvtt_policy": "full"}, "params.yaml:evaluate").msrvtt_policy == "full"
    with pytest.raises(ConfigError, match="on_missing"):
        from_dict(EvalDataParams, {"on_missing": "ignore"}, "params.yaml:evaluate")


# ------------------------------------------------------------------------------------------------------- figures
def test_figures_are_written(tiny_generated, tmp_path):
    from campe.plots import aspect_maps_grid, recall_bars, retrieval_examples_grid

    _, root = tiny_generated
    ds = load_karpathy(root / "dataset_karpathy.json")
    top = [ds.image_paths[:5], ds.image_paths[1:6]]
    flags = [[i == 2 for i in range(5)], [False] * 5]
    out = retrieval_examples_grid(ds.captions[:2], top, flags, tmp_path / "ex.png")
    # The second query missed its image: shown after the top 5 with its rank (one more column).
    with_missed = retrieval_examples_grid(ds.captions[:2], top, flags, tmp_path / "ex2.png",
                                          missed=[None, (ds.image_paths[0], 7)])
    assert Image.open(with_missed).size[0] > Image.open(out).size[0]
    imgs = np.stack([np.asarray(Image.open(q).convert("RGB")) for q in ds.image_paths[:3]])
    maps = torch.rand(3, 4, 4, 4)
    plain = aspect_maps_grid(imgs, maps, ["subject", "position", "secondary", "background"], tmp_path / "m0.png")
    out2 = aspect_maps_grid(imgs, maps, ["subject", "position", "secondary", "background"], tmp_path / "maps.png",
                            caption="what is mapped", scale_label="cosine")
    assert Image.open(out2).size[1] > Image.open(plain).size[1]  # the caption below the grid
    out3 = recall_bars({"plain": {"i2t_R@1": 50.0, "t2i_R@1": 40.0}, "weighted": {"i2t_R@1": 60.0, "t2i_R@1": 30.0}},
                       tmp_path / "bars.png")
    sizes = [Image.open(o).size for o in (out, out2, out3)]
    assert all(w > 200 and h > 100 for w, h in sizes)
    assert sizes[1][0] > sizes[1][1]  # 5 columns x 3 rows
    with pytest.raises(ValueError, match="aspect names"):
        aspect_maps_grid(imgs, maps, ["subject"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="flags"):
        retrieval_examples_grid(ds.captions[:1], [ds.image_paths[:5]], [[True]], tmp_path / "y.png")
