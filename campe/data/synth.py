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
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "2"  # 2: URLs relative to the list's folder (were absolute file:// URLs)

SHAPES = ["circle", "square", "triangle", "hexagon", "star", "cross"]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220), "yellow": (240, 215, 40),
    "purple": (135, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SIZES = {"small": 0.1, "large": 0.18}  # radius as a fraction of the image side
BACKGROUNDS = ["plain", "gradient", "striped", "dotted", "checkered"]
# 3x3 grid cells (col, row) -> phrase; objects sit in distinct cells so positions and relations are unambiguous.
POSITIONS = {
    (0, 0): "in the top left corner", (1, 0): "at the top", (2, 0): "in the top right corner",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left corner", (1, 2): "at the bottom", (2, 2): "in the bottom right corner",
}
COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
PREFIXES = ["", "a photo of ", "an image of ", "a picture showing "]
ASPECTS = ("subject", "position", "secondary", "relation", "background", "count", "motion")


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


# ----------------------------------------------------------------------------------------------------------- scenes
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per item: deterministic, order-independent, and a larger set extends a smaller one.
    tag = {"train": 1, "val": 2, "test": 3, "video-train": 4, "video-test": 5}[split]
    return np.random.default_rng([seed, tag, index])


def _pick(rng: np.random.Generator, items: list, exclude: set = frozenset()) -> Any:
    pool = [x for x in items if x not in exclude]
    return pool[int(rng.integers(len(pool)))]


def sample_background(rng: np.random.Generator) -> dict[str, Any]:
    kind = _pick(rng, BACKGROUNDS)
    c1 = _pick(rng, list(COLOURS))
    bg = {"kind": kind, "colours": [c1]}
    if kind == "gradient":
        bg["colours"].append(_pick(rng, list(COLOURS), {c1}))
    return bg


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> dict[str, Any]:
    """A scene: background + 1..max_objects objects in distinct grid cells; object 0 is the main subject."""
    bg = sample_background(rng)
    n = int(rng.integers(1, max_objects + 1))
    # The main subject is large or small; secondary objects are small, so "main" is well defined.
    main_size = _pick(rng, list(SIZES))
    all_cells = list(POSITIONS)
    if main_size == "large" and n > 1:
        # A large object spills into its neighbouring cells: keep the others two cells away so nothing is occluded.
        main_cell = _pick(rng, [c for c in all_cells if c != (1, 1)])
        free = [c for c in all_cells if max(abs(c[0] - main_cell[0]), abs(c[1] - main_cell[1])) >= 2]
    else:
        main_cell = _pick(rng, all_cells)
        free = [c for c in all_cells if c != main_cell]
    cells = [main_cell] + [free[i] for i in rng.permutation(len(free))[: n - 1]]
    objects, used = [], set()
    for i in range(n):
        while True:
            shape = _pick(rng, SHAPES)
            colour = _pick(rng, list(COLOURS), set(bg["colours"]))  # never invisible on its background
            if (shape, colour) not in used:
                break
        used.add((shape, colour))
        size = main_size if i == 0 else "small"
        objects.append({"shape": shape, "colour": colour, "size": size, "cell": list(cells[i])})
    return {"background": bg, "objects": objects}


# ------------------------------------------------------------------------------------------------------- rendering
def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], start: float) -> list[tuple[float, float]]:
        pts = []
        for j in range(n):
            a = start + angle + 2 * math.pi * j / n
            rr = radii[j % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [r * 1.2], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r * 1.25], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [r * 1.1], 0.0)
    if shape == "star":
        return ring(10, [r * 1.3, r * 0.55], -math.pi / 2)
    if shape == "cross":
        w = r * 0.38
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float,
                 angle: float = 0.0) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=fill)


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    # Texture uses a darker (or, for dark colours, lighter) tone of the same colour, so the colour name stays true.
    if sum(rgb) < 150:
        return tuple(int(c + (255 - c) * (1 - f) * 0.6) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * f) for c in rgb)  # type: ignore[return-value]


def render_background(bg: dict[str, Any], side: int) -> Image.Image:
    c1 = COLOURS[bg["colours"][0]]
    kind = bg["kind"]
    if kind == "gradient":
        c2 = np.array(COLOURS[bg["colours"][1]], dtype=np.float32)
        t = np.linspace(0.0, 1.0, side, dtype=np.float32)[None, :, None]
        arr = (np.array(c1, dtype=np.float32) * (1 - t) + c2 * t).repeat(side, axis=0)
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    img = Image.new("RGB", (side, side), c1)
    d = ImageDraw.Draw(img)
    dark = _shade(c1, 0.6)
    step = max(side // 8, 4)
    if kind == "striped":
        for x in range(0, side, 2 * step):
            d.rectangle([x, 0, x + step - 1, side], fill=dark)
    elif kind == "dotted":
        rad = step * 0.3
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=dark)
    elif kind == "checkered":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    return img


