"""Locked-image feature cache: a frozen backbone's spatial features of every image, computed once (fp16 shards).

    from campe.data.feature_cache import FeatureStore, image_keys
    store = FeatureStore.open(folder, manifest)    # a new folder, or one whose manifest matches (else an error)
    keys = image_keys(images)                      # uint8/float [B,3,H,W] -> B content keys (sha256)
    new = store.missing(keys)                      # the keys no finished shard holds
    store.add(keys, feats)                         # feats [B,P,C]: one more shard, written atomically
    feats = store.lookup(keys)                     # [B,P,C] float32 (FeatureCacheMissError naming the first miss)

campe.locked runs the backbone (`build_feature_cache` fills a store from the train shards and the eval sets);
this module only stores and finds the features, so it knows nothing about the network.

Layout (the text cache's conventions, campe.text.cache_shards):
    <folder>/manifest.json          what the features depend on: backbone, weights file sha256, package version,
                                    input size, token grid, channels, storage dtype, format
    <folder>/shard-NNNNN.parquet    rows (key, features: raw little-endian float16 bytes of [P,C]); written to a
                                    hidden temp name, fsynced and renamed (campe.core.io.atomic_file), so a file
                                    with the final name is complete; page checksums on
A key is the sha256 of the image exactly as the tower receives it (uint8 [3,H,W] and its shape): the store is
content-addressed, so the train shards, the val/test images and the zero-shot folders share one store, and a
re-download that reorders samples changes nothing. Resumable: a killed build leaves finished shards only (plus a
temp file that the next build removes); the next build computes only the images no shard holds.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from campe.core.io import atomic_file, atomic_write_json


FEATURE_FORMAT = 1
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.parquet"
DTYPES = {"float16": torch.float16}
META_KEY = "campe_features"
# Manifest fields that must match for the features to be used (the rest is informational).
COMPARED = ("format", "backbone", "weights_sha256", "input_size", "grid", "channels", "dtype", "image_size")


class FeatureCacheError(ValueError):
    """The feature cache cannot be used as it is; the message says why and what to do."""


class FeatureCacheMissError(FeatureCacheError, KeyError):
    """An image has no cached features (a locked training step never runs the backbone)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def image_keys(images: torch.Tensor) -> list[str]:
    """[B,3,H,W] uint8 in [0,255] or float in [0,1] (x = u / 255, as the loaders give) -> B sha256 hex keys of the
    uint8 image and its shape."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B,3,H,W], got {list(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.detach().float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    arr = images.cpu().contiguous().numpy()
    shape = f"{arr.shape[1]}x{arr.shape[2]}x{arr.shape[3]};".encode()
    return [hashlib.sha256(shape + a.tobytes()).hexdigest() for a in arr]


def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pa, pq


class FeatureStore:
    """The features of one cache folder, all in memory ([N,P,C] float16; 3750 images of 16x1280: 150 MB)."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = folder, manifest
        self.grid, self.channels = int(manifest["grid"]), int(manifest["channels"])
        self.index: dict[str, int] = {}
        self.chunks: list[torch.Tensor] = []
        self._flat: torch.Tensor | None = None
        self.shards = 0

    @classmethod
    def open(cls, folder: str | Path, manifest: dict[str, Any]) -> FeatureStore:
        """Open (or create) the store at `folder` for features described by `manifest`; a folder made for other
        weights or sizes is a FeatureCacheError naming each differing field."""
        folder = Path(folder)
        path = folder / MANIFEST
        if path.exists():
            found = json.loads(path.read_text())
            diff = [f"{k} (cache: {found.get(k)!r}, now: {manifest.get(k)!r})" for k in COMPARED
                    if found.get(k) != manifest.get(k)]
            if diff:
                raise FeatureCacheError(f"feature cache {folder} was made for another image backbone: "
                                        f"{'; '.join(diff)}; delete it or point train.image_features_dir elsewhere")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, manifest)
        store = cls(folder, manifest)
        for shard in sorted(folder.glob(SHARD_GLOB)):
            store._read_shard(shard)
        return store

    def __len__(self) -> int:
        return len(self.index)

    def _read_shard(self, path: Path) -> None:
        _, pq = _pa()
        P, C = self.grid * self.grid, self.channels
        try:
            table = pq.read_table(path)
            keys = table.column("key").to_pylist()
            blobs = table.column("features").to_pylist()
            feats = torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.float16).copy()).view(len(keys), P, C)
        except Exception as e:  # pyarrow raises OSError / ArrowInvalid for a truncated or corrupt file
            raise FeatureCacheError(f"feature shard {path} is corrupt ({type(e).__name__}: {e}); delete it and "
                                    f"build again (the other shards are kept)") from None
        self._append(keys, feats)

    def _append(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        """Index one shard's rows (fp16 [n,P,C]) after those held; a key already held keeps its first row."""
        base = sum(len(c) for c in self.chunks)
        for i, k in enumerate(keys):
            self.index.setdefault(k, base + i)
        self.chunks.append(feats)
        self._flat = None
        self.shards += 1

    def remove_stale(self) -> int:
        """Delete the temp files of a killed build (only the folder's one writer may call this); returns how many."""
        n = 0
        for stale in self.folder.glob(".shard-*.tmp"):
            stale.unlink(missing_ok=True)
            n += 1
        return n

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The distinct keys without features, in first-seen order."""
        return list(dict.fromkeys(k for k in keys if k not in self.index))

    def add(self, keys: Sequence[str], feats: torch.Tensor) -> Path:
        """Store feats [n,P,C] of `keys` as one new shard (atomic); returns its path."""
        pa, pq = _pa()
        P, C = self.grid * self.grid, self.channels
        if tuple(feats.shape) != (len(keys), P, C):
            raise ValueError(f"features are {list(feats.shape)}, expected [{len(keys)}, {P}, {C}]")
        f16 = feats.detach().to("cpu", torch.float16).contiguous()
        blobs = [row.numpy().tobytes() for row in f16.view(len(keys), -1)]
        table = pa.table({"key": list(keys), "features": blobs},
                         schema=pa.schema([("key", pa.string()), ("features", pa.binary())]))
        meta = {"rows": len(keys), "grid": self.grid, "channels": C, "dtype": "float16"}
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta)})
        taken = {p.name for p in self.folder.glob(SHARD_GLOB)}
        n = len(taken)
        while f"shard-{n:05d}.parquet" in taken:
            n += 1
        path = self.folder / f"shard-{n:05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="none", write_page_checksum=True)
        with atomic_file(path) as f:
            f.write(buf.getvalue())
        self._append(keys, f16)
        return path

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """[B,P,C] float32 features of `keys` (FeatureCacheMissError naming the first key without any)."""
        idx = []
        for k in keys:
            i = self.index.get(k)
            if i is None:
                raise FeatureCacheMissError(
                    f"image {k[:12]}... has no features in {self.folder}: build the cache over every image the run "
                    f"reads (campe.locked.build_feature_cache; campe train does it for the train shards)")
            idx.append(i)
        # Stored data, not computation: outside autocast (CPU autocast refuses torch.cat on float16 tensors, and a
        # bf16 training step would otherwise get bf16 features instead of the stored values widened to float32).
        with torch.autocast("cpu", enabled=False):  # the chunks live on the CPU
            if self._flat is None:
                self._flat = torch.cat(self.chunks) if self.chunks else torch.empty(0, self.grid ** 2,
                                                                                     self.channels,
                                                                                     dtype=torch.float16)
            return self._flat[torch.tensor(idx, dtype=torch.long)].float()
