"""Generated few-shot classification sets in the CoOp format, for prompt learning on a frozen CLIP (AttriPrompt).

    from campe.data.synth_fewshot import FewShotParams, generate_fewshot, DATASETS
    summary = generate_fewshot(FewShotParams(train_per_class=20), "data/fewshot")

Premise (the method's): prompts composed from *attributes* seen by the image encoder should transfer to classes that
are new *combinations* of attributes already seen. So every class is an attribute combination (main-subject shape x
colour, background pattern x colour, position x shape, count x shape, ...) named by the caption grammar's own noun
phrase ("red star", "star in the top left corner", "two stars"). The classes of a set are the grid rows x cols in
checkerboard order: labels 0..ceil(n/2)-1 (the base classes under CoOp's sorted-label rule) are the cells with
(row + col) even, the rest (novel) the odd cells, so every novel class is an unseen combination whose row and column
attributes each appear among the base classes. SynthNet (the "ImageNet": 72 classes) is the source for the
cross-dataset and domain-generalisation protocols; its four shifted test sets keep its classes and change the
rendering (outlines only, new shades and muted backgrounds, clutter and occlusion, a pastel rendition on an unseen
background). Everything is an instrument: designed from the premise, not tuned to make a method win.

Layout (CoOp's OxfordPets layout: image paths are relative to the set's images/ folder):
  <root>/<Name>/split_zhou_<Name>.json   {"train"|"val"|"test": [[relpath, label, classname], ...]}
  <root>/<Name>/images/<split>/<label>_<i>.png
  <root>/<Name>/fewshot_manifest.json    the set's params hash, classes, factors, counts, pixel hashes
  <root>/manifest.json                   every set (kind, classes, base count, source) and the params
Shifted sets (kind "dg") have empty train and val lists (like ImageNet-Sketch/-A/-R/-V2). Each set is built in a temp
folder and renamed into place, so a killed run leaves whole sets only; a rerun keeps the sets whose params hash
matches and makes the others.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from campe.core.io import atomic_dir, atomic_write_json, json_sha256
from campe.data.synth_scenes import (ALL_COLOURS, BACKGROUNDS, COLOURS, EXTRA_SHAPES, POSITIONS, SHAPES, draw_object,
                                     object_box, pick, render_background, render_scene)

FEWSHOT_VERSION = "1"
PATTERNS = ["plain", "striped", "dotted", "checkered"]
BASIC = ["red", "green", "blue", "yellow", "purple", "orange"]
PLURALS = {"cross": "crosses"}
COUNT_NAMES = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SetSpec:
    """One generated set: classes = rows x cols of two attribute factors; `layout` says how a class is drawn."""

    name: str
    kind: str  # b2n (base-to-novel; SynthNet is also the cross-dataset source) | dg (shifted test set)
    rows: tuple[str, tuple]  # (factor, values): shape | colour | pattern | bg_colour | cell | count
    cols: tuple[str, tuple]
    layout: str  # object | background | count | scene
    about: str
    style: str = "normal"  # normal | sketch | shift | clutter | rendition
    variant_of: str = ""


_CELLS = tuple(tuple(c) for c in POSITIONS)
DATASETS: dict[str, SetSpec] = {s.name: s for s in [
    SetSpec("SynthNet", "b2n", ("shape", tuple(SHAPES + EXTRA_SHAPES)), ("colour", tuple(COLOURS)), "object",
            "ImageNet analogue: main subject shape x colour, random background, 0-2 small distractors"),
    SetSpec("Textures", "b2n", ("pattern", tuple(PATTERNS)), ("bg_colour", tuple(BASIC)), "background",
            "DTD analogue: background pattern x background colour, one random object in front"),
    SetSpec("Layouts", "b2n", ("cell", _CELLS), ("shape", ("circle", "square", "triangle", "star")), "object",
            "spatial (EuroSAT-like): one object, its grid position x its shape"),
    SetSpec("Counts", "b2n", ("count", (1, 2, 3)), ("shape", ("circle", "square", "triangle", "star", "hexagon",
                                                              "cross")), "count",
            "counting: how many objects x their (common) shape, colours random"),
    SetSpec("Scenes", "b2n", ("colour", tuple(BASIC)), ("pattern", tuple(PATTERNS)), "scene",
            "object colour x background pattern (two attributes from different parts of the image)"),
    SetSpec("FinePolygons", "b2n", ("shape", ("triangle", "square", "pentagon", "hexagon", "octagon", "circle")),
            ("colour", ("red", "blue")), "object", "fine-grained (Aircraft-like): polygons one corner apart"),
    SetSpec("FineColours", "b2n", ("colour", ("red", "pink", "orange", "brown", "yellow", "blue", "cyan", "purple")),
            ("shape", ("circle", "square")), "object", "fine-grained (Flowers-like): close shades of colour"),
    SetSpec("SynthNetSketch", "dg", *[("shape", ()), ("colour", ())], "object", "outlines only on paper (Sketch)",
            style="sketch", variant_of="SynthNet"),
    SetSpec("SynthNetV2", "dg", *[("shape", ()), ("colour", ())], "object",
            "new shades of each colour, muted backgrounds (V2)", style="shift", variant_of="SynthNet"),
    SetSpec("SynthNetA", "dg", *[("shape", ()), ("colour", ())], "object",
            "clutter: 4-6 distractors and occluding bars (A)", style="clutter", variant_of="SynthNet"),
    SetSpec("SynthNetR", "dg", *[("shape", ()), ("colour", ())], "object",
            "rendition: pastel fills, dark edges, an unseen noise background (R)", style="rendition",
            variant_of="SynthNet"),
]}


@dataclass
class FewShotParams:
    """Sizes of the generated few-shot sets (params.yaml section `fewshot_data`)."""

    seed: int = 0
    image_size: int = 32
    train_per_class: int = 32  # >= 16 shots; 3 seeds sample 16 of these each
    val_per_class: int = 8  # few-shot val takes min(shots, 4)
    test_per_class: int = 20
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))

    def validate(self) -> None:
        if self.image_size < 32 or self.image_size % 2:
            raise ValueError(f"image_size must be an even number >= 32, got {self.image_size}")
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; known: {', '.join(DATASETS)}")
        for d in self.datasets:
            src = DATASETS[d].variant_of
            if src and src not in self.datasets:
                raise ValueError(f"dataset {d} is a shifted test set of {src}: list {src} too")


# ------------------------------------------------------------------------------------------------------- classes
def spec_of(name: str) -> SetSpec:
    s = DATASETS[name]
    return DATASETS[s.variant_of] if s.variant_of else s


def classes(name: str) -> list[dict[str, Any]]:
    """The classes of set `name` in label order: the (row+col)-even cells of the grid first (base), then the odd."""
    s = spec_of(name)
    (fr, rv), (fc, cv) = s.rows, s.cols
    cells = [(i, j) for i in range(len(rv)) for j in range(len(cv))]
    order = [c for c in cells if (c[0] + c[1]) % 2 == 0] + [c for c in cells if (c[0] + c[1]) % 2 == 1]
    return [{fr: rv[i], fc: cv[j]} for i, j in order]


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def classname(attrs: dict[str, Any]) -> str:
    """The caption grammar's noun phrase of a class: "red star", "star in the top left corner", "two stars"."""
    if "count" in attrs:
        n = attrs["count"]
        return f"{COUNT_NAMES[n]} {attrs['shape'] if n == 1 else plural(attrs['shape'])}"
    if "bg_colour" in attrs:
        return f"{attrs['pattern']} {attrs['bg_colour']} background"
    if "pattern" in attrs:
        return f"{attrs['colour']} shape on a {attrs['pattern']} background"
    if "cell" in attrs:
        return f"{attrs['shape']} {POSITIONS[tuple(attrs['cell'])]}"
    return f"{attrs['colour']} {attrs['shape']}"


