"""The embedded default benchmark's scenes: objects on a background, drawn, and captions that each mention a
different subset of the scene's aspects.

    from campe.data.synth_scenes import sample_scene, render_scene, make_captions, SHAPES, COLOURS
    (campe.data.synth.generate writes the benchmark; the videos: campe.data.synth_video)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw


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
# Only the few-shot sets and the CLIP pretraining captions (campe/data/synth_fewshot.py) draw these: the benchmark
# above samples from SHAPES and COLOURS alone, so its scenes are unchanged.
EXTRA_SHAPES = ["pentagon", "octagon", "diamond"]
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (240, 130, 190), "brown": (130, 80, 35), "cyan": (40, 200, 215), "grey": (128, 128, 128),
}
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}


# ----------------------------------------------------------------------------------------------------------- scenes
def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per item: deterministic, order-independent, and a larger set extends a smaller one.
    tag = {"train": 1, "val": 2, "test": 3, "video-train": 4, "video-test": 5}[split]
    return np.random.default_rng([seed, tag, index])


def pick(rng: np.random.Generator, items: list, exclude: set = frozenset()) -> Any:
    pool = [x for x in items if x not in exclude]
    return pool[int(rng.integers(len(pool)))]


def sample_background(rng: np.random.Generator) -> dict[str, Any]:
    kind = pick(rng, BACKGROUNDS)
    c1 = pick(rng, list(COLOURS))
    bg = {"kind": kind, "colours": [c1]}
    if kind == "gradient":
        bg["colours"].append(pick(rng, list(COLOURS), {c1}))
    return bg


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> dict[str, Any]:
    """A scene: background + 1..max_objects objects in distinct grid cells; object 0 is the main subject."""
    bg = sample_background(rng)
    n = int(rng.integers(1, max_objects + 1))
    # The main subject is large or small; secondary objects are small, so "main" is well defined.
    main_size = pick(rng, list(SIZES))
    all_cells = list(POSITIONS)
    if main_size == "large" and n > 1:
        # A large object spills into its neighbouring cells: keep the others two cells away so nothing is occluded.
        main_cell = pick(rng, [c for c in all_cells if c != (1, 1)])
        free = [c for c in all_cells if max(abs(c[0] - main_cell[0]), abs(c[1] - main_cell[1])) >= 2]
    else:
        main_cell = pick(rng, all_cells)
        free = [c for c in all_cells if c != main_cell]
    cells = [main_cell] + [free[i] for i in rng.permutation(len(free))[: n - 1]]
    objects, used = [], set()
    for i in range(n):
        while True:
            shape = pick(rng, SHAPES)
            colour = pick(rng, list(COLOURS), set(bg["colours"]))  # never invisible on its background
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
    if shape == "pentagon":
        return ring(5, [r * 1.15], -math.pi / 2)
    if shape == "octagon":
        return ring(8, [r * 1.05], math.pi / 8)
    if shape == "diamond":
        return ring(4, [r * 1.3, r * 0.8], -math.pi / 2)
    if shape == "star":
        return ring(10, [r * 1.3, r * 0.55], -math.pi / 2)
    if shape == "cross":
        w = r * 0.38
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]
    raise ValueError(f"unknown shape {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: str | tuple[int, int, int], cx: float, cy: float,
                r: float, angle: float = 0.0, outline: int = 0, edge: tuple[int, int, int] | None = None) -> None:
    """Fill a shape with `colour` (a name or RGB); outline > 0: draw only its outline, `outline` pixels wide, in
    that colour; edge: a border of that colour around the filled shape."""
    rgb = ALL_COLOURS[colour] if isinstance(colour, str) else colour
    fill, line, width = (None, rgb, outline) if outline else (rgb, edge, max(1, int(r * 0.15)) if edge else 0)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=width)
    else:
        pts = _shape_points(shape, cx, cy, r, angle)
        if width:  # PIL's polygon outline width is drawn inwards only on closed polygons of >= 3 points
            draw.polygon(pts, fill=fill, outline=line, width=width)
        else:
            draw.polygon(pts, fill=fill)


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    # Texture uses a darker (or, for dark colours, lighter) tone of the same colour, so the colour name stays true.
    if sum(rgb) < 150:
        return tuple(int(c + (255 - c) * (1 - f) * 0.6) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * f) for c in rgb)  # type: ignore[return-value]


def render_background(bg: dict[str, Any], side: int) -> Image.Image:
    c1 = ALL_COLOURS[bg["colours"][0]]
    kind = bg["kind"]
    if kind == "gradient":
        c2 = np.array(ALL_COLOURS[bg["colours"][1]], dtype=np.float32)
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
        draw_object(d, o["shape"], o["colour"], *object_box(o, side), o.get("angle", 0.0))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def object_box(o: dict[str, Any], side: int) -> tuple[float, float, float]:
    """Centre x, y and radius in pixels of object `o` on a `side`-pixel canvas. Cell centres at 0.2/0.5/0.8 of the
    side keep large shapes inside the frame; optional jitter (dx, dy: fractions of the side; scale) moves them a
    little within their cell (the few-shot sets and the pretraining data use it; the benchmark does not)."""
    cx = (0.2 + 0.3 * o["cell"][0] + o.get("dx", 0.0)) * side
    cy = (0.2 + 0.3 * o["cell"][1] + o.get("dy", 0.0)) * side
    return cx, cy, SIZES[o["size"]] * o.get("scale", 1.0) * side


# -------------------------------------------------------------------------------------------------------- captions
def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(o: dict[str, Any], size: bool = True, colour: bool = True) -> str:
    words = ([o["size"]] if size else []) + ([o["colour"]] if colour else []) + [o["shape"]]
    return article(" ".join(words))


def background_phrase(bg: dict[str, Any]) -> str:
    c = bg["colours"]
    if bg["kind"] == "gradient":
        return f"a {c[0]} to {c[1]} gradient background"
    return article(f"{bg['kind']} {c[0]} background")


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
