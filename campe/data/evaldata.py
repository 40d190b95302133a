"""Evaluation data: annotation loaders, video frame sampling, zero-shot class folders (plain Python, no model code).

    from campe.data.evaldata import load_karpathy, load_msrvtt, sample_frames, class_folder, make_zero_shot_folders
    ds = load_karpathy("data/generated/dataset_karpathy.json")               # generated test split, 5 captions each
    ds = load_karpathy("flickr30k/dataset_flickr30k.json", image_root="flickr30k/flickr30k-images")
    vs = load_msrvtt("data/generated/msrvtt", policy="1k-A")                  # one caption per video (JSFUSION csv)
    vs = load_msrvtt("MSRVTT", policy="full", max_captions=20)                # all test videos, 20 captions each
    frames = sample_frames(vs.video_paths[0], 8)                              # uint8 [8, H, W, 3]
    folders = make_zero_shot_folders("data/generated", "data/zeroshot")       # {"shape": ..., "colour": ...}
    paths, labels, names = class_folder(folders["shape"])
    prompts = zero_shot_prompts("shape", names)                               # [C][T] "a small red circle", ...
    ds.aspects[j]                                  # what caption j mentions (a generated set), e.g. ["subject"]

Loaders return paths + captions + an index map (`txt_to_img[j]` = the image/video of caption j), in file order, so
the caller embeds `image_paths` and `captions` and hands the index map to `campe.core.retrieval.retrieval_metrics`.
Bad input fails early with the file, what is wrong and the fix: an annotation file in the wrong format
(`AnnotationFormatError`), images/videos it references that are missing (`MissingFilesError`, listing up to 5;
`on_missing="skip"` drops them with their captions and counts them in `.skipped`), an unreadable mp4
(`VideoDecodeError`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ON_MISSING = ("error", "skip")
MSRVTT_POLICIES = ("1k-A", "full")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
KARPATHY_KEYS = "images[].filename, images[].split, images[].sentences[].raw (optional images[].filepath)"

# Default prompt templates per zero-shot task. "imagenet" is CLIP's 7-template ensemble (verbatim, typo included).
ZERO_SHOT_TEMPLATES: dict[str, list[str]] = {
    "shape": ["a photo of a {}.", "an image of a {}.", "a {} shape.", "a picture showing a {}."],
    "colour": ["a photo of a {} object.", "an image of a {} shape.", "a {} object.", "a picture showing a {} shape."],
    "imagenet": ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."],
}


class AnnotationFormatError(ValueError):
    """An annotation file that is not in the expected format."""


class MissingFilesError(FileNotFoundError):
    """Media files referenced by an annotation file that do not exist; `.missing` lists them all."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


class VideoDecodeError(ValueError):
    """An mp4 that PyAV cannot open or decode."""


@dataclass
class EvalDataParams:
    """Loader settings (suggested params.yaml section `evaluate`, data part)."""

    karpathy_split: str = "test"
    max_captions: int = 5  # per image (Flickr30k/COCO standard: the first 5)
    on_missing: str = "error"  # or "skip": drop missing images/videos and count them
    msrvtt_policy: str = "1k-A"  # or "full": every test video with up to msrvtt_max_captions captions
    msrvtt_max_captions: int = 20
    video_frames: int = 8

    def validate(self) -> None:
        if self.on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}, got {self.on_missing!r}")
        if self.msrvtt_policy not in MSRVTT_POLICIES:
            raise ValueError(f"msrvtt_policy must be one of {MSRVTT_POLICIES}, got {self.msrvtt_policy!r}")
        if min(self.max_captions, self.msrvtt_max_captions, self.video_frames) < 1:
            raise ValueError("max_captions, msrvtt_max_captions and video_frames must be >= 1")


def _drop_items(drop: Sequence[int], items: Sequence[list], captions: list[str], txt_to_item: list[int]
                ) -> tuple[list[list], list[str], list[int]]:
    """Leave out the items (images/videos; parallel lists) at indices `drop` and their captions; re-index the
    rest."""
    drop = set(drop)
    new_index: dict[int, int] = {}
    for i in range(len(items[0])):
        if i not in drop:
            new_index[i] = len(new_index)
    kept = [[x for i, x in enumerate(seq) if i in new_index] for seq in items]
    pairs = [(c, new_index[t]) for c, t in zip(captions, txt_to_item) if t in new_index]
    return kept, [c for c, _ in pairs], [t for _, t in pairs]


