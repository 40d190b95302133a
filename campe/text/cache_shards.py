"""Frozen-LM hidden-state cache: its Parquet shards (write, read, verify) and the webdataset tars they come from.

    from campe.text.cache_shards import ShardWriter, read_cache_shard, cache_shard_path, iter_tar_samples

Cache layout (written by stages/cache.py, one output shard per input shard):
    <cache>/manifest.json              what the cache depends on (campe.text.cache_manifest) + run info
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

import errno
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from campe.data.shards import sample_key
from campe.text.cache_manifest import CACHE_DTYPES, CACHE_FORMAT, CacheCorruptError, CacheError
from campe.text.layout import PromptLayout


SHARD_SUFFIX = ".parquet"
META_KEY = b"campe"
_LIST_COLUMNS = ("input_ids", "segment_ids", "position_ids", "apt_positions", "pooled_positions",
                 "neg_apt_positions", "neg_pooled_positions")


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


def truncated_rows(path: str | Path, meta: dict[str, Any] | None = None) -> int:
    """Captions of the shard that were truncated to max_length: from its metadata (`meta`, or read here), or, in a
    shard cached before the count was kept, by counting its `truncated` column."""
    meta = shard_meta(path) if meta is None else meta
    if "truncated" in meta:
        return int(meta["truncated"])
    _, pq = _pa()
    return int(pq.read_table(path, columns=["truncated"]).column("truncated").to_numpy().sum())


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
