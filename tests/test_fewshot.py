"""The AttriPrompt benchmark's data and frozen CLIP: the few-shot sets (CoOp format, determinism, base/novel novelty,
resume after a kill), the pretraining pairs (disjoint from every few-shot image) and the saved CLIP folder (loads
with transformers' own classes; get_text_features pools the end-of-text token)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from campe.core.config import ConfigError
from campe.data.synth_fewshot import (DATASETS, FewShotParams, classes, classname, fewshot_pixel_hashes,
                                      generate_fewshot, pixel_hash, spec_of)
from campe.data.synth_pretrain import pretrain_item, pretrain_pairs
from campe.pretrain_clip import PretrainClipParams, pretrain_clip, to_pixels

TINY_FS = FewShotParams(seed=5, image_size=32, train_per_class=2, val_per_class=1, test_per_class=2,
                        datasets=["FinePolygons", "Counts", "SynthNet", "SynthNetSketch"])
TINY_CLIP = PretrainClipParams(pairs=64, width=32, vision_layers=1, text_layers=1, heads=2, embed_dim=32,
                               vocab_size=200, epochs=1, batch_size=16, warmup_steps=1, threads=1)


@pytest.fixture(scope="module")
def fewshot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot") / "sets"
    generate_fewshot(TINY_FS, root, progress=False)
    return root


@pytest.fixture(scope="module")
def clip_folder(fewshot_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "clip"
    summary = pretrain_clip(TINY_CLIP, fewshot_root, out)
    return out, summary


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ few-shot sets
def test_same_seed_same_sets_other_seed_differs(fewshot_root, tmp_path):
    again = tmp_path / "again"
    generate_fewshot(TINY_FS, again, progress=False)
    assert _tree(again) == _tree(fewshot_root)
    other = tmp_path / "other"
    generate_fewshot(dataclasses.replace(TINY_FS, seed=6, datasets=["Counts"]), other, progress=False)
    a, b = _tree(fewshot_root / "Counts"), _tree(other / "Counts")
    assert a.keys() == b.keys() and a["split_zhou_Counts.json"] == b["split_zhou_Counts.json"]
    assert all(a[k] != b[k] for k in a if k.endswith(".png"))


def test_split_files_round_trip_in_the_coop_format(fewshot_root):
    """split_zhou_<Name>.json: train/val/test lists of [relpath under images/, label, classname]; every image exists,
    is an RGB image of the set's size, and the labels and names agree with the manifest (as CoOp's read_split)."""
    for name in TINY_FS.datasets:
        folder = fewshot_root / name
        split = json.loads((folder / f"split_zhou_{name}.json").read_text())
        info = json.loads((folder / "fewshot_manifest.json").read_text())
        assert set(split) == {"train", "val", "test"}
        names = info["classnames"]
        assert names == [classname(c) for c in classes(name)] and len(set(names)) == len(names)
        per_class = {"train": TINY_FS.train_per_class, "val": TINY_FS.val_per_class, "test": TINY_FS.test_per_class}
        if DATASETS[name].kind == "dg":
            per_class.update(train=0, val=0)  # a shifted test set, like ImageNet-Sketch
        for sp, rows in split.items():
            assert len(rows) == per_class[sp] * len(names)
            for rel, label, cname in rows:
                assert isinstance(rel, str) and isinstance(label, int) and cname == names[label]
                img = Image.open(folder / "images" / rel)
                assert img.mode == "RGB" and img.size == (TINY_FS.image_size,) * 2
                assert pixel_hash(img) == info["pixel_hashes"][rel]


def test_novel_classes_are_unseen_combinations_of_base_attributes():
    """CoOp's rule (sorted labels; base = first ceil(n/2)): every novel class is a combination absent from the base
    classes, and each of its attribute values appears in some base class."""
    for name, spec in DATASETS.items():
        cls = classes(name)
        n_base = (len(cls) + 1) // 2
        base, novel = cls[:n_base], cls[n_base:]
        assert novel and len(novel) == len(cls) // 2
        base_combos = {tuple(sorted(c.items())) for c in base}
        for c in novel:
            assert tuple(sorted(c.items())) not in base_combos, (name, c)
            for factor, value in c.items():
                assert any(b[factor] == value for b in base), (name, factor, value)
        if spec.variant_of:
            assert cls == classes(spec.variant_of)  # a shifted set keeps its source's classes and labels


def test_images_show_their_class():
    """The scene of a class carries the class's attributes (object 0, the background, or the count)."""
    rng = np.random.default_rng(0)
    from campe.data.synth_fewshot import class_scene
    for name in ("SynthNet", "Textures", "Layouts", "Counts", "Scenes"):
        for attrs in classes(name):
            s = class_scene(rng, spec_of(name).layout, attrs)
            main, bg = s["objects"][0], s["background"]
            for k, v in attrs.items():
                got = {"shape": main["shape"], "colour": main["colour"], "cell": tuple(main["cell"]),
                       "pattern": bg["kind"], "bg_colour": bg["colours"][0], "count": len(s["objects"])}[k]
                if k == "shape" and "count" in attrs:
                    assert {o["shape"] for o in s["objects"]} == {v}
                assert got == (tuple(v) if k == "cell" else v), (name, attrs, k)
            assert all(o["colour"] not in bg["colours"] for o in s["objects"])  # never invisible


