"""Sources of training batches: in-memory pairs, or the shards (cached frozen states or online) per rank.

    from campe.train.sources import MemoryPairs, CachedPairs
    source = MemoryPairs(images_uint8, captions)            # or MemoryPairs.from_shards(shards_dir, image_size)
    source.batches_per_epoch(batch_size); source.epoch_batches(epoch, batch_size, seed, rank, world_size, start)

The batch order is a function of (seed, epoch) only, so a resumed run sees the batches it would have seen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from campe.data.imageprep import ImageDecodeError, SkippedSample, decode_image


# ---------------------------------------------------------------------------------------------------- data
class MemoryPairs:
    """All (image, caption) pairs in memory; the batch order is a function of (seed, epoch) only.

    images: uint8 [N,3,H,W] (or float in [0,1]); captions: N strings. Each epoch is a seeded permutation cut into
    global batches of batch_size (the last partial one dropped); rank r takes rows r*b:(r+1)*b of each, b =
    batch_size / world_size, so ranks together see exactly what one process would see.
    """

    def __init__(self, images: torch.Tensor, captions: Sequence[str], keys: Sequence[str] | None = None):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N,3,H,W], got {list(images.shape)}")
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        self.images, self.captions = images, list(captions)
        self.keys = list(keys) if keys is not None else [str(i) for i in range(len(self.captions))]
        self.skipped: list[SkippedSample] = []  # samples left out when loading (from_shards)
        self.total_samples = len(self.captions)  # samples of the data, those left out included

    def __len__(self) -> int:
        return len(self.captions)

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                      start: int = 0) -> Iterator[dict[str, Any]]:
        """Batches start.. of `epoch`: {"images" [b,3,H,W], "captions" [b], "keys" [b]} (b = this rank's rows)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self), generator=g)
        b = batch_size // world_size
        for i in range(start, self.batches_per_epoch(batch_size)):
            idx = perm[i * batch_size + rank * b: i * batch_size + (rank + 1) * b]
            yield {"images": self.images[idx], "captions": [self.captions[j] for j in idx.tolist()],
                   "keys": [self.keys[j] for j in idx.tolist()]}

    @classmethod
    def from_shards(cls, root: str | Path, image_size: int | None = None) -> MemoryPairs:
        """Every sample of the download stage's finished shards (campe.data.shards), decoded once
        (campe.data.imageprep). A sample whose image does not decode is left out and listed in `.skipped` (the
        training loop counts it)."""
        import webdataset as wds

        from campe.data.shards import shard_paths
        paths = shard_paths(root)
        if not paths:
            raise FileNotFoundError(f"{root}: no finished shards (run `campe download` first)")
        images, captions, keys, skipped, total = [], [], [], [], 0
        for s in wds.WebDataset(paths, shardshuffle=False, empty_check=False):  # raw bytes: decoded below
            data = s.get("jpg")
            if data is None or "txt" not in s:
                raise ValueError(f"{root}: sample {s.get('__key__')} has no jpg/txt; expected the download "
                                 f"stage's KEY.jpg / KEY.txt / KEY.json shards")
            total += 1
            caption = s["txt"].decode("utf-8")
            if not caption.strip():
                continue  # a blank caption: no data, as for the LM methods (campe.data.shards.sample_caption)
            try:
                img = decode_image(data)  # uint8 [3,H,W]
            except ImageDecodeError as e:
                skipped.append(SkippedSample(s["__url__"], s["__key__"], f"undecodable image ({e})"))
                continue
            if image_size is not None and tuple(img.shape[1:]) != (image_size, image_size):
                raise ValueError(f"{root}: images are {img.shape[2]}x{img.shape[1]} but model.image_size is "
                                 f"{image_size}; set model.image_size to {img.shape[1]} or download at "
                                 f"image_size {image_size}")
            images.append(img)
            captions.append(caption)
            keys.append(s["__key__"])
        if not images:
            raise ValueError(f"{root}: no sample has a decodable image ({len(skipped)} undecodable, e.g. "
                             f"{[x.id for x in skipped[:3]]})")
        pairs = cls(torch.stack(images), captions, keys)
        pairs.skipped, pairs.total_samples = skipped, total
        return pairs

    def take_skips(self) -> list[SkippedSample]:
        """The samples left out (the training loop counts them once; later calls give them again, harmlessly)."""
        return list(self.skipped)


class CachedPairs:
    """campe.train.data's training data: image shards zipped with their cached frozen LM states (cache_dir), or with the
    token layouts only (cache_dir None: online). Each rank reads its own shards (campe.train.data.open_training_data).
    Samples whose image does not decode are left out of the batches; take_skips() hands them to the training
    loop."""

    def __init__(self, shards_dir: str, cache_dir: str | None, encoder: Any, num_workers: int = 0,
                 keep_in_memory: bool = False):
        from campe.train.data import open_training_data
        self._open = open_training_data
        self.shards_dir, self.cache_dir, self.encoder, self.num_workers = shards_dir, cache_dir, encoder, num_workers
        self._memory: dict[str, list] | None = {} if keep_in_memory else None  # (num_workers 0: TrainParams)
        # Opening checks the cache against the encoder (CacheMismatchError names the differing field): fail now.
        self._all = open_training_data(shards_dir, cache_dir, encoder, rank=0, world_size=1, shuffle_seed=0, epoch=0)
        self._skipped: list[SkippedSample] = []

    @property
    def total_samples(self) -> int:
        return self._all.total_samples

    def take_skips(self) -> list[SkippedSample]:
        """The samples left out since the last call, from the batches read so far."""
        out, self._skipped = self._skipped, []
        return out

    def batches_per_epoch(self, batch_size: int) -> int:
        """Global batches in an epoch over all shards (with DDP a rank's shards can hold a few more or fewer
        samples in a given epoch; the loop stops every rank when the first runs out)."""
        return self._all.num_samples // batch_size

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                      start: int = 0) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        from campe.train.data import BatchStream, identity
        ds = self._open(self.shards_dir, self.cache_dir, self.encoder, rank=rank, world_size=world_size,
                        shuffle_seed=seed, epoch=epoch, memory=self._memory)
        # Each worker collates full batches of decodable samples (what batch_size=b, drop_last=True would give),
        # so a skipped sample never leaves a batch short. The loader's own generator: worker seeds never draw from
        # (and never shift) the global RNG.
        loader = DataLoader(BatchStream(ds, batch_size // world_size), batch_size=None, collate_fn=identity,
                            num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        i = 0
        for batch in loader:
            self._skipped.extend(batch.pop("skipped"))
            if "images" not in batch:  # samples left out after a worker's last full batch
                continue
            if i >= start:  # resume: the same stream, the consumed batches skipped
                yield batch
            i += 1

