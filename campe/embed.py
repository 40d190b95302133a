"""Batched, no-grad embeddings from a trained CLIPModel, for evaluation.

    from campe.embed import Embedder
    emb = Embedder(model, text_batch=lambda caps: model.text_tower.tokenize(caps))
    img = emb.images(paths)            # [N, D] L2-normalised
    vid = emb.videos(mp4_paths)        # [N, D] from `frames` evenly sampled frames
    txt, seg = emb.texts(captions)     # [M, D], and [M, K, D/K] segments (None for towers without prompts)
    pat = emb.patches(paths)           # [N, P, D] per-patch embeddings (for per-aspect maps)

`text_batch` turns a list of captions into whatever the model's text tower takes (token ids for the vanilla tower,
a prompt layout for the multi-prompt tower); the embedder does not need to know which.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from campe.evaldata import sample_frames


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """uint8 [B, 3, size, size]; images of another size are resized (bicubic) to the model's input size."""
    arrs = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arrs.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


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
    def images(self, paths: Sequence[str]) -> torch.Tensor:
        out = [self.model.encode_image(load_images(paths[i:i + self.batch_size], self.image_size))
               for i in self._chunks(len(paths), "images")]
        return torch.cat(out).float()

    @torch.no_grad()
    def patches(self, paths: Sequence[str]) -> torch.Tensor:
        return self.model.encode_patches(load_images(paths, self.image_size)).float()

    @torch.no_grad()
    def videos(self, paths: Sequence[str]) -> torch.Tensor:
        out = []
        step = max(1, self.batch_size // self.frames)
        for i in tqdm(range(0, len(paths), step), desc="embed videos", unit="batch",
                      disable=not self.progress or len(paths) <= step):
            clips = []
            for p in paths[i:i + step]:
                frames = sample_frames(p, self.frames)  # [T, H, W, 3] uint8
                t = torch.from_numpy(frames).permute(0, 3, 1, 2)
                if t.shape[-1] != self.image_size or t.shape[-2] != self.image_size:
                    t = torch.nn.functional.interpolate(t.float(), size=(self.image_size,) * 2, mode="bicubic",
                                                        align_corners=False).clamp(0, 255).to(torch.uint8)
                clips.append(t)
            out.append(self.model.encode_video(torch.stack(clips)))
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