@dataclass
class ImageTextSet:
    """Images with their captions: caption j belongs to image txt_to_img[j]."""

    image_paths: list[str]
    captions: list[str]
    txt_to_img: list[int]
    image_ids: list[str]
    skipped: int = 0  # images dropped because their file was missing (on_missing="skip")
    # aspects[j]: what caption j mentions (sentences[].aspects of a generated set, in the generator's order
    # campe.data.synth_scenes.ASPECTS); empty when the annotation file does not say
    aspects: list[list[str]] = field(default_factory=list)

    def without(self, drop: Sequence[int]) -> ImageTextSet:
        """The set without the images at indices `drop` (e.g. undecodable ones) and their captions."""
        (paths, ids), captions, index = _drop_items(drop, (self.image_paths, self.image_ids), self.captions,
                                                    self.txt_to_img)
        gone = set(drop)
        aspects = [a for a, t in zip(self.aspects, self.txt_to_img) if t not in gone]
        return dataclasses.replace(self, image_paths=paths, captions=captions, txt_to_img=index, image_ids=ids,
                                   aspects=aspects)


@dataclass
class VideoTextSet:
    """Videos with their captions: caption j belongs to video txt_to_video[j]."""

    video_paths: list[str]
    captions: list[str]
    txt_to_video: list[int]
    video_ids: list[str]
    skipped: int = 0
    policy: str = "1k-A"
    extra: dict[str, Any] = field(default_factory=dict)

    def without(self, drop: Sequence[int]) -> VideoTextSet:
        """The set without the videos at indices `drop` (e.g. undecodable ones) and their captions."""
        (paths, ids), captions, index = _drop_items(drop, (self.video_paths, self.video_ids), self.captions,
                                                    self.txt_to_video)
        return dataclasses.replace(self, video_paths=paths, captions=captions, txt_to_video=index, video_ids=ids)


# --------------------------------------------------------------------------------------------------------- helpers
def _check_on_missing(on_missing: str) -> None:
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing: expected one of {ON_MISSING}, got {on_missing!r}")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationFormatError(f"{path}: not valid JSON ({e}); expected {what}") from None


def _missing_error(ann: Path, kind: str, missing: list[str], total: int, root: Path, arg: str) -> MissingFilesError:
    shown = "\n  ".join(missing[:5]) + ("\n  ..." if len(missing) > 5 else "")
    return MissingFilesError(
        f"{ann}: {len(missing)} of {total} {kind} it references are missing under {root}, e.g.:\n  {shown}\n"
        f"Point {arg} at the folder that holds them, or pass on_missing='skip' to evaluate on the ones that exist "
        f"(the number skipped is reported).", missing)


def _filter_missing(paths: list[str], on_missing: str, ann: Path, kind: str, root: Path, arg: str) -> list[bool]:
    exists = [os.path.isfile(p) for p in paths]
    missing = [p for p, e in zip(paths, exists) if not e]
    if missing and on_missing == "error":
        raise _missing_error(ann, kind, missing, len(paths), root, arg)
    return exists