def test_killed_run_leaves_whole_sets_and_a_rerun_completes(tmp_path):
    """Kill the generator after its first set is in place: every set folder present is whole, a rerun keeps it
    (same bytes) and makes the rest, and the result equals an uninterrupted run."""
    p = dataclasses.replace(TINY_FS, train_per_class=6, test_per_class=6)
    root = tmp_path / "sets"
    code = ("import sys; from campe.data.synth_fewshot import *; "
            f"generate_fewshot(FewShotParams(**{dataclasses.asdict(p)!r}), sys.argv[1], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)])
    first = root / p.datasets[0] / "fewshot_manifest.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "manifest.json").exists() or proc.returncode == 0
    whole = {d.name: _tree(d) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    assert p.datasets[0] in whole
    for name, tree in whole.items():
        assert f"split_zhou_{name}.json" in tree and "fewshot_manifest.json" in tree
    summary = generate_fewshot(p, root, progress=False)
    assert set(summary["made"]) == set(p.datasets) - set(whole)
    assert not list(root.glob(".*.tmp-*"))
    clean = tmp_path / "clean"
    generate_fewshot(p, clean, progress=False)
    assert _tree(root) == _tree(clean)


def test_changed_params_remake_only_the_sets_they_touch(fewshot_root, tmp_path):
    root = tmp_path / "sets"
    generate_fewshot(dataclasses.replace(TINY_FS, datasets=["Counts"]), root, progress=False)
    s = generate_fewshot(dataclasses.replace(TINY_FS, datasets=["Counts", "FinePolygons"]), root, progress=False)
    assert s["made"] == ["FinePolygons"]
    s = generate_fewshot(dataclasses.replace(TINY_FS, datasets=["Counts"], test_per_class=3), root, progress=False)
    assert s["made"] == ["Counts"] and not (root / "FinePolygons").exists()


def test_bad_fewshot_params_are_refused():
    with pytest.raises(ValueError, match="unknown dataset"):
        FewShotParams(datasets=["Imagenet"]).validate()
    with pytest.raises(ValueError, match="list SynthNet too"):
        FewShotParams(datasets=["SynthNetA"]).validate()


# ---------------------------------------------------------------------------------------------- pretraining data
def test_pretraining_pairs_are_disjoint_from_every_fewshot_image(fewshot_root):
    on_disk = {pixel_hash(Image.open(f)) for f in fewshot_root.glob("*/images/*/*.png")}
    assert on_disk == fewshot_pixel_hashes(fewshot_root)
    images, caps, skipped = pretrain_pairs(0, 300, 32, on_disk)
    assert skipped == 0 and len(caps) == 300
    assert not {pixel_hash(Image.fromarray(a)) for a in images} & on_disk
    # The exclusion itself: an excluded image is skipped and the next item takes its place.
    first = pixel_hash(Image.fromarray(images[0]))
    again, _, skipped = pretrain_pairs(0, 3, 32, {first})
    assert skipped == 1 and np.array_equal(again[0], images[1])


def test_pretraining_captions_name_every_fewshot_class_word():
    words = {w for i in range(3000) for c in pretrain_item(0, i)[2] for w in c.split()}
    for name in DATASETS:
        for c in classes(name):
            assert set(classname(c).split()) <= words, classname(c)


# --------------------------------------------------------------------------------------------------- frozen CLIP
def test_clip_folder_loads_with_transformers_own_classes(clip_folder, fewshot_root):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    out, summary = clip_folder
    model = CLIPModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    proc = CLIPImageProcessor.from_pretrained(out)
    assert model.config.text_config.eos_token_id == tok.eos_token_id != 2
    assert model.config.text_config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert model.config.text_config.bos_token_id == tok.bos_token_id
    # the image processor gives the pixels training used
    path = next((fewshot_root / "Counts" / "images" / "test").iterdir())
    img = Image.open(path).convert("RGB")
    px = proc(images=img, return_tensors="pt")["pixel_values"]
    assert torch.allclose(px, to_pixels(np.asarray(img)[None]), atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["zero_shot"]) == set(TINY_FS.datasets) and metrics["skipped_as_fewshot"] == 0
    assert all(0 <= v["accuracy"] <= 100 for v in metrics["zero_shot"].values())
    assert not list(out.parent.glob(".clip.*"))  # no temp folder left


def test_get_text_features_pools_the_end_of_text_token(clip_folder):
    """transformers' own pooling takes the hidden state at the first <eos>: equal to picking that position by hand,
    and unchanged by extra padding after it (so it is not the last position, nor the argmax id)."""
    from transformers import AutoTokenizer, CLIPModel

    out, _ = clip_folder
    model = CLIPModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["a photo of a red circle.", "two stars", "a large cyan hexagon on a dotted orange background"]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    assert (ids[:, 0] == tok.bos_token_id).all() and ((ids == tok.eos_token_id).sum(1) == 1).all()
    with torch.no_grad():
        feats = model.get_text_features(**enc).pooler_output
        hidden = model.text_model(**enc).last_hidden_state
        eos = (ids == tok.eos_token_id).int().argmax(1)
        by_hand = model.text_projection(hidden[torch.arange(len(texts)), eos])
        longer = tok(texts, padding="max_length", max_length=ids.shape[1] + 5, return_tensors="pt")
        padded = model.get_text_features(**longer).pooler_output
    assert torch.allclose(feats, by_hand, atol=1e-5)
    assert torch.allclose(feats, padded, atol=1e-4)
    assert not torch.allclose(feats[0], feats[1], atol=1e-3)


def test_killed_pretraining_leaves_no_partial_folder(fewshot_root, tmp_path):
    """A kill during training leaves no model folder (nor a temp one the next run trips over); the rerun writes a
    whole one."""
    out = tmp_path / "clip"
    p = dataclasses.replace(TINY_CLIP, pairs=2000, epochs=50, batch_size=16)
    code = ("import sys; from campe.pretrain_clip import *; "
            f"pretrain_clip(PretrainClipParams(**{dataclasses.asdict(p)!r}), sys.argv[1], sys.argv[2])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(fewshot_root), str(out)])
    time.sleep(8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    (tmp_path / ".clip.tmp-stale").mkdir()  # as a kill during saving would leave
    pretrain_clip(TINY_CLIP, fewshot_root, out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "metrics.json"} <= {f.name for f in out.iterdir()}
    assert not list(tmp_path.glob(".clip.*"))


def test_params_check_refuses_mismatched_image_sizes(tmp_path):
    from stages.params import check_params

    f = tmp_path / "params.yaml"
    f.write_text("fewshot_data:\n  image_size: 48\npretrain_clip:\n  image_size: 32\n  patch_size: 8\n")
    with pytest.raises(ConfigError, match="fewshot_data.image_size is 48 but pretrain_clip.image_size is 32"):
        check_params(f)
    assert os.path.exists(f)


def test_pretraining_gives_the_caller_its_thread_count_back(fewshot_root, tmp_path):
    """pretrain_clip runs with its `threads` (1 here) and restores the caller's count: it runs in-process in the
    flows, where a leaked count would change every later stage."""
    import torch
    from campe.core.threads import torch_threads
    with torch_threads(2):
        pretrain_clip(TINY_CLIP, fewshot_root, tmp_path / "clip")
        assert torch.get_num_threads() == 2
