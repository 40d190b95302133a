"""The embedded default benchmark: generated scenes whose captions describe several aspects.

    from campe.data.synth import SynthParams, generate
    summary = generate(SynthParams(train_images=100, test_images=20), "data/generated")

The method's premise is that a caption describes several aspects of a scene (the main subject, secondary objects,
their relations, the background/context) and that K prompts can specialise on them. So each image is drawn from a
structured scene (1-3 objects with shape, colour, size and position, and a plain, textured or gradient background)
and each caption is a paraphrase that mentions a *subset* of those aspects. Videos are short clips of objects moving
or changing, captioned with the motion and the attributes.

Everything is written in the formats real datasets use, so the same loaders read both:
  images/<key>.jpg + dataset_karpathy.json      Karpathy split (images[].filename/split/sentences[].raw)
  urls/{train,val,test}.parquet                 URL lists (url, caption, image_id, split, aspects, scene); each url is
                                                relative to the list's folder (../images/<key>.jpg), so the set does
                                                not depend on where it lies (campe download resolves it)
  msrvtt/videos/<video_id>.mp4                  real H.264 mp4 containers (PyAV)
  msrvtt/MSRVTT_data.json                       videos[] + sentences[] (caption, video_id, sen_id)
  msrvtt/MSRVTT_JSFUSION_test.csv               1k-A style test list: one caption per video (key,vid_key,video_id,sentence)
  manifest.json                                 parameters, counts, generator version

The benchmark is a measuring instrument: it is derived from the premise above and must not be tuned to favour any
method. Each item is drawn from its own RNG stream (seed, split, index), so the set is deterministic and a bigger set
extends a smaller one.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from campe.core.io import atomic_dir
from campe.data.synth_scenes import item_rng, make_captions, render_scene, sample_scene
from campe.data.synth_video import make_video_captions, render_clip, sample_clip, write_mp4


GENERATOR_VERSION = "2"  # 2: URLs relative to the list's folder (were absolute file:// URLs)


@dataclass
class SynthParams:
    """Sizes of the generated benchmark (params.yaml section `generate`)."""

    seed: int = 0
    image_size: int = 64
    train_images: int = 3000
    val_images: int = 250
    test_images: int = 500
    train_captions: int = 2  # captions per train/val image, each an image-caption pair in the URL list
    test_captions: int = 5  # Flickr30k/COCO style
    train_videos: int = 300
    test_videos: int = 100
    video_captions: int = 5  # per video; the 1k-A test list uses the first
    video_frames: int = 8
    video_fps: int = 8
    max_objects: int = 3
    jpeg_quality: int = 95

    def validate(self) -> None:
        if self.image_size < 32 or self.image_size % 2:
            raise ValueError(f"image_size must be an even number >= 32, got {self.image_size}")
        for name in ("train_images", "val_images", "test_images", "train_videos", "test_videos"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 1 <= self.test_captions <= 6 or not 1 <= self.train_captions <= 6:
            raise ValueError("train_captions and test_captions must be in 1..6 (distinct paraphrases per scene)")
        if not 1 <= self.video_captions <= 6:
            raise ValueError("video_captions must be in 1..6")
        if not 1 <= self.max_objects <= 3:
            raise ValueError("max_objects must be in 1..3")
        if self.video_frames < 2:
            raise ValueError("video_frames must be >= 2")


# -------------------------------------------------------------------------------------------------------- writing
def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=total == 0 or os.environ.get("CAMPE_NO_PROGRESS") == "1")


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["url", "caption", "image_id", "split", "aspects", "scene"]
    table = pa.table({c: [r[c] for r in rows] for c in cols}, schema=pa.schema([(c, pa.string()) for c in cols]))
    pq.write_table(table, path)


def generate(p: SynthParams, out_dir: str | Path) -> dict[str, Any]:
    """Generate the whole benchmark into `out_dir` atomically (built in a temp dir beside it, then swapped in)."""
    p.validate()
    with atomic_dir(out_dir) as tmp:
        summary = _generate_into(p, tmp)
    return summary


def _generate_into(p: SynthParams, root: Path) -> dict[str, Any]:
    (root / "images").mkdir()
    (root / "urls").mkdir()
    (root / "msrvtt" / "videos").mkdir(parents=True)
    splits, urls = _generate_images(p, root)
    vsplits, n_video_captions = _generate_videos(p, root)
    summary = {
        "generator_version": GENERATOR_VERSION,
        "params": dataclasses.asdict(p),
        "images": {s: n for s, n, _ in splits},
        "image_captions": {s: len(r) for s, r in urls.items()},
        "videos": {s: n for s, n in vsplits},
        "video_captions": n_video_captions,
    }
    (root / "manifest.json").write_text(json.dumps(summary, indent=2))
    return summary


def _generate_images(p: SynthParams, root: Path) -> tuple[list[tuple[str, int, int]], dict[str, list[dict]]]:
    """Images of every split, dataset_karpathy.json and the URL lists; -> ([(split, images, captions each)],
    split -> URL-list rows)."""
    karpathy: list[dict[str, Any]] = []
    urls: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    sentid = 0
    splits = [("train", p.train_images, p.train_captions), ("val", p.val_images, p.train_captions),
              ("test", p.test_images, p.test_captions)]
    with _progress(sum(n for _, n, _ in splits), "generate images") as bar:
        for split, n, n_caps in splits:
            for i in range(n):
                rng = item_rng(p.seed, split, i)
                scene = sample_scene(rng, p.max_objects)
                caps = make_captions(scene, n_caps, rng)
                image_id = f"{split}_{i:06d}"
                filename = f"{image_id}.jpg"
                render_scene(scene, p.image_size).save(root / "images" / filename, quality=p.jpeg_quality)
                sentences = []
                for c in caps:
                    sentences.append({"raw": c["caption"], "tokens": c["caption"].split(), "imgid": len(karpathy),
                                      "sentid": sentid, "aspects": c["aspects"]})
                    sentid += 1
                    # A relative URL (RFC 3986 reference, resolved against the list file's own URL): an absolute
                    # one would put the checkout's path into every hash downstream.
                    urls[split].append({"url": f"../images/{quote(filename)}", "caption": c["caption"],
                                        "image_id": image_id, "split": split, "aspects": json.dumps(c["aspects"]),
                                        "scene": json.dumps(scene)})
                karpathy.append({"filepath": "images", "filename": filename, "imgid": len(karpathy), "split": split,
                                 "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
                                 "scene": scene})
                bar.update()
    (root / "dataset_karpathy.json").write_text(json.dumps({"dataset": "campe-synth", "images": karpathy}))
    for split, rows in urls.items():
        _write_parquet(rows, root / "urls" / f"{split}.parquet")
    return splits, urls


def _generate_videos(p: SynthParams, root: Path) -> tuple[list[tuple[str, int]], int]:
    """Videos (msrvtt/videos), MSRVTT_data.json and the 1k-A-style test list; -> ([(split, videos)], captions)."""
    vid_dir = root / "msrvtt" / "videos"
    videos, sentences_v, test_rows = [], [], []
    vsplits = [("train", p.train_videos), ("test", p.test_videos)]
    with _progress(p.train_videos + p.test_videos, "generate videos") as bar:
        for split, n in vsplits:
            for i in range(n):
                rng = item_rng(p.seed, f"video-{split}", i)
                clip = sample_clip(rng)
                caps = make_video_captions(clip, p.video_captions, rng)
                video_id = f"video{len(videos)}"
                write_mp4(render_clip(clip, p.image_size, p.video_frames), vid_dir / f"{video_id}.mp4", p.video_fps)
                videos.append({"video_id": video_id, "split": split, "category": clip["motion"], "clip": clip})
                for c in caps:
                    sentences_v.append({"caption": c["caption"], "video_id": video_id, "sen_id": len(sentences_v),
                                        "aspects": c["aspects"]})
                if split == "test":
                    test_rows.append({"key": f"ret{len(test_rows)}", "vid_key": f"msr{video_id[5:]}",
                                      "video_id": video_id, "sentence": caps[0]["caption"]})
                bar.update()
    (root / "msrvtt" / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences_v}))
    with open(root / "msrvtt" / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "vid_key", "video_id", "sentence"])
        w.writeheader()
        w.writerows(test_rows)
    return vsplits, len(sentences_v)