# -------------------------------------------------------------------------------------------------- Karpathy JSON
def load_karpathy(json_path: str | Path, split: str = "test", image_root: str | Path | None = None,
                  max_captions: int = 5, on_missing: str = "error") -> ImageTextSet:
    """Read a Karpathy-split JSON (Flickr30k, COCO, the generated set): images of `split`, first `max_captions`
    captions each. Image path = image_root / [filepath /] filename; image_root defaults to the JSON's folder."""
    _check_on_missing(on_missing)
    if max_captions < 1:
        raise ValueError(f"max_captions: expected >= 1, got {max_captions}")
    path = Path(json_path)
    data = _read_json(path, f"a Karpathy-split annotation file ({KARPATHY_KEYS})")
    root = Path(image_root) if image_root is not None else path.parent

    def bad(msg: str) -> AnnotationFormatError:
        return AnnotationFormatError(f"{path}: not a Karpathy-split annotation file: {msg} (expected {KARPATHY_KEYS})")

    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        keys = list(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise bad(f"no top-level 'images' list (found {keys})")
    images, splits = [], set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise bad(f"images[{i}] is not an object")
        for key in ("filename", "split", "sentences"):
            if key not in im:
                raise bad(f"images[{i}] has no '{key}' key")
        splits.add(im["split"])
        if im["split"] != split:
            continue
        sents = im["sentences"]
        if not isinstance(sents, list) or not sents:
            raise bad(f"images[{i}] ({im['filename']}) has no sentences")
        for s_i, s in enumerate(sents[:max_captions]):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                raise bad(f"images[{i}].sentences[{s_i}] has no 'raw' caption string")
        images.append(im)
    if not images:
        raise ValueError(f"{path}: no images with split '{split}' (splits in the file: {sorted(splits)})")

    paths = [str(root / im.get("filepath", "") / im["filename"]) for im in images]
    keep = _filter_missing(paths, on_missing, path, "images", root, "image_root")
    if not any(keep):
        raise MissingFilesError(f"{path}: all {len(images)} images of split '{split}' are missing under {root}; "
                                f"point image_root at the image folder", paths)
    every = ImageTextSet(paths, [], [], [Path(im["filename"]).stem for im in images], skipped=keep.count(False))
    aspects: list[list[str]] = []
    for i, im in enumerate(images):
        for s in im["sentences"][:max_captions]:
            every.captions.append(s["raw"].strip())
            every.txt_to_img.append(i)
            aspects.append(s.get("aspects"))
    every.aspects = _caption_aspects(aspects, bad)
    return every.without([i for i, k in enumerate(keep) if not k])


def _caption_aspects(raw: list, bad) -> list[list[str]]:
    """Per caption, the aspects it mentions in the generator's order (campe.data.synth_scenes.ASPECTS; names it
    does not know after those); [] unless every caption of the split names them (sentences[].aspects)."""
    from campe.data.synth_scenes import ASPECTS

    if not raw or any(a is None for a in raw):
        return []
    for j, a in enumerate(raw):
        if not isinstance(a, list) or not a or not all(isinstance(x, str) for x in a):
            raise bad(f"caption {j} of the split has 'aspects' {a!r}; expected a non-empty list of aspect names "
                      f"such as {list(ASPECTS[:2])}")
    rank = {a: i for i, a in enumerate(ASPECTS)}
    return [sorted(dict.fromkeys(a), key=lambda x: (rank.get(x, len(rank)), x)) for a in raw]


# ---------------------------------------------------------------------------------------------------------- MSR-VTT
def load_msrvtt(root: str | Path | None = None, policy: str = "1k-A", *, csv_path: str | Path | None = None,
                json_path: str | Path | None = None, video_root: str | Path | None = None, max_captions: int = 20,
                on_missing: str = "error", split: str = "test") -> VideoTextSet:
    """MSR-VTT-style video-text test set.

    policy "1k-A": MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence), one caption per row, videos in first
    appearance order. policy "full": MSRVTT_data.json, every video of `split` with its sentences in sen_id order,
    up to `max_captions` (MSR-VTT has 20 per video; smaller sets use what they have). Files default to
    root/MSRVTT_JSFUSION_test.csv, root/MSRVTT_data.json and root/videos (root/videos/all if that exists, the
    layout of the official download); video path = video_root/<video_id>.mp4.
    """
    _check_on_missing(on_missing)
    if policy not in MSRVTT_POLICIES:
        raise ValueError(f"policy: expected one of {MSRVTT_POLICIES} (1k-A: JSFUSION csv, full: MSRVTT_data.json), "
                         f"got {policy!r}")
    if max_captions < 1:
        raise ValueError(f"max_captions: expected >= 1, got {max_captions}")
    base = Path(root) if root is not None else None
    if video_root is None:
        if base is None:
            raise ValueError("load_msrvtt: give root or video_root")
        video_root = base / "videos" / "all" if (base / "videos" / "all").is_dir() else base / "videos"
    vroot = Path(video_root)

    if policy == "1k-A":
        ann = Path(csv_path) if csv_path is not None else _need(base, "MSRVTT_JSFUSION_test.csv", "csv_path")
        video_ids, captions, txt_to_vid = _msrvtt_jsfusion(ann)
    else:
        ann = Path(json_path) if json_path is not None else _need(base, "MSRVTT_data.json", "json_path")
        video_ids, captions, txt_to_vid = _msrvtt_data_json(ann, split, max_captions)

    paths = [str(vroot / f"{v}.mp4") for v in video_ids]
    keep = _filter_missing(paths, on_missing, ann, "videos", vroot, "video_root")
    if not any(keep):
        raise MissingFilesError(f"{ann}: all {len(paths)} videos are missing under {vroot}; point video_root at "
                                f"the folder of <video_id>.mp4 files", paths)
    every = VideoTextSet(paths, captions, txt_to_vid, video_ids, skipped=keep.count(False), policy=policy,
                         extra={"annotation": str(ann)})
    return every.without([i for i, k in enumerate(keep) if not k])


def _msrvtt_jsfusion(ann: Path) -> tuple[list[str], list[str], list[int]]:
    """MSRVTT_JSFUSION_test.csv -> (video ids in first appearance order, captions (one per row), caption -> video)."""
    video_ids: list[str] = []
    captions: list[str] = []
    txt_to_vid: list[int] = []
    if not ann.is_file():
        raise FileNotFoundError(f"{ann}: MSR-VTT 1k-A test list (MSRVTT_JSFUSION_test.csv) not found")
    pos: dict[str, int] = {}
    try:
        with open(ann, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            need = [c for c in ("video_id", "sentence") if c not in cols]
            if need:
                raise AnnotationFormatError(
                    f"{ann}: not a JSFUSION test list: missing column(s) {need} (found {cols[:6]}); expected a "
                    f"csv with header key,vid_key,video_id,sentence")
            for row in reader:
                vid, sent = row["video_id"], row["sentence"]
                if not vid or sent is None:
                    raise AnnotationFormatError(f"{ann}: line {reader.line_num}: empty video_id or sentence")
                if vid not in pos:
                    pos[vid] = len(video_ids)
                    video_ids.append(vid)
                captions.append(sent.strip())
                txt_to_vid.append(pos[vid])
    except UnicodeDecodeError as e:
        raise AnnotationFormatError(f"{ann}: not a text csv ({e})") from None
    return video_ids, captions, txt_to_vid


def _msrvtt_data_json(ann: Path, split: str, max_captions: int) -> tuple[list[str], list[str], list[int]]:
    """MSRVTT_data.json -> (the videos of `split` in file order, their first max_captions sentences each in sen_id
    order, caption -> video)."""
    data = _read_json(ann, "MSRVTT_data.json (videos[].video_id/split, sentences[].caption/video_id/sen_id)")

    def bad(msg: str) -> AnnotationFormatError:
        return AnnotationFormatError(f"{ann}: not an MSRVTT_data.json: {msg} (expected videos[].video_id, "
                                     f"videos[].split, sentences[].caption, sentences[].video_id)")

    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
            or not isinstance(data.get("sentences"), list):
        raise bad("no top-level 'videos' and 'sentences' lists")
    video_ids: list[str] = []
    for i, v in enumerate(data["videos"]):
        if not isinstance(v, dict) or "video_id" not in v or "split" not in v:
            raise bad(f"videos[{i}] lacks 'video_id' or 'split'")
        if v["split"] == split:
            video_ids.append(str(v["video_id"]))
    if not video_ids:
        raise ValueError(f"{ann}: no videos with split '{split}' "
                         f"(splits in the file: {sorted({v['split'] for v in data['videos']})})")
    by_vid: dict[str, list[tuple[int, int, str]]] = {v: [] for v in video_ids}
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or "caption" not in s or "video_id" not in s:
            raise bad(f"sentences[{i}] lacks 'caption' or 'video_id'")
        if s["video_id"] in by_vid:
            by_vid[s["video_id"]].append((int(s.get("sen_id", i)), i, s["caption"]))
    empty = [v for v in video_ids if not by_vid[v]]
    if empty:
        raise bad(f"{len(empty)} test video(s) have no sentence, e.g. {empty[:5]}")
    captions: list[str] = []
    txt_to_vid: list[int] = []
    for vi, vid in enumerate(video_ids):
        for _, _, cap in sorted(by_vid[vid])[:max_captions]:
            captions.append(cap.strip())
            txt_to_vid.append(vi)
    return video_ids, captions, txt_to_vid


def _need(base: Path | None, name: str, arg: str) -> Path:
    if base is None:
        raise ValueError(f"load_msrvtt: give root or {arg}")
    return base / name


# ----------------------------------------------------------------------------------------------------------- frames
def frame_indices(total: int, n: int) -> list[int]:
    """n frame indices evenly spread over `total` frames: the centre of each of n equal segments. When the clip is
    shorter than n, frames repeat in order (each about n/total times), so the output always has n frames."""
    if total < 1 or n < 1:
        raise ValueError(f"frame_indices: need total >= 1 and n >= 1, got total={total}, n={n}")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def sample_frames(mp4_path: str | Path, n: int) -> np.ndarray:
    """Decode a video with PyAV and return n evenly spaced RGB frames, uint8 [n, H, W, 3] (see `frame_indices`).

    Uses the container's frame count to keep only the chosen frames; if it is unknown or wrong (fewer decodable
    frames than declared, e.g. a damaged tail) the decodable frames are sampled instead, with a warning.
    """
    import av

    path = Path(mp4_path)
    if n < 1:
        raise ValueError(f"sample_frames: n must be >= 1, got {n}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video not found")
    fix = "re-download or re-encode it, or remove it from the annotation file"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream in the file; {fix}")
            stream = container.streams.video[0]
            declared = int(stream.frames or 0)
            if declared > 0:
                idx = frame_indices(declared, n)
                wanted, got = set(idx), {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        got[i] = frame.to_ndarray(format="rgb24")
                    if i >= idx[-1]:
                        break
                if len(got) == len(wanted):
                    return np.stack([got[i] for i in idx])
        # Frame count unknown or overstated: decode what is there (clips are short; this path is rare).
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: cannot decode video ({type(e).__name__}: {e}); {fix}") from None
    if not frames:
        raise VideoDecodeError(f"{path}: no decodable frames; {fix}")
    if declared > 0:
        warnings.warn(f"{path}: {len(frames)} decodable frames of {declared} declared; sampling those", stacklevel=2)
    return np.stack([frames[i] for i in frame_indices(len(frames), n)])


# -------------------------------------------------------------------------------------------------------- zero-shot
def class_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """ImageNet-style folder (root/<class>/<image>) -> (image paths, labels, class names), classes sorted by name.

    An empty class folder is kept as a candidate class (it can be predicted, it has no images of its own).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: class folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise AnnotationFormatError(f"{root}: no class subfolders; expected root/<class name>/<image files>")
    paths, labels, broken = [], [], []
    for c_i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            if not f.is_file():  # a dangling symlink
                broken.append(str(f))
                continue
            paths.append(str(f))
            labels.append(c_i)
    if broken:
        raise MissingFilesError(f"{root}: {len(broken)} image link(s) point nowhere, e.g. {broken[:5]}; rebuild the "
                                f"folder (make_zero_shot_folders) or fix the links", broken)
    if not paths:
        raise AnnotationFormatError(f"{root}: the class subfolders hold no images ({', '.join(IMAGE_EXTS)})")
    return paths, labels, classes


def class_prompts(class_names: list[str], templates: list[str]) -> list[list[str]]:
    """[C][T] prompt strings: each template filled with each class name ("_" -> " ", "a {}" -> "an {}" before a
    vowel, so "a {} object." + "orange" reads "an orange object.")."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates: expected a non-empty list of strings with a '{{}}' slot, got {templates!r}")
    out = []
    for name in class_names:
        name = name.replace("_", " ")
        vowel = name[:1].lower() in "aeiou"
        out.append([(t.replace("a {}", "an {}") if vowel and "an {}" not in t else t).format(name) for t in templates])
    return out


# Zero-shot class prompts: "grammar" = the generator's own subject phrases (grammar_prompts), "templates" = the
# fixed templates above (ZERO_SHOT_TEMPLATES; "a photo of a {} object.", the prompts before issue 15).
ZERO_SHOT_PROMPT_SETS = ("grammar", "templates")
GRAMMAR_TASKS = {"shape": "shape", "colour": "colour"}  # task -> the object attribute that is the class


def grammar_prompts(task: str, class_names: list[str]) -> list[list[str]]:
    """[C][T] prompts in the generator's own caption grammar: for each class, every caption the subject-only
    template (campe.data.synth_scenes.TEMPLATES, aspects ("subject",)) gives a main subject of that class, i.e.
    each caption prefix x the noun phrase ("a small red circle") over every value of the other attributes (size,
    and colour for shapes / shape for colours). T is the same for every class, so the class embedding is the
    average over the other attributes."""
    from campe.data.synth_scenes import COLOURS, PREFIXES, SHAPES, SIZES, TEMPLATES

    if task not in GRAMMAR_TASKS:
        raise ValueError(f"grammar prompts exist for the generated tasks {list(GRAMMAR_TASKS)}, not {task!r}")
    subject = next(build for aspects, _, build in TEMPLATES if aspects == ("subject",))
    known = SHAPES if task == "shape" else list(COLOURS)
    unknown = [c for c in class_names if c not in known]
    if unknown:
        raise ValueError(f"grammar prompts: {unknown} are not {task} classes of the generator ({known})")
    out = []
    for name in class_names:
        objs = ([{"shape": name, "colour": c, "size": s} for s in SIZES for c in COLOURS] if task == "shape" else
                [{"shape": sh, "colour": name, "size": s} for s in SIZES for sh in SHAPES])
        out.append([pre + subject({"objects": [o], "background": None}) for o in objs for pre in PREFIXES])
    return out


def zero_shot_prompts(task: str, class_names: list[str], prompt_set: str = "grammar") -> list[list[str]]:
    """[C][T] class prompts of a zero-shot task from the set `prompt_set` (ZERO_SHOT_PROMPT_SETS)."""
    if prompt_set == "grammar":
        return grammar_prompts(task, class_names)
    if prompt_set == "templates":
        return class_prompts(class_names, ZERO_SHOT_TEMPLATES[task])
    raise ValueError(f"zero-shot prompt set {prompt_set!r} is not one of {ZERO_SHOT_PROMPT_SETS}")


def load_scenes(generated_root: str | Path, split: str = "test") -> dict[str, dict]:
    """{image file name: scene} of a generated set's `split` (images[].scene of dataset_karpathy.json)."""
    ann = Path(generated_root) / "dataset_karpathy.json"
    data = _read_json(ann, "the generated set's dataset_karpathy.json (make it with `campe generate`)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationFormatError(f"{ann}: no top-level 'images' list")
    return {im["filename"]: im.get("scene") for im in data["images"] if im.get("split") == split}


ZERO_SHOT_MARKER = ".campe_zero_shot"


def make_zero_shot_folders(generated_root: str | Path, out_root: str | Path, split: str = "test",
                           copy: bool = False) -> dict[str, Path]:
    """Two ImageNet-style folders from a generated set's `split`: classes = the main subject's shape / its colour
    (from images[].scene.objects[0] in dataset_karpathy.json). Every shape/colour of the generator is a class, even
    if absent from the split. Symlinks (absolute) unless copy=True. Returns {"shape": dir, "colour": dir}.
    A folder made earlier by this function is replaced; any other existing folder is refused."""
    from campe.data.synth_scenes import COLOURS, SHAPES

    gen = Path(generated_root)
    ann = gen / "dataset_karpathy.json"
    data = _read_json(ann, "the generated set's dataset_karpathy.json (make it with `campe generate`)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationFormatError(f"{ann}: no top-level 'images' list")
    items = []
    for i, im in enumerate(data["images"]):
        if im.get("split") != split:
            continue
        try:
            subject = im["scene"]["objects"][0]
            items.append((gen / im.get("filepath", "") / im["filename"], subject["shape"], subject["colour"]))
        except (KeyError, IndexError, TypeError):
            raise AnnotationFormatError(
                f"{ann}: images[{i}] has no scene.objects[0].shape/colour; zero-shot folders need a set made by "
                f"campe.data.synth (campe generate)") from None
    if not items:
        raise ValueError(f"{ann}: no images with split '{split}'")
    missing = [str(p) for p, _, _ in items if not p.is_file()]
    if missing:
        raise _missing_error(ann, "images", missing, len(items), gen, "generated_root")

    out = {}
    for task, classes, col in (("shape", SHAPES, 1), ("colour", list(COLOURS), 2)):
        d = Path(out_root) / task
        if d.exists():
            if not (d / ZERO_SHOT_MARKER).exists():
                raise FileExistsError(f"{d}: exists and was not made by make_zero_shot_folders; choose another out_root")
            shutil.rmtree(d)
        for c in classes:
            (d / c).mkdir(parents=True)
        for item in items:
            src, cls = item[0].resolve(), item[col]
            dst = d / cls / src.name
            shutil.copyfile(src, dst) if copy else os.symlink(src, dst)
        (d / ZERO_SHOT_MARKER).write_text(json.dumps({"source": str(ann), "split": split, "task": task}))
        out[task] = d
    return out
