"""Where the clone lives: the generated data and everything made from it hold no absolute path of the checkout, so
two clones in different folders reproduce each other's dvc.lock hashes and model.pt byte for byte."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from campe.data.shards import iter_samples, shard_paths
from tests.test_download import http_root  # noqa: F401  (fixture: a loopback HTTP server on the generated set)
from tests.test_end_to_end import BIN, STAGES, _copy_repo, _repro, _sh
from tests.tiny_config import write_tiny_params

# Records of the run, not of the data: they differ between two runs in one folder too (wall-clock timings and the
# MLflow run id). The outputs holding them are compared file by file with exactly these fields left out.
RUN_RECORDS = {  # file name (a regular expression) -> the fields left out
    r"\d+_stats\.json": ("duration", "start_time", "end_time"),  # img2dataset's per-shard stats
    r"download_stats(\.headline)?\.json": ("seconds_this_run", "images_per_s"),
    r"metrics\.json": ("samples_per_s",),
    r"train(\.headline)?\.json": ("samples_per_s",),
    r"train_log\.csv": ("samples_per_s",),
    r"ckpt_last\.pt": ("mlflow_run_id",),
    r"mlflow_run_id\.txt": (),  # a random id: only its form is compared
    r"seed\d+\.json": ("seconds", "mlflow_run_id"),  # a prompt-learning cell's metrics (campe/attriprompt/trainer.py)
}
OUTS_WITH_RUN_RECORDS = {"data/shards/train", "data/models/campe", "metrics/download_stats.json", "metrics/train.json",
                         "metrics/download_stats.headline.json", "metrics/train.headline.json",
                         "data/models/prompt_learning", "metrics/prompt_learning/base2new"}


def _record_rule(name: str) -> tuple[str, ...] | None:
    return next((fields for pattern, fields in RUN_RECORDS.items() if re.fullmatch(pattern, name)), None)


def _comparable(path: Path) -> object:
    """The file's content as compared between the clones: its bytes, or without the run-record fields."""
    fields = _record_rule(path.name)
    if fields is None:
        return path.read_bytes()
    if path.name == "mlflow_run_id.txt":
        return bool(re.fullmatch(r"[0-9a-f]{32}", path.read_text().strip()))
    if path.suffix == ".json":
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in fields}
    if path.suffix == ".csv":
        return [{k: v for k, v in row.items() if k not in fields} for row in csv.DictReader(path.open())]
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for k in fields:
        ckpt.pop(k)
    buf = io.BytesIO()  # tensors and plain values of one structure serialise alike; compare the pickled bytes
    torch.save(ckpt, buf)
    return buf.getvalue()


def _holds(f: Path, needle: str) -> bool:
    """Whether the file holds `needle`: in its bytes, or, for a (compressed) Parquet file, in its decoded strings."""
    if needle.encode() in f.read_bytes():
        return True
    if f.suffix != ".parquet":
        return False
    pf = pq.ParquetFile(f)
    meta = pf.schema_arrow.metadata or {}
    if any(needle.encode() in v for v in meta.values()):
        return True
    table = pf.read()
    return any(needle in s for c in table.columns if c.type in ("string", "large_string")
               for s in c.to_pylist() if s)


def _out_files(repo: Path, rel: str) -> dict[str, Path]:
    p = repo / rel
    return {rel: p} if p.is_file() else {str(f.relative_to(repo)): f for f in sorted(p.rglob("*")) if f.is_file()}


def _lock_without_run_records(repo: Path) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for entry in stage.get("deps", []) + stage.get("outs", []):
            if entry["path"] in OUTS_WITH_RUN_RECORDS:
                for key in ("md5", "size", "nfiles"):
                    entry.pop(key, None)
    return lock


@pytest.fixture(scope="module")
def two_clones(tmp_path_factory, tiny_lm):
    """The tiny project copied into two folders of different depth and length, `dvc repro` in each."""
    root = tmp_path_factory.mktemp("clones")
    repos = [root / "a", root / "a-much-longer-folder-name-for-the-second-clone" / "nested" / "campe"]
    for repo in repos:
        repo.mkdir(parents=True)
        _copy_repo(repo)
        write_tiny_params(repo / "params.yaml", text_model=tiny_lm)  # one LM folder for both, outside the clones
        _sh(repo, "git", "init", "-q")
        _sh(repo, "git", "add", "-A")
        _sh(repo, "git", "commit", "-q", "-m", "tiny config")
        assert _repro(repo) == STAGES
    return repos


