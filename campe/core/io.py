"""Small I/O helpers: atomic writes of files and folders (a killed run never leaves a half-written one behind) and
the lock of an output folder (two runs never write into one folder at once)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temp file in `path`'s folder for writing; on a clean exit fsync it and rename it over `path` (atomic
    on POSIX), on an error remove it. Readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build folder `out` atomically: yields an empty temp folder `.<name>.tmp-*` beside it to fill; on a clean exit
    the old `out` (if any) is renamed aside (`.<name>.old-<pid>`), the temp folder renamed in and the old one
    removed; on an error the temp folder is removed and `out` is left as it was. Readers see the old folder or the
    whole new one. Leftovers of a killed run (`.<name>.tmp-*`, `.<name>.old-*`) are removed first: the caller
    holds the folder's lock (output_lock), so no other run is building them."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the old folder back: the caller sees the error and `out` unchanged
                raise
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def headline_path(metrics_file: str | Path) -> Path:
    """metrics/eval/generated.json -> metrics/eval/generated.headline.json: the few figures `dvc metrics show`
    prints by default (dvc.yaml lists these under `metrics:`; the full file is an output beside it)."""
    p = Path(metrics_file)
    return p.with_name(f"{p.stem}.headline.json")


def write_metrics(path: str | Path, full: dict[str, Any], headline: dict[str, float]) -> Path:
    """The full metrics JSON at `path` and its headline (headline_path), both atomically; numbers in the headline
    are rounded to 6 decimals. Returns the headline's path."""
    atomic_write_json(path, full)
    head = headline_path(path)
    atomic_write_json(head, {k: round(float(v), 6) if isinstance(v, float) else v for k, v in headline.items()})
    return head


def json_sha256(obj: Any, default: Callable[[Any], Any] | None = None) -> str:
    """sha256 (hex) of `obj` as canonical JSON (sorted keys); default: how to write values JSON lacks (e.g. str).
    The one hash of a config or params: callers shorten it as they need."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()


def git_commit(cwd: str | None = None) -> str | None:
    """HEAD's commit of the git repository around `cwd` (None outside a repository or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def utc_stamp() -> str:
    """Now in UTC, as the <date> part of MLflow run names: 2026-11-23T07:32:00Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------- output locks

class OutputInUse(RuntimeError):
    """Another run holds the lock of an output folder (the message names the folder and the holder)."""


_HELD: dict[str, int] = {}  # lock path -> nesting depth in this process (a stage inside a stage of the same run)


def lock_path(folder: str | Path, part: str = "") -> Path:
    """The lock file of an output folder: a hidden sibling `.<name>[.<part>].campe-lock`, never inside the folder,
    so DVC never hashes it (an output's parent is never itself a DVC output) and it survives the folder's removal."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}{'.' + part if part else ''}.campe-lock"


def _holder(path: Path) -> dict[str, Any] | None:
    """The holder's info written into the lock file (None: empty, unreadable or written by a dead process)."""
    import socket

    try:
        info = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info.get("pid", -1)), 0)
        except ProcessLookupError:
            return None  # stale: left by a killed run whose lock the current holder took a moment ago
        except (OSError, ValueError):
            pass
    return info


@contextlib.contextmanager
def output_lock(folder: str | Path, what: str, *, flag: str = "--out", part: str = "") -> Iterator[Path]:
    """Hold the exclusive lock of output folder `folder` (filelock: an OS lock, released by the kernel when the
    process dies, so a killed run never blocks the next one). `what` (e.g. "campe train") and the pid, host and
    UTC start time are written into the lock file for the message another run gets. Fails at once, never waits:
    OutputInUse naming the folder, the holder and `flag` (the option that picks another folder). Re-entrant
    within a process. `part`: a lock of its own for a share of the folder (a rank of a multi-process run)."""
    import socket

    from filelock import FileLock, Timeout

    path = lock_path(folder, part)
    key = str(path)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "started": utc_stamp(),
            "folder": str(folder)}

    def write_info(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0, on_acquired=write_info)
    try:
        lock.acquire()
    except Timeout:
        holder = None
        for _ in range(40):  # the holder writes its info right after taking the lock: give it a moment
            holder = _holder(path)
            if holder:
                break
            time.sleep(0.05)
        who = (f"{holder.get('what', 'a run')}, pid {holder.get('pid')} on host {holder.get('host')}, started "
               f"{holder.get('started')}" if holder else f"holder unknown; lock file {path}")
        raise OutputInUse(f"{folder} is in use by another run ({who}); wait for it or use another {flag}") from None
    _HELD[key] = 1
    try:
        yield path
    finally:
        _HELD.pop(key, None)
        try:
            os.truncate(path, 0)  # still ours: the next reader of a free lock finds no stale holder
        except OSError:
            pass
        lock.release()


# ---------------------------------------------------------------------------------------------------- MLflow store

def store_uri(uri: str, base_dir: str | Path | None) -> str:
    """An MLflow tracking URI with a relative local store made absolute against `base_dir` (the folder of the params
    file that names it): `sqlite:///mlflow.db` is <base_dir>/mlflow.db wherever the command runs, not a new empty
    store in the working directory. Resolved at use time only: params and train_config.json keep the relative form,
    so no DVC output records where the checkout lives. base_dir None: unchanged (relative to the working dir)."""
    if not uri or base_dir is None:
        return uri
    base = Path(os.path.abspath(base_dir))
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
            return f"sqlite:///{base / rest}"
        return uri
    if "://" not in uri and not uri.startswith("/") and ":" not in uri.split("/")[0]:
        return str(base / uri)  # a plain local folder store (mlruns)
    return uri
