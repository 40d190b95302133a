"""Frozen-LM hidden-state cache: shard format, manifest, the cached text tower, and the training data path.

Only the LM's last `trainable_layers` are trained, so the hidden state entering the first trainable layer
(`encoder.frozen_hidden(layout)`, APT placeholders not yet replaced) is fixed for a caption: `campe cache` stores it
once per caption, and training runs only inject -> trainable layer(s) -> final norm -> heads on it.

API (what the training loop uses):

    from campe.cache import CachedTextTower, open_training_data, collate_samples, check_manifest
    encoder = campe.multiprompt.build_text_encoder(text_encoder_cfg)      # params.yaml section `text_encoder`
    tower = CachedTextTower(encoder, online=False)      # online=True (`text_cache: false`): no cache, the frozen
                                                        # layers run under no_grad inside the tower; same numbers
    model, _ = campe.model.build_model("default", text_tower=tower)
    data = open_training_data(shards_dir, cache_dir or None, encoder, rank=0, world_size=1,
                              shuffle_seed=0, epoch=0)  # -> torch IterableDataset of samples (dicts)
    loader = torch.utils.data.DataLoader(data, batch_size=B, num_workers=2, collate_fn=collate_samples,
                                         drop_last=True)
    for batch in loader:    # {"images": [B,3,H,W] float in [0,1], "text": {...tower input...}, "keys", "captions"}
        out = model(images=batch["images"], text=batch["text"])           # -> campe.losses.CampeObjective
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
  image does not decode (campe.imageprep) is left out: the cache stage leaves it out of the cache and lists it in
  the shard's metadata, and training skips it, warning (UndecodableImageWarning) with the shard and the key.
  `data.batches(b)` gives collated batches with the samples left out since the previous one in
  batch["skipped"] (what the training loop counts, through `BatchStream` in a DataLoader).
- `collate_samples(samples) -> {"images": [B,3,H,W] float32 in [0,1], "text": {"hidden": [B,S,H] float16/bfloat16
  (cache dtype, right-padded), "layout": PromptLayout} ({"layout"} only in online mode), "keys": [B] str,
  "captions": [B] str}`.
- `CachedTextTower(encoder, online=False, query_only=True)`: forward(batch["text"]) (or a list of captions, for
  evaluation: the frozen layers then run on the fly) -> the encoder's pool dict
  ("embedding" [B,D], "segments" [B,n,D/n], "pooled_hidden" [B,n,H], "neg_*" with negation), which
  campe.model.CLIPModel maps to "text" / "negated". Parameters: the encoder's (APT, heads, trainable layers).
  The last layer is "query-only": its queries, attention output and MLP run at the pooled positions only
  (keys/values from every position), the same numbers as the full layer at those positions.
- `check_manifest(cache_dir, encoder)`: raises CacheMismatchError naming each differing field (training calls it
  through open_training_data; call it yourself to fail before building a DataLoader).
- Errors: CacheError (a ValueError: the CLI prints it as one line) and its subclasses CacheMismatchError,
  CacheCorruptError (names the shard, suggests `campe cache --repair`), CacheMissingError.

Cache layout (written by stages/cache.py, one output shard per input shard):
    <cache>/manifest.json              what the cache depends on (see MANIFEST_COMPARED) + run info
    <cache>/pass-00/00000.parquet      one row per caption, in the tar's order
A shard is written to a hidden temp name, fsynced and renamed: a file with the final name is complete (a killed
run leaves only a `.NNNNN.parquet.*.tmp` that the next run removes and readers never open). Parquet columns: key,
caption, length L, hidden (raw little-endian float16/bfloat16 bytes of [L,H], real tokens only), input_ids /
segment_ids / position_ids (L each), apt_positions / pooled_positions (K), neg_* (K or null), caption_length,
truncated. Page checksums are on, so `--repair` detects flipped bits, not just truncation. The shard's schema
metadata (key b"campe") holds its source tar, the tar's size, the row counts, the keys of the samples left out
because their image does not decode ("undecodable") and the number of truncated captions ("truncated").
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from campe.imageprep import ImageDecodeError, SkippedSample, UndecodableImageWarning, decode_image
from campe.multiprompt import DEFAULT_MODEL, MultiPromptTextEncoder, PromptLayout, resolve_model_path
from campe.shards import sample_key

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".parquet"
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
META_KEY = b"campe"
# Fields of the manifest that must match for a cache to be used; the others are informational.
MANIFEST_COMPARED = ("format", "model_class", "model_hash", "model_revision", "tokenizer_hash", "pooling",
                     "template", "negated_template", "k", "negation", "max_length", "trainable_layers",
                     "hidden_size", "model_dtype")
# Layer classes whose last layer runs query-only (checked against the full layer in tests/test_cache.py).
QUERY_ONLY_ENCODER_LAYERS = ("BertLayer",)
QUERY_ONLY_DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                             "GemmaDecoderLayer", "Gemma2DecoderLayer")
_LIST_COLUMNS = ("input_ids", "segment_ids", "position_ids", "apt_positions", "pooled_positions",
                 "neg_apt_positions", "neg_pooled_positions")


class CacheError(ValueError):
    """The cache cannot be used or written as it is; the message says why and what to run."""


class CacheMismatchError(CacheError):
    """The cache was made for another text encoder (model, template, K, ...)."""


class CacheCorruptError(CacheError):
    """A cache shard is truncated, corrupt or does not belong to its image shard."""


class CacheMissingError(CacheError):
    """The cache (or one of its shards) does not exist yet."""


# ---------------------------------------------------------------------------------------------------- manifest

def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_VOLATILE_CONFIG_KEYS = {"_attn_implementation", "_attn_implementation_internal", "_name_or_path", "name_or_path",
                         "transformers_version", "dtype", "torch_dtype", "_commit_hash", "architectures",
                         "use_cache", "output_hidden_states", "output_attentions", "return_dict"}


def frozen_model_hash(encoder: MultiPromptTextEncoder) -> str:
    """sha256 of what the cached states depend on: the model config and the weights below start_layer.

    The trainable layers and the final norm are left out, so the hash does not change while training. Costs one
    pass over the frozen weights (MiniLM: ~0.1 s; a 7B model: seconds).
    """
    lm = encoder.lm
    h = hashlib.sha256()
    cfg = {k: v for k, v in lm.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    prefix = "encoder.layer." if encoder.family == "encoder" else "layers."
    trainable = {f"{prefix}{i}." for i in range(encoder.start_layer, encoder.num_layers)}
    for name, t in sorted(lm.state_dict().items()):
        if any(name.startswith(p) for p in trainable) or (encoder.family == "decoder" and name.startswith("norm.")):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        t = t.detach().to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_hash(encoder: MultiPromptTextEncoder) -> str:
    """sha256 of the vocabulary, special tokens and the token ids the prompts became."""
    tok = encoder.tokenizer
    return _sha256_json({"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items()),
                         "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
                         "pad_id": encoder.pad_id, "placeholder_id": encoder.placeholder_id,
                         "prompt_ids": encoder.prompt_ids, "apt_offsets": encoder.apt_offsets})


def _tokenizer_source(encoder: MultiPromptTextEncoder) -> str | None:
    """Where the tokenizer came from, as the config names it: the packaged model ("minilm") resolves to a folder
    inside the venv, whose path is no property of the cache (and would make the manifest differ per checkout)."""
    name = getattr(encoder.tokenizer, "name_or_path", None)
    if encoder.cfg.model_path == DEFAULT_MODEL and name == resolve_model_path(DEFAULT_MODEL):
        return DEFAULT_MODEL
    return name


def cache_manifest(encoder: MultiPromptTextEncoder, dtype: str = "float16") -> dict[str, Any]:
    """The manifest a cache of `encoder` in storage `dtype` must carry (compared fields + informational ones)."""
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"cache dtype '{dtype}' is not one of: {', '.join(CACHE_DTYPES)}")
    cfg, lm = encoder.cfg, encoder.lm
    return {
        "format": CACHE_FORMAT,
        "model_path": cfg.model_path,  # informational: the same weights may sit at another path
        "model_class": type(lm).__name__,
        "model_hash": frozen_model_hash(encoder),
        "model_revision": getattr(lm.config, "_commit_hash", None),
        "tokenizer": _tokenizer_source(encoder),
        "tokenizer_hash": tokenizer_hash(encoder),
        "pooling": cfg.pooling,
        "template": cfg.template,
        "negated_template": cfg.negated_template if cfg.negation else None,
        "k": cfg.n_prompts,
        "negation": cfg.negation,
        "max_length": cfg.max_length,
        "trainable_layers": cfg.trainable_layers,
        "start_layer": encoder.start_layer,
        "num_layers": encoder.num_layers,
        "hidden_size": lm.config.hidden_size,
        "model_dtype": cfg.dtype,
        "dtype": dtype,  # storage dtype; compared by the cache stage (one dtype per cache), not by training
    }


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise CacheMissingError(f"{cache_dir}: no {MANIFEST}, so this is not a finished `campe cache` output; run "
                                f"`campe cache --out {cache_dir}` first (or set text_cache: false to train online)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"{path}: unreadable manifest ({e}); re-run `campe cache --overwrite`") from None


def manifest_differences(found: dict[str, Any], expected: dict[str, Any],
                         fields: Sequence[str] = MANIFEST_COMPARED) -> list[str]:
    """'field (cache: x, params: y)' for each compared field that differs."""
    out = []
    for f in fields:
        a, b = found.get(f), expected.get(f)
        if f == "model_revision" and (a is None or b is None):
            continue  # local folders have no revision; the weights hash still decides
        if a != b:
            short = lambda v: (v[:12] + "...") if isinstance(v, str) and f.endswith("hash") else v  # noqa: E731
            out.append(f"{f} (cache: {short(a)!r}, params: {short(b)!r})")
    return out


def check_manifest(cache_dir: str | Path, encoder: MultiPromptTextEncoder, dtype: str | None = None
                   ) -> dict[str, Any]:
    """Refuse a cache made for another encoder: CacheMismatchError naming every differing field. Returns it.

    `dtype`: also require this storage dtype (the cache stage does; training reads either).
    """
    found = read_manifest(cache_dir)
    expected = cache_manifest(encoder, dtype or found.get("dtype", "float16"))
    diff = manifest_differences(found, expected, MANIFEST_COMPARED + (("dtype",) if dtype else ()))
    if diff:
        raise CacheMismatchError(
            f"cache {cache_dir} was made for a different text encoder: {'; '.join(diff)}. Rebuild it with the "
            f"same `text_encoder` params as training (`campe cache --out {cache_dir} --on-mismatch rebuild`), "
            f"or point training at a cache made with them")
    return found


# ---------------------------------------------------------------------------------------------------- shard files

def cache_shard_path(image_shard: str | Path, shards_dir: str | Path, cache_dir: str | Path) -> Path:
    """<shards>/pass-00/00000.tar -> <cache>/pass-00/00000.parquet."""
    rel = Path(image_shard).resolve().relative_to(Path(shards_dir).resolve())
    return Path(cache_dir) / rel.with_suffix(SHARD_SUFFIX)


def tar_source_digest(path: str | Path) -> str:
    """sha256 over a webdataset tar's member names, in order, and its captions (.txt): what a cache shard depends on.
    Training zips an image shard with its cache shard sample by sample, so a re-download that only reorders the
    samples (img2dataset's threads write in completion order) makes the cache shard stale too. Image bytes are
    seeked over, not read."""
    h = hashlib.sha256()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                h.update(m.name.encode() + b"\0")
                if m.isfile() and m.name.endswith(".txt"):
                    h.update(tar.extractfile(m).read() + b"\0")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CacheCorruptError(f"image shard {path} is unreadable ({e}); re-download it (campe download)") from None
    return h.hexdigest()


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a webdataset tar, in file order (members grouped by key)."""
    key, parts = None, {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if base.startswith("."):
                    continue
                k, ext = sample_key(m.name), base.partition(".")[2]
                data = tar.extractfile(m).read()
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                parts[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CacheCorruptError(f"image shard {path} is unreadable ({e}); re-download it (campe download)") from None
    if key is not None:
        yield key, parts


def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pa, pq


def _schema():
    pa, _ = _pa()
    ints = pa.list_(pa.int32())
    return pa.schema([("key", pa.string()), ("caption", pa.string()), ("length", pa.int32()),
                      ("hidden", pa.binary()), *[(c, ints) for c in _LIST_COLUMNS],
                      ("caption_length", pa.int32()), ("truncated", pa.bool_())])


class ShardWriter:
    """Write one cache shard atomically: rows go to a hidden temp file beside `path`, which `close()` fsyncs and
    renames to `path`. Any exception (disk full, kill via KeyboardInterrupt, ...) removes the temp file, so a
    file named `path` is always complete.

        with ShardWriter(path, dtype="float16", hidden_size=H, meta={...}) as w:
            w.write(keys, captions, hidden_rows, layout)      # a batch of rows, in order
    """

    def __init__(self, path: str | Path, dtype: str, hidden_size: int, meta: dict[str, Any]):
        self.path = Path(path)
        self.dtype, self.hidden_size, self.meta = dtype, hidden_size, dict(meta)
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file = None
        self._writer = None

    def __enter__(self) -> ShardWriter:
        self._file = open(self.tmp, "wb")
        return self

    def write(self, keys: Sequence[str], captions: Sequence[str], hidden: Sequence[torch.Tensor],
              layout: PromptLayout) -> None:
        """A batch of n rows, in order: keys/captions [n]; hidden: n tensors [L_i, H] (row i's real tokens, any
        float dtype; stored as the shard's dtype); layout: the n rows' PromptLayout (L_i = layout.lengths[i])."""
        pa, pq = _pa()
        n = len(keys)
        lengths = layout.lengths.cpu()
        if len(hidden) != n or len(captions) != n or layout.input_ids.shape[0] != n:
            raise ValueError(f"ShardWriter.write: {n} keys, {len(captions)} captions, {len(hidden)} hidden rows, "
                             f"{layout.input_ids.shape[0]} layout rows")
        lay = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in layout.to_dict().items()}
        blobs = []
        for i, h in enumerate(hidden):
            if tuple(h.shape) != (int(lengths[i]), self.hidden_size):
                raise ValueError(f"hidden row {i} ({keys[i]}) is {list(h.shape)}, expected "
                                 f"[{int(lengths[i])}, {self.hidden_size}]")
            h = h.detach().to("cpu", CACHE_DTYPES[self.dtype]).contiguous()
            blobs.append(h.view(torch.int16).numpy().tobytes())
        cols: dict[str, Any] = {"key": list(keys), "caption": list(captions), "length": lengths.tolist(),
                                "hidden": blobs}
        for c in ("input_ids", "segment_ids", "position_ids"):
            cols[c] = [lay[c][i, :int(lengths[i])].tolist() for i in range(n)]
        for c in ("apt_positions", "pooled_positions", "neg_apt_positions", "neg_pooled_positions"):
            cols[c] = [None] * n if lay[c] is None else lay[c].tolist()
        cols["caption_length"] = lay["caption_lengths"].tolist()
        cols["truncated"] = lay["truncated"].tolist()
        schema = _schema()
        table = pa.table(cols, schema=schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._file, schema, compression={c: "none" if c == "hidden" else "snappy"
                                                                             for c in schema.names},
                                            write_page_checksum=True)
        self._writer.write_table(table, row_group_size=max(n, 1))
        self.rows += n

    def close(self) -> None:
        """Footer with the metadata, fsync, rename into place, fsync the folder."""
        pa, pq = _pa()
        if self._writer is None:  # a shard with no captions still gets a (valid, empty) file
            schema = _schema()
            self._writer = pq.ParquetWriter(self._file, schema, write_page_checksum=True)
        meta = {**self.meta, "format": CACHE_FORMAT, "dtype": self.dtype, "hidden_size": self.hidden_size,
                "rows": self.rows}
        self._writer.add_key_value_metadata({META_KEY.decode(): json.dumps(meta)})
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        try:  # make the rename itself durable
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:
            pass
        try:
            if self._file is not None:
                self._file.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or any(
        s in str(e) for s in ("No space left", "Disk quota", "File too large")))


def remove_stale_temps(path: str | Path) -> int:
    """Delete leftover temp files of shard `path` (from a killed run); returns how many."""
    path = Path(path)
    n = 0
    for t in path.parent.glob(f".{path.name}.*.tmp"):
        t.unlink(missing_ok=True)
        n += 1
    return n


def shard_meta(path: str | Path) -> dict[str, Any]:
    """The shard's metadata (reads only the footer): raises CacheCorruptError if the file is truncated/corrupt."""
    _, pq = _pa()
    try:
        md = pq.read_metadata(path)
        return json.loads(md.metadata[META_KEY])
    except Exception as e:  # pyarrow raises OSError / ArrowInvalid / KeyError for a bad footer
        raise CacheCorruptError(f"cache shard {path} is truncated or corrupt ({type(e).__name__}: {e}); run "
                                f"`campe cache --repair` to redo it") from None


def _column_lists(arr) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow list<int32> array -> (flat values, offsets [n+1]); null rows give empty lists."""
    offsets = arr.offsets.to_numpy(zero_copy_only=False)
    values = arr.values.to_numpy(zero_copy_only=False)
    return values, offsets


def _binary_buffers(arr) -> tuple[memoryview, np.ndarray]:
    bufs = arr.buffers()  # [validity, offsets, data]
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    return bufs[2], offsets


def read_cache_shard(path: str | Path, batch_rows: int = 256, verify: bool = True
                     ) -> Iterator[dict[str, Any]]:
    """Rows of a cache shard in order: {"key", "caption", "hidden": [L,H] (cache dtype), "layout": PromptLayout of
    one row}. A truncated, corrupt or inconsistent file raises CacheCorruptError naming it (page checksums are
    verified when `verify`)."""
    _, pq = _pa()
    meta = shard_meta(path)
    dtype, h = CACHE_DTYPES[meta["dtype"]], int(meta["hidden_size"])
    rows = 0
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=verify)
        for batch in pf.iter_batches(batch_size=batch_rows):
            n = batch.num_rows
            col = {name: batch.column(name) for name in batch.schema.names}
            keys = col["key"].to_pylist()
            caps = col["caption"].to_pylist()
            lengths = col["length"].to_numpy()
            data, offs = _binary_buffers(col["hidden"])
            # One copy of the batch's hidden bytes; every row is a view into it.
            flat = torch.from_numpy(np.frombuffer(data, dtype=np.int16)[offs[0] // 2: offs[-1] // 2].copy())
            flat = flat.view(dtype)
            lists = {c: _column_lists(col[c]) for c in _LIST_COLUMNS}
            has_neg = col["neg_apt_positions"].null_count < n
            cap_len = col["caption_length"].to_numpy()
            trunc = col["truncated"].to_numpy(zero_copy_only=False)
            for i in range(n):
                L = int(lengths[i])
                a, b = (int(offs[i]) - int(offs[0])) // 2, (int(offs[i + 1]) - int(offs[0])) // 2
                if b - a != L * h:
                    raise ValueError(f"row {rows + i} ({keys[i]}): hidden holds {b - a} values, expected {L}x{h}")
                t = {}
                for c in _LIST_COLUMNS:
                    if c.startswith("neg_") and not has_neg:
                        t[c] = None
                        continue
                    vals, o = lists[c]
                    t[c] = torch.from_numpy(vals[o[i]:o[i + 1]].astype(np.int64))[None]
                if t["input_ids"].shape[1] != L:
                    raise ValueError(f"row {rows + i} ({keys[i]}): {t['input_ids'].shape[1]} token ids for length {L}")
                layout = PromptLayout(
                    input_ids=t["input_ids"], segment_ids=t["segment_ids"], position_ids=t["position_ids"],
                    apt_positions=t["apt_positions"], pooled_positions=t["pooled_positions"],
                    caption_lengths=torch.tensor([int(cap_len[i])]), truncated=torch.tensor([bool(trunc[i])]),
                    neg_apt_positions=t["neg_apt_positions"], neg_pooled_positions=t["neg_pooled_positions"])
                yield {"key": keys[i], "caption": caps[i], "hidden": flat[a:b].view(L, h), "layout": layout}
            rows += n
    except CacheError:
        raise
    except Exception as e:  # OSError / ArrowInvalid (checksum, truncation) / ValueError (inconsistent row)
        raise CacheCorruptError(f"cache shard {path} is corrupt ({type(e).__name__}: {e}); run "
                                f"`campe cache --repair` to redo it") from None
    if rows != meta.get("rows", rows):
        raise CacheCorruptError(f"cache shard {path} has {rows} rows but its metadata says {meta['rows']}; run "
                                f"`campe cache --repair` to redo it")


def verify_cache_shard(path: str | Path) -> dict[str, Any]:
    """Read every row of a shard with checksums on (what --repair does); returns its metadata or raises
    CacheCorruptError."""
    for _ in read_cache_shard(path, verify=True):
        pass
    return shard_meta(path)


# ---------------------------------------------------------------------------------------------------- layouts

class _NoParams:
    def parameters(self):
        return iter([torch.empty(0)])


class LayoutMaker:
    """Captions -> PromptLayout (on the CPU) exactly as `encoder.layout` does, without holding the model: small and
    picklable, for DataLoader workers in online mode and for the cache stage."""

    def __init__(self, encoder: MultiPromptTextEncoder):
        self.cfg, self.tokenizer = encoder.cfg, encoder.tokenizer
        self.prompt_ids, self.apt_offsets, self.pad_id = encoder.prompt_ids, encoder.apt_offsets, encoder.pad_id
        self.lm = _NoParams()  # encoder.layout moves the layout to the model's device: here the CPU

    def __call__(self, captions: str | Sequence[str]) -> PromptLayout:
        return MultiPromptTextEncoder.layout(self, captions)  # the encoder's own code, on this duck-typed self

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "lm"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lm = _NoParams()


# ---------------------------------------------------------------------------------------------------- the tower

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B,S,...], positions [B,Q] -> [B,Q,...]."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, positions]


def _attention_fn(attn: nn.Module):
    """The attention kernel the model itself uses (eager / sdpa), as the modeling file resolves it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)


