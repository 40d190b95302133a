"""Reading the download stage's webdataset shards.

    from campe.data.shards import shard_paths, iter_samples, sort_shard
    for s in iter_samples("data/shards/train"):    # {"__key__", "jpg": PIL.Image, "txt": str, "json": dict}
        ...
    sort_shard("data/shards/train/pass-00/00000.tar")   # key order, fixed mtimes (the download stage does this)
"""
from __future__ import annotations

import copy
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

from campe.core.io import atomic_file


def shard_paths(root: str | Path) -> list[str]:
    """Finished `.tar` shards of every pass under `root` (a shard counts once its `_stats.json` exists)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such shard folder (run `campe download` first)")
    tars = sorted(p for p in root.glob("pass-[0-9][0-9]/[0-9]*.tar")
                  if p.with_name(p.stem + "_stats.json").exists())
    return [str(p) for p in tars]


def iter_samples(root: str | Path, decode: str = "pil") -> Iterator[dict[str, Any]]:
    """Every sample of every finished shard, in shard order (single process; for loaders use webdataset directly)."""
    import webdataset as wds

    paths = shard_paths(root)
    if not paths:
        return iter(())
    ds = wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode(decode)
    return iter(ds)


def sample_key(member_name: str) -> str:
    """webdataset's grouping: `dir/0000012.jpg` -> `dir/0000012` (everything before the basename's first dot)."""
    head, base = os.path.split(member_name)
    return os.path.join(head, base.partition(".")[0])


MEMBER_MTIME = 0  # every member of a rewritten shard: webdataset stamps the write time, so bytes differ per run


def image_bytes(parts: dict[str, bytes]) -> bytes | None:
    """A sample's image bytes (the first of jpg, jpeg, png, webp), or None."""
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


def shard_sample_count(image_shard: str) -> int:
    """The successes that img2dataset's `_stats.json` of a shard counts (0 when unreadable)."""
    stats = Path(image_shard).with_name(Path(image_shard).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text()).get("successes", 0))
    except (OSError, ValueError):
        return 0


def sort_shard(path: str | Path, fix_json: Callable[[bytes], bytes | None] | None = None) -> bool:
    """Rewrite a webdataset tar with its samples in key order and a fixed member mtime, atomically; `fix_json` maps
    each `.json` member's bytes to new bytes (None: keep them). False (and untouched) if nothing changes.

    img2dataset's download threads write samples in completion order, so two downloads of one URL list give the
    same samples in different orders, and training (which reads shards in file order) would see other batches.
    Keys are the row order within a shard, so sorting makes a re-download train the same model, and with the fixed
    mtime a re-download writes the same bytes. Members are copied by seeking, not loaded: memory stays at one
    member (plus the small `.json` members when `fix_json` is given)."""
    path = Path(path)
    with tarfile.open(path, mode="r:") as tar:
        members = tar.getmembers()  # headers only: the data is seeked over
        keys = list(dict.fromkeys(sample_key(m.name) for m in members))
        fixed: dict[str, bytes] = {}
        if fix_json is not None:
            for m in members:
                if m.isfile() and m.name.endswith(".json"):
                    new = fix_json(tar.extractfile(m).read())
                    if new is not None:
                        fixed[m.name] = new
        if keys == sorted(keys) and not fixed and all(m.mtime == MEMBER_MTIME for m in members):
            return False
        by_key: dict[str, list[tarfile.TarInfo]] = {}
        for m in members:
            by_key.setdefault(sample_key(m.name), []).append(m)
        with atomic_file(path) as f, tarfile.open(fileobj=f, mode="w", format=tar.format) as out:
            for key in sorted(by_key):
                for m in by_key[key]:
                    info = copy.copy(m)  # the original header still locates the member's data for extractfile
                    info.mtime = MEMBER_MTIME
                    # A pax header (webdataset's float mtime) would win over the fields set here.
                    info.pax_headers = {k: v for k, v in m.pax_headers.items() if k not in ("mtime", "size")}
                    if m.name in fixed:
                        info.size = len(fixed[m.name])
                        out.addfile(info, io.BytesIO(fixed[m.name]))
                    else:
                        out.addfile(info, tar.extractfile(m) if m.isfile() else None)
    return True
