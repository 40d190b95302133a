"""The embedded default benchmark's videos: an object moving, growing, shrinking, spinning or changing colour.

    from campe.data.synth_video import sample_clip, render_clip, make_video_captions, write_mp4
    (campe.data.synth.generate writes them; the scenes they are drawn from: campe.data.synth_scenes)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from campe.data.synth_scenes import (COLOURS, SHAPES, article, background_phrase, draw_object, pick,
                                     render_background, sample_background)


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
    shape = pick(rng, SHAPES)
    motion = pick(rng, MOTIONS, {"spin"} if shape == "circle" else set())  # a spinning circle looks still
    colour = pick(rng, list(COLOURS), set(bg["colours"]))
    clip: dict[str, Any] = {"background": bg, "motion": motion,
                            "subject": {"shape": shape, "colour": colour, "size": "large"}}
    if motion == "recolour":
        clip["to_colour"] = pick(rng, list(COLOURS), set(bg["colours"]) | {colour})
    if rng.random() < 0.5:
        clip["still"] = {"shape": pick(rng, SHAPES, {shape}),
                         "colour": pick(rng, list(COLOURS), set(bg["colours"])), "size": "small"}
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
            draw_object(d, clip["still"]["shape"], clip["still"]["colour"], 0.15 * side, 0.15 * side, 0.1 * side)
        draw_object(d, s["shape"], colour, cx * side, cy * side, r * side, angle)
        out.append(np.asarray(img.resize((size, size), Image.Resampling.LANCZOS)))
    return out


def make_video_captions(clip: dict[str, Any], n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    s, m = clip["subject"], clip["motion"]
    subj_full, subj_bare = article(f"{s['colour']} {s['shape']}"), article(s["shape"])
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
        options.append((f"{subj_full} {verbs[0]} while {article(still['colour'] + ' ' + still['shape'])} stays still",
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
