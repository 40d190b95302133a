"""Output-folder locks: two runs never write into one folder at once, and a killed run never blocks the next.

Every stage that writes a folder (generate, download, cache, train, an ablation root) holds its lock
(campe.core.io.output_lock: a filelock OS lock in a hidden sibling file `.<folder>.campe-lock`). A second run fails at
once with one line naming the folder and the holder; a killed holder's lock is released by the kernel.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.bad_inputs._util import run_cli, tree_hash, write_shards
from tests.tiny_config import write_tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
HELD = re.compile(r"^campe (\w+): error: (.+) is in use by another run \((campe \w+), pid (\d+) on host (\S+), "
                  r"started (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\); wait for it or use another (--\w+)$")


@pytest.fixture(scope="module")
def project(tiny_lm, tmp_path_factory):
    """A tiny project (params.yaml with paths under it): shards as the download stage leaves them, a URL list, and
    a first `campe train`."""
    root = tmp_path_factory.mktemp("locks")
    params = write_tiny_params(root / "params.yaml", root=root, text_model=tiny_lm)
    write_shards(root / "data" / "shards" / "train")
    (root / "data" / "generated" / "urls").mkdir(parents=True)
    pd.DataFrame({"url": ["file:///nowhere.jpg"], "caption": ["x"], "image_id": [0], "aspects": ["{}"]}).to_parquet(
        root / "data" / "generated" / "urls" / "train.parquet")
    from campe.cli import main
    assert main(["train", "--params", str(params), "--method", "vanilla", "--steps", "2"]) == 0
    return root, params


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def holder():
    """Start a real process that holds an output folder's lock (the project's helper) until it is killed."""
    procs = []

    def hold(folder: Path, what: str) -> subprocess.Popen:
        code = ("import sys, time\nfrom campe.core.io import output_lock\n"
                f"with output_lock({str(folder)!r}, {what!r}):\n    print('held', flush=True)\n    time.sleep(600)\n")
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def _check_refusal(err: str, cmd: str, folder: Path, holder_what: str, pid: int, flag: str = "--out") -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = HELD.match(lines[0])
    assert m, lines[0]
    assert m.group(1) == cmd and Path(m.group(2)) == folder and m.group(3) == holder_what
    assert int(m.group(4)) == pid and m.group(5) == socket.gethostname() and m.group(7) == flag


def _mlflow_runs(root: Path) -> int:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def test_second_train_into_a_busy_out_dir_is_refused_and_touches_nothing(project, holder, capsys):
    """A second `campe train` into an out_dir in use fails at once naming the folder and the holder (pid, host,
    start time), leaves the folder byte-identical and makes no MLflow run."""
    root, params = project
    out = root / "data" / "models" / "campe"
    before, runs = tree_hash(out), _mlflow_runs(root)
    p = holder(out, "campe train")
    t0 = time.perf_counter()
    code, err = run_cli(capsys, "train", "--params", str(params), "--method", "vanilla", "--steps", "2")
    assert code == 1 and time.perf_counter() - t0 < 30  # at once: it does not wait for the holder
    _check_refusal(err, "train", out, "campe train", p.pid)
    assert tree_hash(out) == before and _mlflow_runs(root) == runs
    assert not list(out.glob("*campe-lock*"))  # the lock lives beside the folder, never in it (DVC hashes it)


def test_second_download_and_cache_into_a_busy_folder_are_refused(project, holder, capsys):
    """`campe download` and `campe cache` refuse a folder another run holds, and change nothing in it."""
    root, params = project
    shards, cache = root / "data" / "shards" / "train", root / "data" / "cache" / "train"
    before = tree_hash(shards)
    p = holder(shards, "campe download")
    code, err = run_cli(capsys, "download", "--params", str(params))
    assert code == 1
    _check_refusal(err, "download", shards, "campe download", p.pid)
    p = holder(cache, "campe cache")
    code, err = run_cli(capsys, "cache", "--params", str(params))
    assert code == 1
    _check_refusal(err, "cache", cache, "campe cache", p.pid)
    assert tree_hash(shards) == before and not cache.exists()  # nothing cached: refused before any work


def test_second_ablation_on_a_busy_root_is_refused(project, holder, capsys):
    """`campe ablate` holds its root (cells and shared caches): a second one on that root is refused."""
    root, params = project
    abl = root / "data" / "ablation"
    p = holder(abl, "campe ablate")
    code, err = run_cli(capsys, "ablate", "--params", str(params), "--root", str(abl), "--methods", "vanilla",
                        "--seeds", "0", "--steps", "1")
    assert code == 1
    _check_refusal(err, "ablate", abl, "campe ablate", p.pid, flag="--root")
    assert not abl.exists()


def test_lock_of_a_killed_train_never_blocks_the_next_run(project, capsys):
    """kill -9 of a real `campe train` holding its out_dir: the next run on that folder starts and finishes."""
    root, params = project
    out = root / "data" / "models" / "killed"
    cmd = [sys.executable, "-m", "campe.cli", "train", "--params", str(params), "--method", "vanilla",
           "--steps", "100000", "--out", str(out)]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out.parent / f".{out.name}.campe-lock"
    deadline = time.monotonic() + 120
    while f'"pid": {p.pid}' not in (lock.read_text() if lock.exists() else ""):  # it holds the lock
        assert p.poll() is None and time.monotonic() < deadline, "campe train did not take its lock"
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    code, err = run_cli(capsys, "train", "--params", str(params), "--method", "vanilla", "--steps", "2",
                        "--out", str(out))
    assert code == 0, err
    assert (out / "model.pt").exists()


def _ddp_rank(rank: int, port: int, params: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from campe.cli import main
    sys.exit(main(["train", "--params", params, "--method", "vanilla", "--steps", "2", "--out", out]))


def test_ddp_ranks_all_stop_when_rank_0_is_refused(project, holder):
    """Under DDP only rank 0 takes the lock; when it is refused every rank exits 1 at once (none waits forever
    in a collective)."""
    root, params = project
    out = root / "data" / "models" / "ddp"
    holder(out, "campe train")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Plain processes (torch's spawn would kill the other rank as soon as one exits): each must stop on its own.
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_ddp_rank, args=(rank, port, str(params), str(out))) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=120)
        assert [proc.exitcode for proc in procs] == [1, 1]  # None: a rank still waiting
    finally:
        for proc in procs:
            proc.kill()
    assert not out.exists()
