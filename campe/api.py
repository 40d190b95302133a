"""Use a trained campe model from Python: embeddings, similarities, aspect re-weighting.

    import campe
    m = campe.load("data/models/campe")                  # a `campe train` out_dir (model.pt + train_config.json)
    m = campe.load("runs:/<run id>/model", tracking_uri="sqlite:///mlflow.db")   # or the MLflow Model of a run
    txt = m.encode_text(["a red circle on a blue background"])    # [N, D] float32, L2-normalised
    img = m.encode_image(["a.jpg", pil_image])                     # [N, D]: paths, PIL images, or uint8 [N,3,S,S]
    vid = m.encode_video(["clip.mp4"])                             # [N, D] from m.frames evenly sampled frames
    s = m.similarity(images, texts)                                # [N_images, N_texts] cosine similarities
    s = m.similarity(images, texts, aspect_weights=[2, 1, 1, 1, 1, 0])   # sum_k w_k <v_k, t_k> over K segments
    m.n_aspects                                                    # K prompt segments (None: a vanilla tower)
    m.transform(pil_image)                                         # uint8 [3, S, S]: the model's image preprocessing

The numbers are `campe evaluate`'s: the same checkpoint loader (campe.train.checkpoint.load_trained_model), the same
batched embedder (campe.embed.Embedder) with the same preprocessing (campe.data.imageprep), and for similarity the
re-weighting of campe.core.retrieval. `clip_benchmark_model(m)` adapts a model to CLIP_benchmark's evaluators.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from campe.data.imageprep import decode_image, preprocess_image
from campe.embed import Embedder
from campe.train.checkpoint import FINAL, load_trained_model

CONFIG = "train_config.json"
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
CHECKPOINT_ARTIFACT = "checkpoint"  # the out_dir files inside a logged MLflow Model (artifacts/checkpoint/)


class NotACampeModel(ValueError):
    """A path or URI that holds no trained campe model."""


def find_checkpoint(path: str | Path) -> Path:
    """The folder holding model.pt + train_config.json: `path` itself, or the checkpoint inside an MLflow Model
    folder (MLmodel + artifacts/checkpoint/). NotACampeModel naming the folder and the fix otherwise."""
    path = Path(path)
    for cand in (path, path / "artifacts" / CHECKPOINT_ARTIFACT):
        if (cand / FINAL).is_file() and (cand / CONFIG).is_file():
            return cand
    if not path.exists():
        what = "does not exist"
    elif not path.is_dir():
        what = "is a file, not a model folder"
    else:
        what = f"is not a campe model: it has no {FINAL} and {CONFIG}"
    raise NotACampeModel(f"{path} {what}; give the out_dir of a finished `campe train` (train.out_dir, e.g. "
                         f"data/models/campe) or an MLflow Model of a training run (runs:/<run id>/model)")


def resolve(path_or_uri: str | Path, tracking_uri: str | None = None) -> Path:
    """A local folder, or an MLflow URI (runs:/, models:/) downloaded from `tracking_uri` (None: MLflow's default,
    MLFLOW_TRACKING_URI) -> the checkpoint folder (find_checkpoint)."""
    s = str(path_or_uri)
    if s.startswith(MLFLOW_SCHEMES):
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        try:
            with tracking_store(tracking_uri):  # MLflow resolves runs:/ and models:/ through the global store
                local = mlflow.artifacts.download_artifacts(artifact_uri=s)
        except MlflowException as e:
            store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "the default store"
            raise NotACampeModel(f"{s}: not found in {store} ({str(e).splitlines()[0]}); pass tracking_uri= the "
                                 f"store of the training run (train.tracking_uri, e.g. sqlite:///mlflow.db)") from None
        return find_checkpoint(local)
    return find_checkpoint(s)


@contextlib.contextmanager
def tracking_store(uri: str | None):
    """MLflow's process-wide tracking and registry URIs set to `uri` for a block (None: left as they are), then put
    back: the rest of campe names its store explicitly (MlflowClient(tracking_uri=...))."""
    if not uri:
        yield
        return
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # MLflow also exports them for subprocesses
    before = (tracking._tracking_uri, registry._registry_uri, {k: os.environ.get(k) for k in keys})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        registry._registry_uri = before[1]
        for k, v in before[2].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class CampeModel:
    """A trained model with batched, no-grad encoders (see the module docstring). `model`: the CLIPModel itself."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 256,
                 frames: int | None = None, progress: bool = False):
        self.folder = Path(folder)
        self.model, self.config = load_trained_model(self.folder, device=device)
        self.device = torch.device(device)
        self.frames = int(frames or self.config.model.frames)
        # Both text towers take a list of captions, as in `campe evaluate` (stages/evaluate.py run_stage).
        self._embedder = Embedder(self.model, text_batch=lambda captions: captions, batch_size=batch_size,
                                  frames=self.frames, progress=progress)
        self.image_size = self._embedder.image_size
        self.transform = functools.partial(_to_tensor, size=self.image_size)
        # K prompt segments of a multi-prompt (single prompt, DeFo) tower; None for vanilla, mean and last-token.
        self.n_aspects: int | None = getattr(getattr(self.model.text, "cfg", None), "n_prompts", None) or None
        self.embed_dim = int(self.model.cfg.embed_dim)

    def __repr__(self) -> str:
        return (f"CampeModel({str(self.folder)!r}, method={self.config.method!r}, embed_dim={self.embed_dim}, "
                f"n_aspects={self.n_aspects}, image_size={self.image_size})")

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """[N, D] L2-normalised text embeddings (K concatenated D/K segments for a multi-prompt model)."""
        return self._embedder.texts([texts] if isinstance(texts, str) else list(texts))[0]

    def encode_image(self, images: Any) -> torch.Tensor:
        """[N, D] L2-normalised. images: paths, PIL images (mixed is fine), one of them, or a uint8 tensor
        [N, 3, S, S] / [3, S, S] already through `transform`."""
        if isinstance(images, torch.Tensor):
            batch = images.unsqueeze(0) if images.ndim == 3 else images
            return self._encode_batches(batch)
        items = [images] if _is_one_image(images) else list(images)
        if all(isinstance(x, (str, Path)) for x in items):
            return self._embedder.images([str(x) for x in items])  # exactly evaluate's path
        return self._encode_batches(torch.stack([self.transform(x) for x in items]) if items else
                                    torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8))

    def encode_video(self, paths: str | Path | Sequence[str | Path]) -> torch.Tensor:
        """[N, D] L2-normalised, from `frames` evenly sampled frames of each video file."""
        items = [paths] if isinstance(paths, (str, Path)) else list(paths)
        return self._embedder.videos([str(p) for p in items])

    def similarity(self, images: Any, texts: str | Sequence[str], aspect_weights: Sequence[float] | None = None
                   ) -> torch.Tensor:
        """[N_images, N_texts]: cosine similarity, or with aspect_weights (K weights, one per prompt segment) the
        re-weighted sum_k w_k <v_k, t_k> that `campe evaluate` ranks with (evaluate.aspect_weights)."""
        img = images if _is_embedding(images, self.embed_dim) else self.encode_image(images)
        txt = self.encode_text(texts)
        if aspect_weights is not None:
            from campe.core.retrieval import aspect_scale

            if self.n_aspects is None:
                raise ValueError("aspect_weights need a model whose text tower gives prompt segments (multi-prompt, "
                                 f"single prompt, DeFo); this one is {self.config.method!r}")
            if len(aspect_weights) != self.n_aspects:
                raise ValueError(f"aspect_weights has {len(aspect_weights)} weights but the model has "
                                 f"K={self.n_aspects} prompt segments: give one weight per segment")
            img = img * aspect_scale(img.shape[1], aspect_weights, self.n_aspects)
        return img @ txt.T

    @torch.no_grad()
    def _encode_batches(self, batch: torch.Tensor) -> torch.Tensor:
        size = self._embedder.batch_size
        out = [self.model.encode_image(batch[i:i + size].to(self.device)) for i in range(0, len(batch), size)]
        return torch.cat(out).float().cpu() if out else torch.empty((0, self.embed_dim))