def render_scene(scene: dict[str, Any], size: int, supersample: int = 4) -> Image.Image:
    """Draw a scene at `supersample`x and downsample, for anti-aliased edges at small sizes."""
    side = size * supersample
    img = render_background(scene["background"], side)
    d = ImageDraw.Draw(img)
    for o in scene["objects"]:
        # Cell centres at 0.2/0.5/0.8 of the side keep large shapes inside the frame.
        cx = (0.2 + 0.3 * o["cell"][0]) * side
        cy = (0.2 + 0.3 * o["cell"][1]) * side
        _draw_object(d, o["shape"], o["colour"], cx, cy, SIZES[o["size"]] * side, o.get("angle", 0.0))
    return img.resize((size, size), Image.Resampling.LANCZOS)


# -------------------------------------------------------------------------------------------------------- captions
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(o: dict[str, Any], size: bool = True, colour: bool = True) -> str:
    words = ([o["size"]] if size else []) + ([o["colour"]] if colour else []) + [o["shape"]]
    return _article(" ".join(words))


def background_phrase(bg: dict[str, Any]) -> str:
    c = bg["colours"]
    if bg["kind"] == "gradient":
        return f"a {c[0]} to {c[1]} gradient background"
    return _article(f"{bg['kind']} {c[0]} background")


def relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where object a is relative to object b (distinct grid cells)."""
    dx, dy = a["cell"][0] - b["cell"][0], a["cell"][1] - b["cell"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# Each template: (aspects, needs >= 2 objects, builder). Builders return the caption without prefix.
def _templates() -> list[tuple[tuple[str, ...], bool, Callable[[dict[str, Any]], str]]]:
    def main(s):
        return s["objects"][0]

    def secs(s):
        return [noun_phrase(o) for o in s["objects"][1:]]

    return [
        (("subject",), False, lambda s: noun_phrase(main(s))),
        (("subject", "position"), False, lambda s: f"{noun_phrase(main(s))} {POSITIONS[tuple(main(s)['cell'])]}"),
        (("subject", "background"), False, lambda s: f"{noun_phrase(main(s))} on {background_phrase(s['background'])}"),
        (("background", "subject"), False,
         lambda s: f"{background_phrase(s['background'])} with {noun_phrase(main(s), size=False)}"),
        (("count", "background"), False,
         lambda s: f"{COUNT_WORDS[len(s['objects'])]} on {background_phrase(s['background'])}"),
        (("subject", "position", "secondary", "background"), False,
         lambda s: " ".join([noun_phrase(main(s)), POSITIONS[tuple(main(s)["cell"])]]
                            + ([f"with {_join(secs(s))}"] if len(s["objects"]) > 1 else [])
                            + [f"on {background_phrase(s['background'])}"])),
        (("subject", "relation", "secondary"), True,
         lambda s: f"{noun_phrase(main(s))} {relation(main(s), s['objects'][1])} {noun_phrase(s['objects'][1])}"),
        (("subject", "secondary"), True, lambda s: f"{noun_phrase(main(s))} and {_join(secs(s))}"),
        (("secondary", "relation", "subject"), True,
         lambda s: f"{noun_phrase(s['objects'][1])} {relation(s['objects'][1], main(s))} {noun_phrase(main(s), size=False)}"),
    ]


TEMPLATES = _templates()


def make_captions(scene: dict[str, Any], n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """`n` distinct paraphrases, each mentioning a different subset of the scene's aspects."""
    multi = len(scene["objects"]) > 1
    usable = [t for t in TEMPLATES if multi or not t[1]]
    order = rng.permutation(len(usable))
    out: list[dict[str, Any]] = []
    for j in order[:n]:
        aspects, _, build = usable[int(j)]
        prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
        # The full description mentions secondary objects only when there are some.
        asp = [a for a in aspects if multi or a != "secondary"]
        out.append({"caption": prefix + build(scene), "aspects": asp})
    return out


# ---------------------------------------------------------------------------------------------------------- videos
MOTIONS = ["move_right", "move_left", "move_up", "move_down", "grow", "shrink", "recolour", "spin"]
MOTION_PHRASES = {
    "move_right": ["moves from left to right", "slides to the right"],
    "move_left": ["moves from right to left", "slides to the left"],
    "move_up": ["moves up", "rises to the top"],
    "move_down": ["moves down", "falls to the bottom"],
    "grow": ["grows bigger", "gets larger"],
    "shrink": ["shrinks", "gets smaller"],
    "spin": ["spins", "rotates in place"],
}


