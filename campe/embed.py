"""Batched, no-grad embeddings from a trained CLIPModel, for evaluation.

    from campe.embed import Embedder
    emb = Embedder(model, text_batch=lambda caps: model.text_tower.tokenize(caps))
    img = emb.images(paths)            # [N, D] L2-normalised
    vid = emb.videos(mp4_paths)        # [N, D] from `frames` evenly sampled frames
    txt, seg = emb.texts(captions)     # [M, D], and [M, K, D/K] segments (None for towers without prompts)
    pat = emb.patches(paths)           # [N, P, D] per-patch embeddings (for per-aspect maps)
    maps = aspect_maps(pat, txt_n, k)  # [N, K, g, g] per-APT maps: patch segment k . text segment k (txt_n [N, D])

`text_batch` turns a list of captions into whatever the model's text tower takes (token ids for the vanilla tower,
a prompt layout for the multi-prompt tower); the embedder does not need to know which.

Images and video frames go through campe.data.imageprep.preprocess_image (the preprocessing training had: colour
conversion, aspect kept, white border as img2dataset's resize_mode "border"). An image or video that does not
decode raises (ImageDecodeError / VideoDecodeError, naming the file), or, given `on_undecodable(index, path,
reason)`, is left out of the result and reported to it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from campe.data.evaldata import VideoDecodeError, sample_frames
from campe.data.imageprep import ImageDecodeError, decode_image, preprocess_image

OnUndecodable = Callable[[int, str, str], None]  # (index in the paths given, path, reason)


def load_images(paths: Sequence[str], size: int, on_undecodable: OnUndecodable | None = None) -> torch.Tensor:
    """uint8 [B, 3, size, size] (campe.data.imageprep.preprocess_image). An undecodable image raises ImageDecodeError
    naming it, or, with `on_undecodable`, is left out (B = the decodable ones) and reported to it."""
    out = []
    for i, p in enumerate(paths):
        try:
            out.append(decode_image(p, size))
        except ImageDecodeError as e:
            if on_undecodable is None:
                raise ImageDecodeError(f"{p}: cannot decode the image ({e})") from None
            on_undecodable(i, str(p), str(e))
    if not out:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.stack(out)


def load_video(path: str, frames: int, size: int) -> torch.Tensor:
    """uint8 [frames, 3, size, size]: evenly sampled frames (campe.data.evaldata.sample_frames), each through
    preprocess_image."""
    return torch.stack([preprocess_image(f, size) for f in sample_frames(path, frames)])


def aspect_maps(patches: torch.Tensor, txt: torch.Tensor, k: int) -> torch.Tensor:
    """Per-APT maps [B, K, g, g]: <patch segment k, text segment k> over the g x g patch grid, from patches
    [B, P, D] (Embedder.patches) and one text embedding per image txt [B, D] (its K contiguous D/K segments, the
    ones aspect re-weighting scales)."""
    B, P, D = patches.shape
    if txt.shape != (B, D) or D % k:
        raise ValueError(f"aspect_maps: patches {tuple(patches.shape)} and text {tuple(txt.shape)} must share B and "
                         f"D, and k={k} must divide D")
    grid = int(round(P ** 0.5))
    if grid * grid != P:
        raise ValueError(f"aspect_maps: {P} patches do not form a square grid")
    maps = torch.einsum("bpkd,bkd->bkp", patches.reshape(B, P, k, D // k), txt.reshape(B, k, D // k))
    return maps.reshape(B, k, grid, grid)


class Embedder:
    def __init__(self, model: torch.nn.Module, text_batch: Callable[[list[str]], Any], batch_size: int = 256,
                 frames: int = 8, progress: bool = True):
        self.model, self.text_batch, self.batch_size, self.frames = model.eval(), text_batch, batch_size, frames
        self.image_size = int(model.visual.cfg.image_size)
        self.progress = progress

    def _chunks(self, n: int, what: str):
        starts = range(0, n, self.batch_size)
        return tqdm(starts, desc=f"embed {what}", unit="batch", disable=not self.progress or len(starts) < 2)

    @torch.no_grad()
    def images(self, paths: Sequence[str], on_undecodable: OnUndecodable | None = None) -> torch.Tensor:
        """[N, D] (N = the decodable images, in order; see the module docstring for on_undecodable)."""
        out = []
        for i in self._chunks(len(paths), "images"):
            report = None if on_undecodable is None else (lambda j, p, why, i=i: on_undecodable(i + j, p, why))
            batch = load_images(paths[i:i + self.batch_size], self.image_size, report)
            if len(batch):
                out.append(self.model.encode_image(batch))
        if not out:
            raise ImageDecodeError(f"none of the {len(paths)} images decodes (first: {paths[0] if paths else None})")
        return torch.cat(out).float()

    @torch.no_grad()
    def patches(self, paths: Sequence[str]) -> torch.Tensor:
        return self.model.encode_patches(load_images(paths, self.image_size)).float()

    @torch.no_grad()
    def videos(self, paths: Sequence[str], on_undecodable: OnUndecodable | None = None) -> torch.Tensor:
        """[N, D] from `frames` frames each (N = the decodable videos; see the module docstring)."""
        out = []
        step = max(1, self.batch_size // self.frames)
        for i in tqdm(range(0, len(paths), step), desc="embed videos", unit="batch",
                      disable=not self.progress or len(paths) <= step):
            clips = []
            for j, p in enumerate(paths[i:i + step]):
                try:
                    clips.append(load_video(p, self.frames, self.image_size))
                except VideoDecodeError as e:
                    if on_undecodable is None:
                        raise
                    on_undecodable(i + j, str(p), str(e))
            if clips:
                out.append(self.model.encode_video(torch.stack(clips)))
        if not out:
            raise VideoDecodeError(f"none of the {len(paths)} videos decodes (first: {paths[0] if paths else None})")
        return torch.cat(out).float()

    @torch.no_grad()
    def texts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embs, segs = [], []
        for i in self._chunks(len(captions), "texts"):
            out = self.model.encode_text(self.text_batch(list(captions[i:i + self.batch_size])))
            embs.append(out["text"].float())
            if out.get("segments") is not None:
                segs.append(out["segments"].float())
        return torch.cat(embs), (torch.cat(segs) if segs else None)