def load(path_or_uri: str | Path, device: str | torch.device = "cpu", batch_size: int = 256,
         frames: int | None = None, tracking_uri: str | None = None, progress: bool = False) -> CampeModel:
    """A trained campe model: a `campe train` out_dir, an MLflow Model folder, or runs:/<id>/model / models:/NAME/V
    from `tracking_uri`. batch_size: images/captions per forward pass (evaluate.batch_size gives its numbers bit
    for bit); frames: video frames sampled (default: the model's). NotACampeModel when it holds no model."""
    return CampeModel(resolve(path_or_uri, tracking_uri), device=device, batch_size=batch_size, frames=frames,
                      progress=progress)


def _to_tensor(image: Any, size: int) -> torch.Tensor:
    """A PIL image, an image file or encoded bytes -> uint8 [3, size, size] (campe.data.imageprep)."""
    if isinstance(image, (str, Path, bytes)):
        return decode_image(image, size)
    return preprocess_image(image, size)


def _is_one_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, (str, Path, bytes, Image.Image))


def _is_embedding(x: Any, dim: int) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 2 and x.shape[1] == dim


# ------------------------------------------------------------------------------------------------ CLIP_benchmark
class _Captions(list):
    """What CLIP_benchmark's evaluators expect of a tokenizer's output (`.to(device)`): the captions themselves."""

    def to(self, device: Any) -> "_Captions":
        return self


class _ClipBenchmarkModel(torch.nn.Module):
    def __init__(self, m: CampeModel):
        super().__init__()
        self.campe = m

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.campe.encode_image(images)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        return self.campe.encode_text(list(captions))


def clip_benchmark_model(m: CampeModel) -> tuple[torch.nn.Module, Any, Any]:
    """(model, transform, tokenizer) as CLIP_benchmark's evaluators take them (its `load_clip` triple): the
    transform gives uint8 [3, S, S] (the model normalises), the tokenizer passes captions through. Run its
    evaluators with amp=False (autocast would change the numbers on CPU)."""
    return _ClipBenchmarkModel(m), m.transform, _Captions