# -------------------------------------------------------------------------------------------------------- scenes
def jitter(rng: np.random.Generator, o: dict[str, Any]) -> dict[str, Any]:
    """Continuous pose within the cell (so no two images coincide): offset, scale and a small rotation."""
    o.update(dx=float(rng.uniform(-0.03, 0.03)), dy=float(rng.uniform(-0.03, 0.03)),
             scale=float(rng.uniform(0.9, 1.1)), angle=float(rng.uniform(-0.25, 0.25)))
    return o


def _background(rng: np.random.Generator, attrs: dict[str, Any], avoid: set[str]) -> dict[str, Any]:
    kind = attrs.get("pattern") or pick(rng, BACKGROUNDS)
    c1 = attrs.get("bg_colour") or pick(rng, list(COLOURS), avoid)
    bg = {"kind": kind, "colours": [c1]}
    if kind == "gradient":
        bg["colours"].append(pick(rng, list(COLOURS), avoid | {c1}))
    return bg


def class_scene(rng: np.random.Generator, layout: str, attrs: dict[str, Any], max_extra: int = 2) -> dict[str, Any]:
    """A scene of class `attrs`: object 0 carries the class's object attributes (or the class is the background or
    the count); the rest is drawn at random, never the colour of the background."""
    all_cells = [tuple(c) for c in POSITIONS]
    if layout == "count":
        n, shape = attrs["count"], attrs["shape"]
        bg = _background(rng, {}, set())
        cells = [all_cells[i] for i in rng.permutation(9)[:n]]
        cols = [pick(rng, list(COLOURS), set(bg["colours"])) for _ in range(n)]
        objs = [{"shape": shape, "colour": c, "size": "small", "cell": list(cell)} for c, cell in zip(cols, cells)]
        return {"background": bg, "objects": [jitter(rng, o) for o in objs]}
    shape = attrs.get("shape") or pick(rng, SHAPES)
    if "bg_colour" in attrs:
        colour = pick(rng, list(COLOURS), {attrs["bg_colour"]})
    else:
        colour = attrs.get("colour") or pick(rng, list(COLOURS))
    bg = _background(rng, attrs, {colour})
    if "cell" in attrs:  # Layouts: one object, small or large, at the class's cell
        o = {"shape": shape, "colour": colour, "size": pick(rng, ["small", "large"]), "cell": list(attrs["cell"])}
        return {"background": bg, "objects": [jitter(rng, o)]}
    main_size = "small" if layout == "background" else "large"
    n_extra = int(rng.integers(0, max_extra + 1)) if layout == "object" else 0
    main_cell = pick(rng, all_cells)
    # A large subject spills into the neighbouring cells: distractors stay two cells away.
    free = [c for c in all_cells if max(abs(c[0] - main_cell[0]), abs(c[1] - main_cell[1])) >= 2]
    objs = [{"shape": shape, "colour": colour, "size": main_size, "cell": list(main_cell)}]
    for cell in [free[i] for i in rng.permutation(len(free))[:n_extra]]:
        objs.append({"shape": pick(rng, SHAPES), "colour": pick(rng, list(COLOURS), set(bg["colours"]) | {colour}),
                     "size": "small", "cell": list(cell)})
    return {"background": bg, "objects": [jitter(rng, o) for o in objs]}


