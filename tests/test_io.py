"""campe.core.io.atomic_dir: a folder is replaced whole or not at all, and a killed run's leftovers are cleared."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from campe.core.io import atomic_dir


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_dir_replaces_the_folder_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent.resolve() and tmp.name.startswith(".out.tmp-") and not any(tmp.iterdir())
        (tmp / "a.txt").write_text("one")
        assert not out.exists()  # nothing visible until the block ends
    assert _tree(out) == {"a.txt": "one"}
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("two")
        assert _tree(out) == {"a.txt": "one"}  # the old folder stays whole while the new one is built
    assert _tree(out) == {"sub/b.txt": "two"}  # no stale a.txt from the first run
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_error_keeps_the_old_folder_and_removes_the_temp_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert _tree(out) == {"keep.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(KeyboardInterrupt):  # a kill (Ctrl-C) too
        with atomic_dir(tmp_path / "new"):
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_clears_the_leftovers_of_a_killed_run_only(tmp_path):
    out = tmp_path / "out"
    for name in (".out.tmp-abc", f".out.old-{os.getpid() + 1}", ".other.tmp-abc"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("left over")
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-abc", "out"]  # another folder's are not ours