def sample_clip(rng: np.random.Generator) -> dict[str, Any]:
    """A clip: a background (plain or gradient), a moving main object and maybe a still second object."""
    bg = sample_background(rng)
    bg = {"kind": "plain", "colours": bg["colours"][:1]} if bg["kind"] not in ("plain", "gradient") else bg
    shape = _pick(rng, SHAPES)
    motion = _pick(rng, MOTIONS, {"spin"} if shape == "circle" else set())  # a spinning circle looks still
    colour = _pick(rng, list(COLOURS), set(bg["colours"]))
    clip: dict[str, Any] = {"background": bg, "motion": motion,
                            "subject": {"shape": shape, "colour": colour, "size": "large"}}
    if motion == "recolour":
        clip["to_colour"] = _pick(rng, list(COLOURS), set(bg["colours"]) | {colour})
    if rng.random() < 0.5:
        clip["still"] = {"shape": _pick(rng, SHAPES, {shape}),
                         "colour": _pick(rng, list(COLOURS), set(bg["colours"])), "size": "small"}
    return clip


def render_clip(clip: dict[str, Any], size: int, frames: int, supersample: int = 2) -> list[np.ndarray]:
    side = size * supersample
    bg = render_background(clip["background"], side)
    m, s = clip["motion"], clip["subject"]
    out = []
    for f in range(frames):
        t = f / (frames - 1)
        cx, cy, r, angle, colour = 0.5, 0.5, 0.2, 0.0, s["colour"]
        if m == "move_right":
            cx = 0.2 + 0.6 * t
        elif m == "move_left":
            cx = 0.8 - 0.6 * t
        elif m == "move_up":
            cy = 0.8 - 0.6 * t
        elif m == "move_down":
            cy = 0.2 + 0.6 * t
        elif m == "grow":
            r = 0.08 + 0.22 * t
        elif m == "shrink":
            r = 0.3 - 0.22 * t
        elif m == "spin":
            angle = t * math.pi / 2 * 0.9  # < a quarter turn, so no frame repeats the first
        elif m == "recolour":
            colour = s["colour"] if t < 0.5 else clip["to_colour"]
        img = bg.copy()
        d = ImageDraw.Draw(img)
        if "still" in clip:
            # The still object sits in a corner the mover never crosses.
            _draw_object(d, clip["still"]["shape"], clip["still"]["colour"], 0.15 * side, 0.15 * side, 0.1 * side)
        _draw_object(d, s["shape"], colour, cx * side, cy * side, r * side, angle)
        out.append(np.asarray(img.resize((size, size), Image.Resampling.LANCZOS)))
    return out


def make_video_captions(clip: dict[str, Any], n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    s, m = clip["subject"], clip["motion"]
    subj_full, subj_bare = _article(f"{s['colour']} {s['shape']}"), _article(s["shape"])
    if m == "recolour":
        verbs = [f"turns {clip['to_colour']}", f"changes colour from {s['colour']} to {clip['to_colour']}"]
    else:
        verbs = MOTION_PHRASES[m]
    bg = background_phrase(clip["background"])
    options: list[tuple[str, tuple[str, ...]]] = []
    for v in verbs:
        options += [(f"{subj_full} {v}", ("subject", "motion")),
                    (f"{subj_full} {v} on {bg}", ("subject", "motion", "background"))]
    options.append((f"a video of {subj_bare} that {verbs[0]}" if m != "recolour" else
                    f"a video of {subj_bare} that {verbs[1]}", ("subject", "motion")))
    if "still" in clip:
        still = clip["still"]
        options.append((f"{subj_full} {verbs[0]} while {_article(still['colour'] + ' ' + still['shape'])} stays still",
                        ("subject", "motion", "secondary")))
    order = rng.permutation(len(options))
    return [{"caption": options[int(j)][0], "aspects": list(options[int(j)][1])} for j in order[:n]]


def write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """H.264 mp4 via PyAV, single-threaded so the bytes are deterministic."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        stream.thread_count = 1
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


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
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        summary = _generate_into(p, tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _generate_into(p: SynthParams, root: Path) -> dict[str, Any]:
    (root / "images").mkdir()
    (root / "urls").mkdir()
    vid_dir = root / "msrvtt" / "videos"
    vid_dir.mkdir(parents=True)

    karpathy: list[dict[str, Any]] = []
    urls: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    sentid = 0
    splits = [("train", p.train_images, p.train_captions), ("val", p.val_images, p.train_captions),
              ("test", p.test_images, p.test_captions)]
    with _progress(sum(n for _, n, _ in splits), "generate images") as bar:
        for split, n, n_caps in splits:
            for i in range(n):
                rng = _rng(p.seed, split, i)
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

    videos, sentences_v, test_rows = [], [], []
    vsplits = [("train", p.train_videos), ("test", p.test_videos)]
    with _progress(p.train_videos + p.test_videos, "generate videos") as bar:
        for split, n in vsplits:
            for i in range(n):
                rng = _rng(p.seed, f"video-{split}", i)
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

    summary = {
        "generator_version": GENERATOR_VERSION,
        "params": dataclasses.asdict(p),
        "images": {s: n for s, n, _ in splits},
        "image_captions": {s: len(r) for s, r in urls.items()},
        "videos": {s: n for s, n in vsplits},
        "video_captions": len(sentences_v),
    }
    (root / "manifest.json").write_text(json.dumps(summary, indent=2))
    return summary