def query_only_supported(layer: nn.Module) -> bool:
    name = type(layer).__name__
    if name in QUERY_ONLY_ENCODER_LAYERS:
        return not getattr(layer, "add_cross_attention", False)
    return name in QUERY_ONLY_DECODER_LAYERS


def query_only_layer(encoder: MultiPromptTextEncoder, index: int, hidden: torch.Tensor, layout: PromptLayout,
                     positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Layer `index` evaluated at `positions` only: hidden [B,S,H] (its input), positions [B,Q] -> [B,Q,H].

    Keys and values come from all S positions; queries, the attention output, the residuals and the MLP only
    from the Q positions, by calling the layer's own submodules (projections, norms, rotary, MLP, attention
    kernel). mask: the layer's [B,1,S,S] prompt-wise mask.
    """
    layer = encoder._layers[index]
    B, S, _ = hidden.shape
    Q = positions.shape[1]
    mask_q = _gather_rows(mask[:, 0], positions)[:, None]  # [B,1,Q,S]
    h_q = _gather_rows(hidden, positions)  # [B,Q,H]
    if encoder.family == "encoder":
        sa = layer.attention.self
        d = sa.attention_head_size
        q = sa.query(h_q).view(B, Q, -1, d).transpose(1, 2)
        k = sa.key(hidden).view(B, S, -1, d).transpose(1, 2)
        v = sa.value(hidden).view(B, S, -1, d).transpose(1, 2)
        out, _ = _attention_fn(sa)(sa, q, k, v, mask_q, dropout=sa.dropout.p if sa.training else 0.0,
                                   scaling=sa.scaling)
        a = layer.attention.output(out.reshape(B, Q, -1), h_q)  # dense, dropout, LayerNorm(x + residual)
        return layer.output(layer.intermediate(a), a)
    attn = layer.self_attn
    d = attn.head_dim
    x = layer.input_layernorm(hidden)
    x_q = _gather_rows(x, positions)
    q = attn.q_proj(x_q).view(B, Q, -1, d)
    k = attn.k_proj(x).view(B, S, -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norm before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(x).view(B, S, -1, d).transpose(1, 2)
    cos, sin = encoder.lm.rotary_emb(hidden, layout.position_ids)  # [B,S,d]
    cq, sq = _gather_rows(cos, positions)[:, None], _gather_rows(sin, positions)[:, None]
    q = q * cq + _rotate_half(q) * sq
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    kw = {"dropout": attn.attention_dropout if attn.training else 0.0, "scaling": attn.scaling}
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        kw["softcap"] = attn.attn_logit_softcapping
    if getattr(attn, "sliding_window", None) is not None:
        kw["sliding_window"] = attn.sliding_window  # the mask already has the window; passed as the model does
    out, _ = _attention_fn(attn)(attn, q, k, v, mask_q, **kw)
    a = attn.o_proj(out.reshape(B, Q, -1))
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma2: norms around both sub-blocks' outputs
        h_q = h_q + layer.post_attention_layernorm(a)
        return h_q + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h_q)))
    h_q = h_q + a
    return h_q + layer.mlp(layer.post_attention_layernorm(h_q))


class CachedTextTower(nn.Module):
    """The multi-prompt text tower on cached frozen states (campe/model.py's text-tower contract).

    forward({"hidden": [B,S,H] cached states (float16/bfloat16/float32; cast to the model's dtype), "layout":
    PromptLayout}) -> encoder.pool's dict ("embedding" [B,D], "segments" [B,n,D/n], "pooled_hidden" [B,n,H], and
    "neg_*" with negation). online=True: the batch needs only "layout", and the frozen layers run here under
    no_grad. In either mode a list of captions or a PromptLayout is also accepted (evaluation: model.encode_text(
    captions)); the frozen layers then run on the fly. query_only=False runs the last layer at every position.
    """

    def __init__(self, encoder: MultiPromptTextEncoder, online: bool = False, query_only: bool = True):
        super().__init__()
        self.encoder = encoder
        self.online = online
        self.cfg = encoder.cfg  # build_model records it as text_tower_config
        self.embed_dim = encoder.embed_dim
        last = encoder._layers[encoder.num_layers - 1]
        self.query_only = query_only and encoder.cfg.pooling != "mean"  # mean pooling needs every caption token
        self.note = ""
        if self.query_only and not query_only_supported(last):
            self.query_only = False
            self.note = (f"query-only last layer not implemented for {type(last).__name__}: running the full layer "
                         f"(same numbers, more FLOPs); supported: "
                         f"{', '.join(QUERY_ONLY_ENCODER_LAYERS + QUERY_ONLY_DECODER_LAYERS)}")
            warnings.warn(self.note, stacklevel=2)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        enc = self.encoder
        live = self.online
        if isinstance(batch, (str, list, tuple)):  # captions (evaluation): the frozen layers run here
            batch, live = {"layout": enc.layout(batch)}, True
        elif isinstance(batch, PromptLayout):
            batch, live = {"layout": batch}, True
        layout = batch["layout"]
        if isinstance(layout, dict):
            layout = PromptLayout.from_dict(layout)
        device = next(enc.lm.parameters()).device
        layout = layout.to(device)
        masks: dict[int | None, torch.Tensor] = {}
        hidden = batch.get("hidden")
        if hidden is None:
            if not live:
                raise ValueError("CachedTextTower(online=False) needs batch['hidden'] (cached states from "
                                 "open_training_data with a cache_dir); build it with online=True to run the frozen "
                                 "layers itself")
            hidden = enc.frozen_hidden(layout, masks)  # no_grad inside
        else:
            if hidden.shape[:2] != layout.input_ids.shape:
                raise ValueError(f"batch['hidden'] is {list(hidden.shape)} but the layout is "
                                 f"{list(layout.input_ids.shape)} tokens: collate both with collate_samples")
            hidden = hidden.to(device=device, dtype=enc._dtype)
        h = enc.inject(hidden, layout)
        last = enc.num_layers - 1
        if not self.query_only:
            return enc.pool(enc.run_layers(h, layout, enc.start_layer, enc.num_layers, masks), layout)
        h = enc.run_layers(h, layout, enc.start_layer, last, masks)
        k = layout.pooled_positions.shape[1]
        positions = layout.pooled_positions
        if layout.neg_pooled_positions is not None:
            positions = torch.cat([positions, layout.neg_pooled_positions], 1)
        w = enc._windows[last]
        if w not in masks:
            masks[w] = enc.attention_mask(layout, w)
        y = query_only_layer(enc, last, h, layout, positions, masks[w])  # [B,Q,H]
        # Pool from the Q computed positions: the same heads and final norm on a compact layout.
        ar = torch.arange(positions.shape[1], device=device).expand(positions.shape[0], -1)
        compact = dataclasses.replace(layout, pooled_positions=ar[:, :k],
                                      neg_pooled_positions=ar[:, k:] if layout.neg_pooled_positions is not None
                                      else None)
        return enc.pool(y, compact)


# ---------------------------------------------------------------------------------------------------- training data

def _decode_image(data: bytes) -> torch.Tensor:
    """Shard image bytes -> float [3,H,W] in [0,1] (campe.imageprep; ImageDecodeError when undecodable)."""
    return decode_image(data).float().div_(255.0)


def _image_bytes(parts: dict[str, bytes]) -> bytes | None:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in parts:
            return parts[ext]
    return None


def sample_caption(parts: dict[str, bytes]) -> str | None:
    """A sample's caption, or None when it has none: no .txt, or only whitespace (the text tower refuses blank
    captions; `campe download` skips such rows, shards from elsewhere may still hold them). The cache stage and
    training both skip these samples."""
    txt = parts.get("txt")
    if txt is None:
        return None
    caption = txt.decode("utf-8")
    return caption if caption.strip() else None


def _shard_samples(image_shard: str) -> int:
    stats = Path(image_shard).with_name(Path(image_shard).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text()).get("successes", 0))
    except (OSError, ValueError):
        return 0


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
            img, caption = _image_bytes(parts), sample_caption(parts)
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
        img, caption = _image_bytes(parts), sample_caption(parts)
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


class TrainingData(torch.utils.data.IterableDataset):
    """(image, caption, cached text) samples of this rank's shards; see open_training_data.

    A sample whose image does not decode is left out: iterating warns (UndecodableImageWarning, naming the shard
    and the key); `batches()` hands it on with the batch instead (batch["skipped"]), for the training loop to count.
    """

    def __init__(self, image_shards: Sequence[str], cache_shards: Sequence[str | None],
                 layout_maker: LayoutMaker | None, pad_id: int, rank: int = 0, world_size: int = 1,
                 shuffle_seed: int | None = None, epoch: int = 0, shuffle_buffer: int = 512,
                 shard_rows: Sequence[int] | None = None, shard_left_out: Sequence[int] | None = None):
        super().__init__()
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
            for s in zip_shard(self.image_shards[i], self.cache_shards[i], self.layout_maker):
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
                       shuffle_buffer: int = 512) -> TrainingData:
    """The training samples of the finished image shards under `shards_dir`, each with its cached text states from
    `cache_dir` (checked against `encoder`'s manifest), or, with cache_dir=None, its token layout (online mode)."""
    from campe.shards import shard_paths

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
        rows = [_shard_samples(p) for p in images]
        return TrainingData(images, [None] * len(images), LayoutMaker(encoder), encoder.pad_id, rank, world_size,
                            shuffle_seed, epoch, shuffle_buffer, rows)
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
                        shuffle_buffer, rows, left_out)


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
