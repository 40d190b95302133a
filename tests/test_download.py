"""The download stage against real img2dataset: file:// and loopback HTTP, broken inputs, stats, retry-failed."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import pandas as pd
import pytest

from campe.data.shards import iter_samples, sample_key, shard_paths, sort_shard
from stages.download import DownloadError, DownloadParams, read_url_list, resolve_url
from stages.download import run_stage as download_stage


def _params(tmp: Path, url_list: Path, name: str, **kw) -> DownloadParams:
    base = dict(url_list=str(url_list), output_dir=str(tmp / name), stats_file=str(tmp / f"{name}_stats.json"),
                extra_columns=["image_id"], image_size=32, processes_count=2, thread_count=4,
                number_sample_per_shard=20, timeout=3, min_success_rate=0.5)
    base.update(kw)
    return DownloadParams(**base)


@pytest.fixture(scope="module")
def broken_list(tiny_generated, tmp_path_factory):
    """The tiny train list plus a missing file, a non-image payload and a truncated JPEG."""
    _, root = tiny_generated
    tmp = tmp_path_factory.mktemp("dl")
    good = pd.read_parquet(root / "urls" / "train.parquet")
    # The generated urls are relative to the generated list's folder; this list lives elsewhere.
    good["url"] = [resolve_url(u, root / "urls" / "train.parquet") for u in good["url"]]
    real_jpg = root / "images" / "train_000000.jpg"
    (tmp / "not_an_image.jpg").write_text("<html>this is a web page, not an image</html>")
    (tmp / "truncated.jpg").write_bytes(real_jpg.read_bytes()[:120])
    bad = pd.DataFrame({"url": [(tmp / n).as_uri() for n in ("missing.jpg", "not_an_image.jpg", "truncated.jpg")],
                        "caption": ["missing", "not an image", "truncated"], "image_id": ["x1", "x2", "x3"]})
    df = pd.concat([good[["url", "caption", "image_id"]], bad], ignore_index=True)
    path = tmp / "urls.parquet"
    df.to_parquet(path)
    return tmp, path, df, real_jpg


def _samples_by_uid(out: Path) -> dict[int, dict]:
    return {int(s["json"]["uid"]): s for s in iter_samples(out)}


def test_file_urls_shards_stats_and_retry_failed(broken_list):
    tmp, path, df, real_jpg = broken_list
    p = _params(tmp, path, "file")
    stats = download_stage(p)
    n_good = len(df) - 3
    assert (stats["samples"], stats["successes"], stats["failures"]) == (len(df), n_good, 3)
    assert (stats["failed_to_download"], stats["failed_to_resize"]) == (1, 2)
    errors = {e["error"]: e["count"] for e in stats["top_errors"]}
    assert errors.get("Image decoding error") == 2
    assert json.loads(Path(p.stats_file).read_text()) == stats

    # Shard contents: every good row once, with its caption, extras and the requested size.
    samples = _samples_by_uid(Path(p.output_dir))
    assert sorted(samples) == list(range(n_good))
    for uid, s in samples.items():
        assert s["txt"] == df.loc[uid, "caption"]
        assert s["json"]["image_id"] == df.loc[uid, "image_id"]
        assert s["jpg"].size == (32, 32)
    assert len(shard_paths(p.output_dir)) == -(-len(df) // p.number_sample_per_shard)
    for t in shard_paths(p.output_dir):  # in key order, whatever order img2dataset's threads wrote them in
        keys = list(dict.fromkeys(sample_key(n) for n in tarfile.open(t).getnames()))
        assert keys == sorted(keys), t

    # A plain re-run is incremental: finished shards are not rewritten.
    mtimes = {t: Path(t).stat().st_mtime_ns for t in shard_paths(p.output_dir)}
    assert download_stage(p)["attempted_this_run"] == 0
    assert {t: Path(t).stat().st_mtime_ns for t in shard_paths(p.output_dir)} == mtimes

    # Fix two of the three broken sources, then retry: only the failed rows are attempted.
    shutil.copy(real_jpg, tmp / "missing.jpg")
    shutil.copy(real_jpg, tmp / "not_an_image.jpg")
    stats = download_stage(p, retry_failed=True)
    retried = pd.read_parquet(Path(p.output_dir) / "_lists" / "pass-01.parquet")
    assert sorted(retried["uid"]) == [n_good, n_good + 1, n_good + 2]
    assert stats["attempted_this_run"] == 3
    assert (stats["successes"], stats["failures"], stats["passes"]) == (n_good + 2, 1, 2)
    samples = _samples_by_uid(Path(p.output_dir))
    assert sorted(samples) == list(range(n_good + 2))  # each uid exactly once across passes
    # The truncated JPEG still fails; a further retry tries only it.
    stats = download_stage(p, retry_failed=True)
    assert stats["attempted_this_run"] == 1 and stats["failures"] == 1


def test_success_rate_below_threshold_fails_with_stats_written(broken_list):
    tmp, path, df, _ = broken_list
    p = _params(tmp, path, "file", min_success_rate=0.999)
    # Reuses the finished shards of the test above when it ran first; runs the download otherwise.
    with pytest.raises(DownloadError, match=r"below download.min_success_rate=0.999.*--retry-failed"):
        download_stage(p)
    assert json.loads(Path(p.stats_file).read_text())["failures"] >= 1


def test_changed_params_refuse_to_mix_shards(broken_list):
    tmp, path, _, _ = broken_list
    p = _params(tmp, path, "mix", min_success_rate=0.0)
    (Path(p.output_dir)).mkdir(parents=True)
    (Path(p.output_dir) / "fingerprint.json").write_text(json.dumps({"image_size": 999}))
    with pytest.raises(DownloadError, match=r"different .*image_size.*--overwrite"):
        download_stage(p)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def http_root(tiny_generated):
    """A stdlib HTTP server on 127.0.0.1 serving the generated folder; yields its base URL."""
    _, root = tiny_generated
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loopback_http_with_404_refused_and_non_image(http_root, tiny_generated, tmp_path):
    _, root = tiny_generated
    names = sorted(x.name for x in (root / "images").glob("train_*.jpg"))[:10]
    urls = [f"{http_root}/images/{n}" for n in names]
    urls += [f"{http_root}/images/does_not_exist.jpg", f"{http_root}/manifest.json",
             f"http://127.0.0.1:{_closed_port()}/refused.jpg"]
    path = tmp_path / "urls.csv"
    pd.DataFrame({"link": urls, "text": [f"caption {i}" for i in range(len(urls))],
                  "image_id": [str(i) for i in range(len(urls))]}).to_csv(path, index=False)
    p = _params(tmp_path, path, "http", url_col="link", caption_col="text")
    stats = download_stage(p)
    assert (stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (10, 2, 1)
    errors = " | ".join(e["error"] for e in stats["top_errors"])
    assert "404" in errors and "refused" in errors.lower()
    samples = _samples_by_uid(Path(p.output_dir))
    assert sorted(samples) == list(range(10))
    assert all(samples[i]["txt"] == f"caption {i}" for i in range(10))


@pytest.mark.parametrize("case", ["missing_column", "empty", "no_file", "bad_suffix", "corrupt"])
def test_bad_url_lists_give_clear_errors(case, tmp_path):
    p = _params(tmp_path, tmp_path / "urls.parquet", "bad")
    path = Path(p.url_list)
    if case == "missing_column":
        pd.DataFrame({"url": ["file:///x.jpg"], "text": ["a"], "image_id": ["1"]}).to_parquet(path)
        match = r"urls.parquet has no column 'caption' \(from download.caption_col\).*\['url', 'text', 'image_id'\]"
    elif case == "empty":
        pd.DataFrame({"url": [], "caption": [], "image_id": []}).to_parquet(path)
        match = r"urls.parquet has no rows"
    elif case == "no_file":
        match = r"urls.parquet not found"
    elif case == "bad_suffix":
        path = tmp_path / "urls.xlsx"
        path.write_text("x")
        p = dataclasses.replace(p, url_list=str(path))
        match = r"urls.xlsx: unsupported format '.xlsx'"
    else:
        path.write_bytes(b"PAR1 this is not parquet")
        match = r"urls.parquet: cannot be read as parquet"
    with pytest.raises(DownloadError, match=match):
        read_url_list(path, p)
    with pytest.raises(DownloadError, match=match):
        download_stage(p)
    assert not Path(p.output_dir).exists() or not list(Path(p.output_dir).rglob("*.tar"))


def test_sort_shard_puts_samples_in_key_order_keeping_every_member(tmp_path):
    """A tar written in completion order is rewritten in key order, byte-equal members, atomically; a sorted tar is
    left untouched."""
    import io
    import random
    rng = random.Random(0)
    keys = [f"{i:07d}" for i in range(12)]
    shuffled = keys[:]
    rng.shuffle(shuffled)
    content = {f"{k}.{ext}": rng.randbytes(rng.randint(1, 3000)) for k in keys for ext in ("jpg", "txt", "json")}
    path = tmp_path / "00000.tar"
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # the permissions a plain open() gives (the rewrite must keep the shard readable)
    plain_mode = plain.stat().st_mode
    plain.unlink()
    with tarfile.open(path, "w") as tar:
        for k in shuffled:
            for ext in ("jpg", "txt", "json"):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(content[info.name])
                tar.addfile(info, io.BytesIO(content[info.name]))
    assert sort_shard(path) is True
    with tarfile.open(path) as tar:
        names = tar.getnames()
        got = {n: tar.extractfile(n).read() for n in names}
    assert list(dict.fromkeys(sample_key(n) for n in names)) == keys
    assert names[:3] == ["0000000.jpg", "0000000.txt", "0000000.json"]  # members of a sample keep their order
    assert got == content
    assert path.stat().st_mode == plain_mode
    mtime = path.stat().st_mtime_ns
    assert sort_shard(path) is False and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["00000.tar"]  # no temp file left


def test_null_and_blank_captions_are_counted_skips_not_downloaded(tiny_generated, tmp_path, capsys):
    """A null caption (not the text "None") and empty / whitespace-only ones are not downloaded: counted as failures
    by reason with their first uids (rows of the list) in the stats, like failed URLs; --retry-failed leaves them."""
    from stages.download import caption_skips

    _, root = tiny_generated
    good = pd.read_parquet(root / "urls" / "train.parquet")[["url", "caption", "image_id"]].head(10)
    good["url"] = [resolve_url(u, root / "urls" / "train.parquet") for u in good["url"]]  # the list lives elsewhere
    img = good.loc[0, "url"]
    bad = pd.DataFrame({"url": [img] * 4, "caption": [None, "   ", "", "\t\n"], "image_id": ["n", "w", "e", "t"]})
    df = pd.concat([good.iloc[:5], bad.iloc[:1], good.iloc[5:], bad.iloc[1:]], ignore_index=True)
    path = tmp_path / "urls.parquet"
    df.to_parquet(path)  # uids 0-4 and 6-10 good, 5 null, 11-13 blank
    p = _params(tmp_path, path, "captions")
    stats = download_stage(p)
    assert "skipping 1 row(s)" in capsys.readouterr().err
    assert (stats["samples"], stats["successes"], stats["failures"]) == (14, 10, 4)
    assert (stats["skipped_caption"], stats["not_attempted"], stats["failed_to_download"]) == (4, 0, 0)
    blank = "blank caption (empty or whitespace only)"
    assert stats["skipped"] == [
        {"reason": "null caption", "count": 1, "first": [{"uid": 5, "url": img}]},
        {"reason": blank, "count": 3, "first": [{"uid": u, "url": img} for u in (11, 12, 13)]}]
    assert {e["error"]: e["count"] for e in stats["top_errors"]} == {blank: 3, "null caption": 1}
    assert json.loads(Path(p.stats_file).read_text()) == stats
    samples = _samples_by_uid(Path(p.output_dir))
    assert sorted(samples) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert all(s["txt"].strip() and s["txt"] != "None" for s in samples.values())
    stats = download_stage(p, retry_failed=True)  # nothing to retry: the skipped rows are not failed downloads
    assert stats["attempted_this_run"] == 0 and stats["passes"] == 1 and stats["skipped_caption"] == 4

    # A csv's empty cell is a blank caption as well; a list with no usable caption is an input error.
    csv_path = tmp_path / "urls.csv"
    pd.DataFrame({"url": [img, img], "caption": ["a red circle", ""], "image_id": ["1", "2"]}).to_csv(csv_path,
                                                                                                       index=False)
    rows, skipped = caption_skips(read_url_list(csv_path, p))
    assert rows["uid"].tolist() == [0] and skipped == [{"reason": blank, "count": 1, "first": [{"uid": 1, "url": img}]}]
    df.iloc[[5, 11]].to_parquet(path)
    with pytest.raises(DownloadError, match=r"every one of its 2 rows has a null or blank caption"):
        download_stage(_params(tmp_path, path, "all_bad"))
