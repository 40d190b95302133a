"""Reading the download stage's webdataset shards.

    from campe.shards import shard_paths, iter_samples
    for s in iter_samples("data/shards/train"):    # {"__key__", "jpg": PIL.Image, "txt": str, "json": dict}
        ...
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator


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