def test_two_clones_in_different_folders_give_the_same_lock_hashes_and_model(two_clones):
    """Two clones in different folders reproduce each other's dvc.lock hashes for every stage's outputs (those
    holding wall-clock timings or the MLflow run id: every file equal but for those fields) and model.pt byte for
    byte, and no output or metrics file tracked by DVC holds the clone's path."""
    a, b = two_clones
    lock_a, lock_b = _lock_without_run_records(a), _lock_without_run_records(b)
    assert lock_a.keys() == lock_b.keys() and lock_a["stages"].keys() == lock_b["stages"].keys()
    for name, stage in lock_a["stages"].items():  # stage by stage, so a failure names the stage and the entry
        for kind in ("deps", "outs"):
            assert stage.get(kind) == lock_b["stages"][name].get(kind), (name, kind)
    assert lock_a == lock_b
    outs = [o for s in lock_a["stages"].values() for o in s["outs"]]
    hashed = {o["path"] for o in outs if "md5" in o}
    assert {"data/generated", "data/cache/train", "metrics/eval/generated.json", "plots/eval/generated"} <= hashed

    assert (a / "data/models/campe/model.pt").read_bytes() == (b / "data/models/campe/model.pt").read_bytes()
    for rel in OUTS_WITH_RUN_RECORDS:
        files_a, files_b = _out_files(a, rel), _out_files(b, rel)
        assert files_a.keys() == files_b.keys() and files_a, rel
        for name in files_a:
            assert _comparable(files_a[name]) == _comparable(files_b[name]), name

    for repo in (a, b):
        for o in outs:
            for name, f in _out_files(repo, o["path"]).items():
                assert not _holds(f, str(repo)), f"{name} holds the clone's path {repo}"


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A folder where `campe generate --out gen` ran on the tiny config."""
    tmp = tmp_path_factory.mktemp("generate-cli")
    write_tiny_params(tmp / "params.yaml")
    _sh(tmp, str(BIN / "campe"), "generate", "--out", "gen")
    return tmp


def test_generated_url_lists_hold_no_absolute_path(generated):
    """`campe generate` writes URL lists whose urls are relative to the list's folder: no scheme, no absolute path,
    no trace of the folder it was run in; each names a generated image."""
    for split in ("train", "val", "test"):
        urls = pq.read_table(generated / "gen" / "urls" / f"{split}.parquet").column("url").to_pylist()
        assert urls
        for url in urls:
            assert not urlsplit(url).scheme and not url.startswith("/"), url
            assert (generated / "gen" / "urls" / url).is_file(), url
    files = [f for f in (generated / "gen").rglob("*") if f.is_file()]
    assert files and not [f for f in files if _holds(f, str(generated))]


def test_download_of_a_relative_list_records_no_checkout_path(generated, http_root):  # noqa: F811
    """`campe download` of a list with relative URLs resolves them against the list's folder (not the working
    directory), and its shards (.tar samples' .json, .parquet), pass lists and stats record each url as the list
    gives it, a failure's error message included: no trace of the folder; so does a --retry-failed pass. An http
    URL passes through unchanged."""
    root = generated
    rows = pd.read_parquet(root / "gen" / "urls" / "train.parquet")[["url", "caption", "image_id", "aspects"]]
    extra = pd.DataFrame({"url": ["../images/does_not_exist.jpg", f"{http_root}/images/train_000001.jpg"],
                          "caption": ["a missing file", "over http"], "image_id": ["missing", "http"],
                          "aspects": ["[]", "[]"]})
    urls = pd.concat([rows, extra], ignore_index=True)
    urls.to_parquet(root / "gen" / "urls" / "mixed.parquet", index=False)
    # Run from the folder above gen/: "../images" from here is no folder, so success means list-relative.
    _sh(root, str(BIN / "campe"), "download", "--url-list", "gen/urls/mixed.parquet", "--out", "shards",
        "--stats", "stats.json")

    stats = json.loads((root / "stats.json").read_text())
    assert (stats["samples"], stats["successes"]) == (len(urls), len(urls) - 1)
    assert [e["error"] for e in stats["top_errors"]] and "does_not_exist.jpg" in stats["top_errors"][0]["error"]
    samples = {int(s["json"]["uid"]): s["json"] for s in iter_samples(root / "shards")}
    assert sorted(samples) == [u for u in range(len(urls)) if u != len(urls) - 2]
    assert all(samples[u]["url"] == urls.loc[u, "url"] for u in samples)  # as the list gives it, http included
    table = pd.concat([pd.read_parquet(Path(t).with_suffix(".parquet")) for t in shard_paths(root / "shards")])
    assert sorted(zip(table["uid"], table["url"])) == list(enumerate(urls["url"]))
    written = [root / "stats.json", *(f for f in (root / "shards").rglob("*") if f.is_file())]
    assert len(written) > 5 and not [f for f in written if _holds(f, str(root))]

    # --retry-failed resolves the failed relative row again (from the pass list, which keeps it relative).
    shutil.copy(root / "gen" / "images" / "train_000000.jpg", root / "gen" / "images" / "does_not_exist.jpg")
    _sh(root, str(BIN / "campe"), "download", "--url-list", "gen/urls/mixed.parquet", "--out", "shards",
        "--stats", "stats.json", "--retry-failed")
    samples = {int(s["json"]["uid"]): s["json"] for s in iter_samples(root / "shards")}
    assert sorted(samples) == list(range(len(urls)))
    assert samples[len(urls) - 2]["url"] == "../images/does_not_exist.jpg"
    written = [root / "stats.json", *(f for f in (root / "shards").rglob("*") if f.is_file())]
    assert len(list((root / "shards").glob("pass-01/*.tar"))) == 1
    assert not [f for f in written if _holds(f, str(root))]


def test_cache_manifest_of_the_packaged_model_names_no_venv_folder():
    """A cache of the packaged model ("minilm") records it by that name: its folder lies inside the checkout's venv
    (`make repro` makes one per clone), so the resolved path would make every clone's cache manifest differ."""
    from campe.text.cache_manifest import cache_manifest
    from campe.text.model_folder import resolve_model_path
    from campe.text.multiprompt import build_text_encoder

    encoder = build_text_encoder(model_path="minilm", k=2)
    manifest = cache_manifest(encoder)
    assert manifest["model_path"] == manifest["tokenizer"] == "minilm"
    folder = str(Path(resolve_model_path("minilm")).parent)
    assert not [k for k, v in manifest.items() if folder in json.dumps(v)]
