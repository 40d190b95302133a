"""Image-caption pairs for pretraining the small frozen CLIP that the embedded AttriPrompt benchmark uses.

    from campe.data.synth_pretrain import pretrain_pairs
    images, captions, skipped = pretrain_pairs(seed=0, n=12000, size=32, exclude=fewshot_pixel_hashes(root))

As web data would: every attribute combination of the generator's full vocabulary (the few-shot sets' classes among
them), each image with several captions from many templates (the benchmark's caption grammar, plus the short noun
phrases web alt-texts use, counts and positions), a few sketches and drawings. Drawn from its own RNG streams (tag
12) with continuous pose jitter, and any image whose pixels equal a few-shot image (`exclude`, pixel hashes) is
skipped, so the pretraining data is disjoint from every few-shot set by content.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from campe.data.synth_fewshot import BASIC, COUNT_NAMES, PATTERNS, class_scene, classname, pixel_hash, render_styled
from campe.data.synth_scenes import (ALL_COLOURS, EXTRA_SHAPES, POSITIONS, PREFIXES, SHAPES, article,
                                     background_phrase, make_captions, pick)

ALL_SHAPES = SHAPES + EXTRA_SHAPES
STYLE_PREFIX = {"sketch": ["a sketch of ", "a line drawing of ", "an outline of "],
                "rendition": ["a painting of ", "a drawing of ", "a cartoon of "]}


def _attrs(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """A random layout and class-like attributes over the whole vocabulary."""
    r = rng.random()
    if r < 0.5:
        return "object", {"shape": pick(rng, ALL_SHAPES), "colour": pick(rng, list(ALL_COLOURS))}
    if r < 0.65:
        return "object", {"shape": pick(rng, ALL_SHAPES), "colour": pick(rng, list(ALL_COLOURS)),
                          "cell": list(pick(rng, list(POSITIONS)))}
    if r < 0.8:
        return "count", {"count": int(rng.integers(1, 4)), "shape": pick(rng, ALL_SHAPES)}
    if r < 0.9:
        return "background", {"pattern": pick(rng, PATTERNS), "bg_colour": pick(rng, BASIC)}
    return "scene", {"colour": pick(rng, list(ALL_COLOURS)), "pattern": pick(rng, PATTERNS)}


def _short_captions(scene: dict[str, Any], attrs: dict[str, Any]) -> list[str]:
    """Alt-text-like phrases: the class-style noun phrase and its parts."""
    main, bg = scene["objects"][0], scene["background"]
    out = [classname(attrs)]
    if "count" in attrs:
        n = attrs["count"]
        out.append(f"{classname(attrs)} on {background_phrase(bg)}")
    elif "bg_colour" not in attrs:
        out += [f"{main['colour']} {main['shape']}", main["shape"], f"{main['colour']} shape on a {bg['kind']} "
                                                                     f"background"]
    out.append(background_phrase(bg).split(" ", 1)[1])  # without its article
    return out


def pretrain_item(seed: int, index: int) -> tuple[dict[str, Any], str, list[str], np.random.Generator]:
    """(scene, style, captions, rng) of pretraining item `index`."""
    rng = np.random.default_rng([seed, 12, index])
    layout, attrs = _attrs(rng)
    scene = class_scene(rng, layout, attrs)
    r = rng.random()
    style = "sketch" if r < 0.05 else "rendition" if r < 0.1 else "normal"
    caps = [c["caption"] for c in make_captions(scene, 3, rng)] if style == "normal" else []
    for short in _short_captions(scene, attrs):
        pre = pick(rng, STYLE_PREFIX[style] if style != "normal" else PREFIXES)
        counted = short.split()[0] in COUNT_NAMES.values()
        caps.append(pre + (short if counted or (not pre and rng.random() < 0.3) else article(short)))
    return scene, style, caps, rng


def pretrain_pairs(seed: int, n: int, size: int, exclude: set[str] = frozenset(),
                   progress: bool = False) -> tuple[np.ndarray, list[list[str]], int]:
    """n images [n, size, size, 3] uint8, their captions, and how many items were skipped for being in `exclude`."""
    from tqdm import tqdm

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[list[str]] = []
    index = skipped = 0
    with tqdm(total=n, desc="pretraining pairs", unit="img", disable=not progress) as bar:
        while len(captions) < n:
            scene, style, caps, rng = pretrain_item(seed, index)
            index += 1
            img = render_styled(scene, size, style, rng)
            if exclude and pixel_hash(img) in exclude:
                skipped += 1
                continue
            images[len(captions)] = np.asarray(img)
            captions.append(caps)
            bar.update()
    return images, captions, skipped

