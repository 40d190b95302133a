"""Damage copies of webdataset shards for tests: a sample's image bytes replaced by garbage, its caption blanked.

    from tests.shard_tools import damaged_copy
    root, bad = damaged_copy(shards, tmp / "shards", garbage=1, blank=1)  # bad = {"garbage": [(tar, key)], ...}
"""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from campe.data.shards import sample_key, shard_paths

GARBAGE = b"this is not an image, just bytes in a .jpg member"


def rewrite_member(tar_path: str | Path, name: str, data: bytes) -> None:
    """Replace one member's bytes in a tar (order and other members kept)."""
    tar_path = Path(tar_path)
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w") as out:
        for m, content in members:
            if m.name == name:
                content = data
                m.size = len(data)
            out.addfile(m, io.BytesIO(content) if content is not None else None)
    tmp.replace(tar_path)


def damaged_copy(shards: str | Path, dest: str | Path, garbage: int = 1, blank: int = 0, shard: int = 0
                 ) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    """Copy a shard folder, then give the first `garbage` samples of shard number `shard` (in shard_paths order)
    garbage image bytes and the `blank` samples after them a whitespace-only caption. Returns
    (dest, {"garbage": [(tar, key)], "blank": [(tar, key)]})."""
    dest = Path(dest)
    shutil.copytree(shards, dest)
    first = shard_paths(dest)[shard]
    with tarfile.open(first) as tar:
        keys = list(dict.fromkeys(sample_key(n) for n in tar.getnames()))
    bad: dict[str, list[tuple[str, str]]] = {"garbage": [], "blank": []}
    for key in keys[:garbage]:
        rewrite_member(first, f"{key}.jpg", GARBAGE)
        bad["garbage"].append((first, key))
    for key in keys[garbage:garbage + blank]:
        rewrite_member(first, f"{key}.txt", b"  \t ")
        bad["blank"].append((first, key))
    return dest, bad