# ----------------------------------------------------------------------------------------------------- rendering
def _mix(rgb, target, t: float) -> tuple[int, int, int]:
    return tuple(int(round(a * (1 - t) + b * t)) for a, b in zip(rgb, target))  # type: ignore[return-value]


def render_styled(scene: dict[str, Any], size: int, style: str, rng: np.random.Generator,
                  supersample: int = 4) -> Image.Image:
    """Draw `scene` in a rendering style: normal is the benchmark's renderer (render_scene); the others are the
    shifts of the domain-generalisation sets (see DATASETS)."""
    if style == "normal":
        return render_scene(scene, size, supersample)
    side = size * supersample
    objs = scene["objects"]
    if style == "sketch":
        img = Image.new("RGB", (side, side), (205, 200, 185))  # paper dark enough for white strokes
        d = ImageDraw.Draw(img)
        for o in objs:
            draw_object(d, o["shape"], o["colour"], *object_box(o, side), o["angle"], outline=max(2, side // 28))
        return img.resize((size, size), Image.Resampling.LANCZOS)
    if style == "shift":  # other shades of the same names, backgrounds muted towards grey
        img = Image.blend(render_background(scene["background"], side), Image.new("RGB", (side, side), (128,) * 3),
                          0.45)
        d = ImageDraw.Draw(img)
        for o in objs:
            rgb = tuple(int(np.clip(c + rng.integers(-35, 36), 0, 255)) for c in ALL_COLOURS[o["colour"]])
            draw_object(d, o["shape"], rgb, *object_box(o, side), o["angle"])
        return img.resize((size, size), Image.Resampling.LANCZOS)
    if style == "rendition":  # pastel fills with dark edges on a blocky noise background (a pattern never seen)
        base = np.array(ALL_COLOURS[scene["background"]["colours"][0]], dtype=np.float32)
        noise = rng.uniform(-50, 50, size=(8, 8, 1)).astype(np.float32)
        arr = np.clip(base[None, None] + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB").resize((side, side), Image.Resampling.NEAREST)
        d = ImageDraw.Draw(img)
        for o in objs:
            draw_object(d, o["shape"], _mix(ALL_COLOURS[o["colour"]], (255, 255, 255), 0.4), *object_box(o, side),
                        o["angle"], edge=(30, 30, 30))
        return img.resize((size, size), Image.Resampling.LANCZOS)
    if style == "clutter":  # 4-6 small distractors anywhere (over the subject too), then 1-2 occluding bars
        img = render_background(scene["background"], side)
        d = ImageDraw.Draw(img)
        for o in objs:
            draw_object(d, o["shape"], o["colour"], *object_box(o, side), o["angle"])
        for _ in range(int(rng.integers(4, 7))):
            draw_object(d, pick(rng, SHAPES), pick(rng, list(COLOURS)), float(rng.uniform(0, side)),
                        float(rng.uniform(0, side)), side * 0.06, float(rng.uniform(0, 6.3)))
        for _ in range(int(rng.integers(1, 3))):
            y = float(rng.uniform(0.3, 0.7)) * side
            d.line([(0, y + rng.uniform(-0.2, 0.2) * side), (side, y + rng.uniform(-0.2, 0.2) * side)],
                   fill=(90, 90, 90), width=max(2, side // 14))
        return img.resize((size, size), Image.Resampling.LANCZOS)
    raise ValueError(f"unknown style {style!r}")


def pixel_hash(img: Image.Image) -> str:
    """sha256 of the decoded RGB pixels and the size: the same image whatever file format holds it."""
    arr = np.asarray(img.convert("RGB"))
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------- writing
SPLIT_TAGS = {"train": 1, "val": 2, "test": 3}


def item_rng(seed: int, name: str, split: str, label: int, index: int) -> np.random.Generator:
    # One stream per image (tag 11: the few-shot sets; the benchmark's streams use tags 1-5).
    return np.random.default_rng([seed, 11, zlib.crc32(name.encode()), SPLIT_TAGS[split], label, index])


def set_hash(p: FewShotParams, name: str) -> str:
    """What one set depends on: a set is remade when this changes."""
    keep = {k: v for k, v in dataclasses.asdict(p).items() if k != "datasets"}
    return json_sha256({"version": FEWSHOT_VERSION, "name": name, "spec": dataclasses.asdict(DATASETS[name]),
                        **keep})[:16]


def _make_set(p: FewShotParams, name: str, folder: Path) -> dict[str, Any]:
    spec = DATASETS[name]
    cls = classes(name)
    names = [classname(c) for c in cls]
    counts = {"train": p.train_per_class, "val": p.val_per_class, "test": p.test_per_class}
    if spec.kind == "dg":
        counts.update(train=0, val=0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    hashes: dict[str, str] = {}
    for sp, n in counts.items():
        (folder / "images" / sp).mkdir(parents=True, exist_ok=True)
        for label, attrs in enumerate(cls):
            for i in range(n):
                rng = item_rng(p.seed, name, sp, label, i)
                img = render_styled(class_scene(rng, spec_of(name).layout, attrs), p.image_size, spec.style, rng)
                rel = f"{sp}/{label:03d}_{i:04d}.png"
                img.save(folder / "images" / rel)
                hashes[rel] = pixel_hash(img)
                split[sp].append([rel, label, names[label]])
    (folder / f"split_zhou_{name}.json").write_text(json.dumps(split))
    info = {"name": name, "kind": spec.kind, "variant_of": spec.variant_of, "style": spec.style,
            "about": spec.about, "factors": [spec_of(name).rows[0], spec_of(name).cols[0]],
            "classnames": names, "n_base": (len(names) + 1) // 2,
            "counts": {k: len(v) for k, v in split.items()}, "set_hash": set_hash(p, name), "pixel_hashes": hashes}
    atomic_write_json(folder / "fewshot_manifest.json", info)
    return info


def read_set_manifest(folder: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / "fewshot_manifest.json").read_text())
    except (OSError, ValueError):
        return None


def generate_fewshot(p: FewShotParams, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Write every set of `p.datasets` under `out_dir` (see the module docstring). Resumable: a set whose folder
    holds a manifest with the same params hash is kept; others are (re)made in a temp folder and renamed in."""
    from tqdm import tqdm

    p.validate()
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:  # left by a killed run (sets no longer asked too)
        shutil.rmtree(stale, ignore_errors=True)
    for extra in [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in p.datasets]:
        shutil.rmtree(extra)  # a set no longer asked for
    sets, made = {}, []
    quiet = not progress or os.environ.get("CAMPE_NO_PROGRESS") == "1"
    for name in tqdm(p.datasets, desc="few-shot sets", unit="set", disable=quiet):
        folder = root / name
        info = read_set_manifest(folder)
        if info is None or info.get("set_hash") != set_hash(p, name):
            with atomic_dir(folder) as tmp:
                info = _make_set(p, name, tmp)
            made.append(name)
        sets[name] = {k: v for k, v in info.items() if k != "pixel_hashes"}
    summary = {"version": FEWSHOT_VERSION, "params": dataclasses.asdict(p), "datasets": sets}
    atomic_write_json(root / "manifest.json", summary)  # the same whether resumed or not
    return {**summary, "made": made}


def fewshot_pixel_hashes(root: str | Path) -> set[str]:
    """Every image's pixel hash over the sets under `root` (the pretraining data must avoid them)."""
    out: set[str] = set()
    for m in sorted(Path(root).glob("*/fewshot_manifest.json")):
        out |= set(json.loads(m.read_text())["pixel_hashes"].values())
    return out
