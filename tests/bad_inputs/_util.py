"""Helpers of the bad-input tests: hash an output folder, run the real CLI and keep its one-line error."""
from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hash(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (empty when it does not exist)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`campe <argv>` in this process; returns (exit code, stderr)."""
    from campe.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def write_shards(folder: str | Path, n: int = 48, size: int = 32, per_shard: int = 32) -> Path:
    """`n` random `size`-px pairs as finished download-stage shards (`pass-00/NNNNN.tar` + `_stats.json`, samples
    KEY.jpg / KEY.txt / KEY.json in key order), without img2dataset: for tests that need shards, not a download."""
    import io
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = Path(folder) / "pass-00"
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        name = f"{s // per_shard:05d}"
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
                key = f"{name}{i:04d}"
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a picture number {i}".encode()),
                                  ("json", json.dumps({"key": key, "uid": i}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{name}_stats.json").write_text(json.dumps({"count": min(per_shard, n - s)}))
    return folder.parent
