"""Training data from the shards: image shards zipped with their cache shards (or token layouts, online).

    from campe.train.data import open_training_data, collate_samples
    data = open_training_data(shards_dir, cache_dir or None, encoder, rank=0, world_size=1,
                              shuffle_seed=0, epoch=0)  # -> torch IterableDataset of samples (dicts)
    loader = torch.utils.data.DataLoader(data, batch_size=B, num_workers=2, collate_fn=collate_samples,
                                         drop_last=True)
    for batch in loader:    # {"images": [B,3,H,W] float in [0,1], "text": {...tower input...}, "keys", "captions"}
        out = model(images=batch["images"], text=batch["text"])           # -> campe.core.losses.CampeObjective
    data.set_epoch(e)       # before each epoch's `iter(loader)` (not with persistent_workers: their copy of the
                            # dataset keeps its epoch), or open it again with epoch=e; same seed on every rank

- `open_training_data(shards_dir, cache_dir, encoder, rank=0, world_size=1, shuffle_seed=None, epoch=0,
  shuffle_buffer=512) -> TrainingData`: zips every image shard `<shards>/pass-NN/NNNNN.tar` with its cache shard
  `<cache>/pass-NN/NNNNN.parquet` by key (the cache is checked against the encoder first: CacheMismatchError names
  the field that differs). cache_dir=None: online mode, samples carry the token layout only. Each rank takes its
  own shards (shards[rank::world_size] of an epoch-seeded permutation shared by all ranks), each DataLoader worker
  its own part of those. shuffle_seed=None keeps file order (no shuffling). `data.num_samples` is this rank's
  sample count for the current epoch: ranks can differ by up to a shard, so with DDP all_reduce(MIN) the number of
  full batches and stop every rank there (or the ranks' collectives desynchronise). A cache made with
  `campe cache --limit N` trains on the captions it holds (the manifest records the limit); a full cache with a
  shard missing is an error. Samples without a caption (no .txt, or whitespace only) are not data. A sample whose
  image does not decode (campe.data.imageprep) is left out: the cache stage leaves it out of the cache and lists it
  in the shard's metadata, and training skips it, warning (UndecodableImageWarning) with the shard and the key.
  `data.batches(b)` gives collated batches with the samples left out since the previous one in
  batch["skipped"] (what the training loop counts, through `BatchStream` in a DataLoader).
  `memory={}` (one dict for every epoch's dataset): each shard is read and its images decoded once, then served
  from memory (the same batches; train.keep_in_memory, for many epochs over a set that fits in RAM).
- `collate_samples(samples) -> {"images": [B,3,H,W] float32 in [0,1], "text": {"hidden": [B,S,H] float16/bfloat16
  (cache dtype, right-padded), "layout": PromptLayout} ({"layout"} only in online mode), "keys": [B] str,
  "captions": [B] str}`.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from campe.data.imageprep import ImageDecodeError, SkippedSample, UndecodableImageWarning, decode_image
from campe.data.shards import image_bytes, sample_caption, shard_sample_count
from campe.text.cache_manifest import CacheCorruptError, CacheMissingError, check_manifest
from campe.text.cache_shards import cache_shard_path, iter_tar_samples, read_cache_shard, shard_meta
from campe.text.cached_tower import LayoutMaker
from campe.text.layout import PromptLayout
from campe.text.multiprompt import MultiPromptTextEncoder


# ---------------------------------------------------------------------------------------------------- training data
def _decode_image(data: bytes) -> torch.Tensor:
    """Shard image bytes -> float [3,H,W] in [0,1] (campe.data.imageprep; ImageDecodeError when undecodable)."""
    return decode_image(data).float().div_(255.0)


def zip_shard(image_shard: str, cache_shard: str | None, layout_maker: LayoutMaker | None = None
              ) -> Iterator[dict[str, Any] | SkippedSample]:
    """Samples of one image shard joined with its cache shard by key, in file order.

    Yields {"key", "shard", "caption", "jpg": bytes, "hidden": [L,H] (cache mode), "layout": PromptLayout (1 row)},
    and a SkippedSample for each sample whose image the cache stage found undecodable (its shard metadata lists
    them; they are not cached). The cache holds the tar's other samples with a caption, in the tar's order (a
    `--limit` run: a prefix of them); any other difference means the cache is not from this shard
    (CacheCorruptError).
    """
    if cache_shard is None:
        for key, parts in iter_tar_samples(image_shard):
            img, caption = image_bytes(parts), sample_caption(parts)
            if img is None or caption is None:
                continue
            yield {"key": key, "shard": image_shard, "caption": caption, "jpg": img,
                   "layout": layout_maker([caption])}
        return
    meta = shard_meta(cache_shard)
    complete = bool(meta.get("complete", True))
    undecodable = set(meta.get("undecodable", ()))
    rows = read_cache_shard(cache_shard)
    nxt = next(rows, None)
    fix = "re-run `campe cache --repair` (the image shards changed after caching, or the cache is from other shards)"
    for key, parts in iter_tar_samples(image_shard):
        img, caption = image_bytes(parts), sample_caption(parts)
        if nxt is not None and key == nxt["key"]:
            if caption is None or img is None or caption != nxt["caption"]:
                raise CacheCorruptError(f"cache shard {cache_shard}: sample {key} has another caption (or no "
                                        f"image) in {image_shard}; {fix}")
            yield {"key": key, "shard": image_shard, "caption": nxt["caption"], "jpg": img, "hidden": nxt["hidden"],
                   "layout": nxt["layout"]}
            nxt = next(rows, None)
        elif img is None or caption is None:
            continue  # not cached: no caption
        elif key in undecodable:
            yield SkippedSample(image_shard, key, "undecodable image (found by campe cache)")
        elif nxt is None and not complete:
            return  # the rest of a shard cut short by --limit
        else:
            raise CacheCorruptError(f"cache shard {cache_shard} does not match {image_shard}: image sample {key} "
                                    f"is not cached (next cached key: {nxt['key'] if nxt else 'none'}); {fix}")
    if nxt is not None:
        raise CacheCorruptError(f"cache shard {cache_shard} has key {nxt['key']} that {image_shard} lacks; {fix}")


def _predecode(s: dict[str, Any] | SkippedSample) -> dict[str, Any] | SkippedSample:
    """A sample to keep in memory: its image decoded (uint8 [3,H,W]: a quarter of the float's bytes) in place of
    the jpg bytes; one that does not decode keeps its bytes, so _finish skips it where streaming would."""
    if isinstance(s, SkippedSample):
        return s
    try:
        img = decode_image(s["jpg"])
    except ImageDecodeError:
        return s
    return {k: v for k, v in s.items() if k != "jpg"} | {"image_u8": img}


class TrainingData(torch.utils.data.IterableDataset):
    """(image, caption, cached text) samples of this rank's shards; see open_training_data.

    A sample whose image does not decode is left out: iterating warns (UndecodableImageWarning, naming the shard
    and the key); `batches()` hands it on with the batch instead (batch["skipped"]), for the training loop to count.
    """

    def __init__(self, image_shards: Sequence[str], cache_shards: Sequence[str | None],
                 layout_maker: LayoutMaker | None, pad_id: int, rank: int = 0, world_size: int = 1,
                 shuffle_seed: int | None = None, epoch: int = 0, shuffle_buffer: int = 512,
                 shard_rows: Sequence[int] | None = None, shard_left_out: Sequence[int] | None = None,
                 memory: dict[str, list] | None = None):
        super().__init__()
        self.memory = memory  # shard -> its samples with decoded images, kept across epochs (keep_in_memory)
        self.image_shards, self.cache_shards = list(image_shards), list(cache_shards)
        self.layout_maker, self.pad_id = layout_maker, pad_id
        self.rank, self.world_size = rank, world_size
        self.shuffle_seed, self.epoch, self.shuffle_buffer = shuffle_seed, epoch, shuffle_buffer
        self.shard_rows = list(shard_rows) if shard_rows is not None else [0] * len(self.image_shards)
        # Samples of each shard not in shard_rows: those the cache stage left out (no caption, undecodable image).
        self.shard_left_out = list(shard_left_out) if shard_left_out is not None else [0] * len(self.image_shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_shards(self) -> list[int]:
        """Indices of this rank's shards for the current epoch (the permutation is the same on every rank)."""
        order = list(range(len(self.image_shards)))
        if self.shuffle_seed is not None:
            random.Random(f"{self.shuffle_seed}:{self.epoch}").shuffle(order)
        return order[self.rank::self.world_size]

    @property
    def num_samples(self) -> int:
        """Samples this rank reads in the current epoch."""
        return sum(self.shard_rows[i] for i in self.rank_shards())

    @property
    def total_samples(self) -> int:
        """Samples of all shards (every rank), those without a caption or with an undecodable image included:
        what the skipped fraction is a fraction of."""
        return sum(self.shard_rows) + sum(self.shard_left_out)

    def _stream(self) -> Iterator[dict[str, Any] | SkippedSample]:
        """This worker's decoded samples, in shuffled order, with a SkippedSample in place of each left out."""
        mine = self.rank_shards()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = mine[wid::nw]
        rng = random.Random(f"{self.shuffle_seed}:{self.epoch}:{self.rank}:{wid}")
        buf: list[dict[str, Any]] = []
        size = self.shuffle_buffer if self.shuffle_seed is not None else 0
        for i in mine:
            for s in self._shard_samples(i):
                if isinstance(s, SkippedSample):
                    yield s
                    continue
                if size <= 1:
                    yield self._finish(s)
                    continue
                if len(buf) < size:
                    buf.append(s)
                    continue
                j = rng.randrange(size)
                buf[j], s = s, buf[j]
                yield self._finish(s)
        rng.shuffle(buf)
        for s in buf:
            yield self._finish(s)

    def _shard_samples(self, i: int) -> Iterator[dict[str, Any] | SkippedSample]:
        """zip_shard of shard i; with a memory, read and decoded once and then served from it (the same samples in
        the same order: only where the bytes come from differs)."""
        if self.memory is None:
            yield from zip_shard(self.image_shards[i], self.cache_shards[i], self.layout_maker)
            return
        kept = self.memory.get(self.image_shards[i])
        if kept is None:
            kept = [_predecode(s) for s in zip_shard(self.image_shards[i], self.cache_shards[i], self.layout_maker)]
            self.memory[self.image_shards[i]] = kept
        yield from kept

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for s in self._stream():
            if isinstance(s, SkippedSample):
                warnings.warn(f"skipping sample {s.key} of shard {s.where}: {s.reason}", UndecodableImageWarning,
                              stacklevel=2)
                continue
            yield s

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """collate_samples batches of `batch_size` decodable samples, the samples left out since the previous batch
        in batch["skipped"] (SkippedSample list); a last partial batch is dropped (DataLoader's drop_last), but if
        samples were left out after the last full batch a final {"skipped": [...]} carries them. Same batches as
        DataLoader(self, batch_size, drop_last=True, collate_fn=collate_samples)."""
        samples: list[dict[str, Any]] = []
        skipped: list[SkippedSample] = []
        for s in self._stream():
            if isinstance(s, SkippedSample):
                skipped.append(s)
                continue
            samples.append(s)
            if len(samples) == batch_size:
                batch = collate_samples(samples)
                batch["skipped"] = skipped
                yield batch
                samples, skipped = [], []
        if skipped:
            yield {"skipped": skipped}

    def _finish(self, s: dict[str, Any]) -> dict[str, Any] | SkippedSample:
        # Decode at the end: the shuffle buffer holds the small jpg bytes, not float images.
        s = dict(s)
        if "image_u8" in s:  # decoded when it was kept in memory
            s["image"] = s.pop("image_u8").float().div_(255.0)
        else:
            try:
                s["image"] = _decode_image(s.pop("jpg"))
            except ImageDecodeError as e:
                return SkippedSample(s["shard"], s["key"], f"undecodable image ({e})")
        s["pad_id"] = self.pad_id
        return s


class BatchStream(torch.utils.data.IterableDataset):
    """TrainingData.batches(batch_size) as a dataset, for DataLoader(BatchStream(data, b), batch_size=None,
    collate_fn=identity, num_workers=n): each worker batches its own part of the shards."""

    def __init__(self, data: TrainingData, batch_size: int):
        super().__init__()
        self.data, self.batch_size = data, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.data.batches(self.batch_size)


def identity(x: Any) -> Any:
    return x


def open_training_data(shards_dir: str | Path, cache_dir: str | Path | None, encoder: MultiPromptTextEncoder,
                       rank: int = 0, world_size: int = 1, shuffle_seed: int | None = None, epoch: int = 0,
                       shuffle_buffer: int = 512, memory: dict[str, list] | None = None) -> TrainingData:
    """The training samples of the finished image shards under `shards_dir`, each with its cached text states from
    `cache_dir` (checked against `encoder`'s manifest), or, with cache_dir=None, its token layout (online mode).
    memory: a dict shared by the epochs' datasets (in this process) that keeps each shard's samples, decoded,
    after its first read (train.keep_in_memory)."""
    from campe.data.shards import shard_paths

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    images = shard_paths(shards_dir)
    if not images:
        raise CacheMissingError(f"{shards_dir}: no finished image shards (pass-NN/NNNNN.tar with _stats.json); "
                                f"run `campe download` first")
    if len(images) < world_size:
        raise ValueError(f"{len(images)} image shard(s) in {shards_dir} for {world_size} ranks: every rank needs a "
                         f"shard; download with a smaller number_sample_per_shard or use fewer ranks")
    if cache_dir is None:
        rows = [shard_sample_count(p) for p in images]
        return TrainingData(images, [None] * len(images), LayoutMaker(encoder), encoder.pad_id, rank, world_size,
                            shuffle_seed, epoch, shuffle_buffer, rows, memory=memory)
    manifest = check_manifest(cache_dir, encoder)
    caches, rows, left_out, missing = [], [], [], []
    for p in images:
        c = cache_shard_path(p, shards_dir, cache_dir)
        if not c.exists():
            missing.append(p)
            continue
        caches.append(str(c))
        meta = shard_meta(c)
        rows.append(int(meta["rows"]))
        left_out.append(len(meta.get("undecodable", ())) + int(meta.get("skipped_no_caption", 0)))
    if missing:
        if not manifest.get("limit"):
            raise CacheMissingError(
                f"cache {cache_dir} has no shard for {len(missing)} of {len(images)} image shards (first: "
                f"{missing[0]}); run `campe cache --out {cache_dir}` to finish it (finished shards are kept)")
        # A --limit cache: train on the shards it has.
        images = [p for p in images if p not in set(missing)]
        if len(images) < world_size:
            raise ValueError(f"the --limit cache {cache_dir} covers {len(images)} shard(s) for {world_size} ranks")
    return TrainingData(images, caches, None, encoder.pad_id, rank, world_size, shuffle_seed, epoch,
                        shuffle_buffer, rows, left_out, memory=memory)


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples of open_training_data -> {"images": [B,3,H,W] float in [0,1], "text": {"hidden": [B,S,H] (cache
    dtype, zero-padded on the right), "layout": PromptLayout} ({"layout"} online), "keys", "captions"}."""
    if not samples:
        raise ValueError("collate_samples got no samples")
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"images of one batch have different sizes {sorted(sizes)} (keys "
                         f"{[s['key'] for s in samples][:4]}...): download with one image_size / resize_mode")
    layout = PromptLayout.collate([s["layout"] for s in samples], pad_id=samples[0].get("pad_id", 0))
    text: dict[str, Any] = {"layout": layout}
    if samples[0].get("hidden") is not None:
        hs = [s["hidden"] for s in samples]
        S = layout.input_ids.shape[1]
        text["hidden"] = torch.stack([F.pad(h, (0, 0, 0, S - h.shape[0])) for h in hs])
    return {"images": torch.stack([s["image"] for s in samples]), "text": text,
            "keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples]}
