"""Downloading a URL list into webdataset shards with img2dataset: the input list, the passes, the shards' normal
form and the stats. The stage (stages/download.py) holds the output lock and reads the params; its docstring
describes the output folder, relative URLs, resuming and the caption checks.

    from campe.data.download import DownloadParams, download
    stats = download(DownloadParams(url_list="urls.parquet", output_dir="shards"))   # caller holds the output lock
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

from campe.core.io import atomic_file, atomic_write_bytes, atomic_write_json, write_metrics
from campe.data.shards import shard_paths, sort_shard

INPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


class DownloadError(RuntimeError):
    """The download stage cannot go on (bad input list, img2dataset failure, success rate too low)."""


class DownloadInputError(DownloadError):
    """The URL list or the output folder is unusable as given: retrying cannot help, fixing the input can."""


@dataclass
class DownloadParams:
    """params.yaml section `download`."""

    url_list: str = "data/generated/urls/train.parquet"
    output_dir: str = "data/shards/train"
    stats_file: str = "metrics/download_stats.json"
    url_col: str = "url"
    caption_col: str = "caption"
    extra_columns: list[str] = field(default_factory=lambda: ["image_id", "aspects"])  # copied into each sample's .json
    image_size: int = 64
    resize_mode: str = "border"
    encode_quality: int = 95
    processes_count: int = 2
    thread_count: int = 16
    number_sample_per_shard: int = 3000
    retries: int = 0  # img2dataset's own per-request retries
    timeout: int = 10  # seconds per request, so an unreachable host never hangs the stage
    distributor: str = "multiprocessing"  # or "pyspark" / "ray" for a cluster (install them yourself)
    min_success_rate: float = 0.9

    def validate(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if not 0.0 <= self.min_success_rate <= 1.0:
            raise ValueError(f"min_success_rate must be in [0, 1], got {self.min_success_rate}")
        for name in ("image_size", "processes_count", "thread_count", "number_sample_per_shard", "timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.distributor not in ("multiprocessing", "pyspark", "ray"):
            raise ValueError(f"distributor must be multiprocessing, pyspark or ray, got {self.distributor!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        # What changes the shards' contents; paths, rates and parallelism do not.
        keep = ("url_col", "caption_col", "extra_columns", "image_size", "resize_mode", "encode_quality",
                "number_sample_per_shard")
        return {k: getattr(self, k) for k in keep}


# ------------------------------------------------------------------------------------------------------ input list
def read_url_list(path: str | Path, p: DownloadParams):
    """Read and check a URL list; return a DataFrame with url, caption, the extra columns and `uid`."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DownloadInputError(f"URL list {path} not found (set download.url_list in params.yaml or pass --url-list)")
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DownloadInputError(f"URL list {path}: unsupported format '{path.suffix}'; use one of "
                            f"{', '.join(INPUT_FORMATS)}")
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False)
    except Exception as e:  # pyarrow/pandas raise many types for a corrupt file
        raise DownloadInputError(f"URL list {path}: cannot be read as {fmt}: {e}") from None
    wanted = {"download.url_col": p.url_col, "download.caption_col": p.caption_col}
    wanted.update({f"download.extra_columns[{i}]": c for i, c in enumerate(p.extra_columns)})
    for key, col in wanted.items():
        if col not in df.columns:
            raise DownloadInputError(f"URL list {path} has no column '{col}' (from {key}); its columns are "
                                f"{list(df.columns)}. Set {key.split('[')[0]} in params.yaml to the right name.")
    if len(df) == 0:
        raise DownloadInputError(f"URL list {path} has no rows: nothing to download")
    out = df[[p.url_col, p.caption_col, *p.extra_columns]].copy()
    out.columns = ["url", "caption", *p.extra_columns]
    out["url"] = out["url"].astype(str)
    null = out["caption"].isna()  # before astype(str), which would make a null the text "None" / "nan"
    out["caption"] = out["caption"].where(null, out["caption"].astype(str))
    out["uid"] = range(len(out))
    return out


CAPTION_SKIPS = {"null": "null caption", "blank": "blank caption (empty or whitespace only)"}
SHOWN_SKIPS = 10  # rows listed per skip reason in the stats


def caption_skips(df) -> tuple[Any, list[dict[str, Any]]]:
    """Split a URL list (read_url_list) into the rows to download and the rows skipped for their caption: a null
    caption, or one that is empty or whitespace only (the text tower needs some text). Returns (rows to download,
    [{"reason", "count", "first": [{"uid", "url"}, ...]}] per reason with rows), `uid` = the row of the list."""
    null = df["caption"].isna()
    blank = ~null & (df["caption"].fillna("").str.strip() == "")
    skipped = []
    for name, mask in (("null", null), ("blank", blank)):
        if mask.any():
            rows = df.loc[mask, ["uid", "url"]].head(SHOWN_SKIPS)
            skipped.append({"reason": CAPTION_SKIPS[name], "count": int(mask.sum()),
                            "first": [{"uid": int(u), "url": str(x)} for u, x in zip(rows["uid"], rows["url"])]})
    return df[~(null | blank)], skipped


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------------- passes
def _pass_dirs(out: Path) -> list[Path]:
    return sorted(d for d in out.glob("pass-[0-9][0-9]") if d.is_dir())


def _finished_shards(pass_dir: Path) -> list[str]:
    return sorted(s.name[: -len("_stats.json")] for s in pass_dir.glob("[0-9]*_stats.json"))


def is_relative_url(url: str) -> bool:
    """A non-empty URL without a scheme: a reference relative to the URL list's location."""
    return bool(url) and not urlsplit(url).scheme


def resolve_url(url: str, list_path: str | Path) -> str:
    """`url` resolved against the URL list's own file URL (a relative reference -> file://...; others unchanged).
    The list's path is made absolute lexically, not through symlinks: a DVC checkout may link the list into its
    cache, and `../images` means the folder beside the list's folder, as a browser would read it."""
    if not is_relative_url(url):
        return url
    return urljoin(Path(os.path.abspath(list_path)).as_uri(), url)


def _run_img2dataset(list_path: Path, pass_dir: Path, p: DownloadParams) -> None:
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="campe-download-") as tmp:
        handed = list_path
        rows = pd.read_parquet(list_path)
        absolute = rows["url"].map(lambda u: resolve_url(u, p.url_list))
        if not absolute.equals(rows["url"]):
            # img2dataset fetches the resolved URLs; the pass list itself keeps them as the URL list gives them.
            rows["url"] = absolute
            handed = Path(tmp) / list_path.name
            rows.to_parquet(handed, index=False)
        kwargs = dict(
            url_list=str(handed), input_format="parquet", url_col="url", caption_col="caption",
            save_additional_columns=["uid", *p.extra_columns], output_format="webdataset",
            output_folder=str(pass_dir), image_size=p.image_size, resize_mode=p.resize_mode,
            encode_quality=p.encode_quality, processes_count=p.processes_count, thread_count=p.thread_count,
            number_sample_per_shard=p.number_sample_per_shard, retries=p.retries, timeout=p.timeout,
            distributor=p.distributor, enable_wandb=False, incremental_mode="incremental",
        )
        kwargs_file = Path(tmp) / "kwargs.json"
        kwargs_file.write_text(json.dumps(kwargs))
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        # A process of its own: img2dataset's SIGINT handler needs the main thread (see campe/data/img2dataset_runner.py).
        rc = subprocess.run([sys.executable, "-m", "campe.data.img2dataset_runner", str(kwargs_file)], env=env).returncode
    if rc != 0:
        raise DownloadError(f"img2dataset exited with status {rc} on {list_path} (its output is above); "
                            "re-run the stage to resume: finished shards are kept")


class UrlRestorer:
    """Puts each relative URL back as the URL list gives it where img2dataset recorded the resolved one: the url of
    each sample's .json and of each shard's .parquet, and that URL or its local path inside an error message."""

    def __init__(self, urls: list[str], list_path: str | Path):
        self.given: dict[int, str] = {}  # uid -> the url as the list gives it (relative rows only)
        self.resolved: dict[int, str] = {}
        for uid, url in enumerate(urls):
            if is_relative_url(url):
                self.given[uid], self.resolved[uid] = url, resolve_url(url, list_path)

    def __bool__(self) -> bool:
        return bool(self.given)

    def message(self, uid: int, msg: Any) -> Any:
        if uid not in self.given or not isinstance(msg, str):
            return msg
        absolute = self.resolved[uid]
        return msg.replace(absolute, self.given[uid]).replace(url2pathname(urlsplit(absolute).path), self.given[uid])

    def fix_json(self, data: bytes) -> bytes | None:
        """A sample's .json (img2dataset writes json.dumps(meta, indent=4)) with its url restored; None: unchanged."""
        meta = json.loads(data)
        uid = meta.get("uid")
        if uid not in self.given:
            return None
        new = {**meta, "url": self.given[uid]}
        if "error_message" in meta:
            new["error_message"] = self.message(uid, meta["error_message"])
        return None if new == meta else json.dumps(new, indent=4).encode()


def _normalise_records(tar: Path, restorer: UrlRestorer) -> bool:
    """A shard's .parquet with its rows in key order (the tar's order; img2dataset writes them in completion order)
    and relative URLs restored in url and error_message, and its _stats.json with the same error messages; each
    written atomically, the stats first (a kill between leaves the parquet to map them again). False (and untouched)
    if already so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, stats_path = tar.with_suffix(".parquet"), tar.with_name(tar.stem + "_stats.json")
    table = pq.read_table(path)
    keys = table.column("key").to_pylist()
    changed = keys != sorted(keys)
    if changed:
        table = table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__)))
    if restorer:
        uids, msgs = table.column("uid").to_pylist(), table.column("error_message").to_pylist()
        restored = [restorer.message(u, m) for u, m in zip(uids, msgs)]
        renamed = {m: r for m, r in zip(msgs, restored) if m != r}
        if renamed:  # img2dataset counts failures by message in status_dict
            stats = json.loads(stats_path.read_text())
            counts: dict[str, int] = {}
            for m, n in stats.get("status_dict", {}).items():
                counts[renamed.get(m, m)] = counts.get(renamed.get(m, m), 0) + n
            if counts != stats.get("status_dict", {}):
                atomic_write_bytes(stats_path, json.dumps({**stats, "status_dict": counts}, indent=4).encode())
        new = {"url": [restorer.given.get(u, url) for u, url in zip(uids, table.column("url").to_pylist())],
               "error_message": restored}
        for name, values in new.items():
            if values != table.column(name).to_pylist():
                i = table.schema.get_field_index(name)
                table = table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))
                changed = True
    if not changed:
        return False
    with atomic_file(path) as f:
        pq.write_table(table, f)
    return True


def _normalise_shards(out: Path, restorer: UrlRestorer) -> int:
    """Every finished shard of every pass: samples (and .parquet rows) in key order, fixed tar member mtimes
    (campe.data.shards.sort_shard), relative URLs restored in the .parquet, the _stats.json and each .json. Returns the
    number of shards rewritten; a second call rewrites none."""
    changed = 0
    for tar in shard_paths(out):
        records = _normalise_records(Path(tar), restorer)
        changed += sort_shard(tar, fix_json=restorer.fix_json if restorer else None) or records
    return changed


def _complete(list_path: Path, pass_dir: Path, p: DownloadParams) -> bool:
    return len(_finished_shards(pass_dir)) >= math.ceil(_rows(list_path) / p.number_sample_per_shard)


def _read_status(out: Path):
    """uid -> final status rows over all finished shards of all passes (a success in any pass wins)."""
    import pandas as pd

    frames = []
    for i, d in enumerate(_pass_dirs(out)):
        for shard in _finished_shards(d):
            df = pd.read_parquet(d / f"{shard}.parquet", columns=["uid", "url", "status", "error_message"])
            df["pass"] = i
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["uid", "url", "status", "error_message", "pass"])
    allrows = pd.concat(frames, ignore_index=True)
    # Keep a success if there is one, else the latest attempt.
    allrows["ok"] = allrows["status"] == "success"
    allrows = allrows.sort_values(["uid", "ok", "pass"]).drop_duplicates("uid", keep="last")
    return allrows.drop(columns="ok")


def roll_up_stats(out: Path, total_rows: int, seconds: float, attempted: int,
                  skipped: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One metric file from img2dataset's per-shard parquet/stats: counts, success rate, top errors. `skipped`: the
    rows not downloaded for their caption (caption_skips): failures too, listed by reason with their first uids."""
    skipped = skipped or []
    status = _read_status(out)
    succ = int((status["status"] == "success").sum())
    failed = status[status["status"] != "success"]
    errors = collections.Counter(str(e) for e in failed["error_message"].fillna("unknown error"))
    errors.update({s["reason"]: s["count"] for s in skipped})
    shards = sum(len(_finished_shards(d)) for d in _pass_dirs(out))
    n_skipped = sum(s["count"] for s in skipped)
    return {
        "samples": total_rows,
        "successes": succ,
        "failures": total_rows - succ,
        "success_rate": round(succ / total_rows, 6) if total_rows else 0.0,
        "failed_to_download": int((failed["status"] == "failed_to_download").sum()),
        "failed_to_resize": int((failed["status"] == "failed_to_resize").sum()),
        "skipped_caption": n_skipped,
        "not_attempted": total_rows - len(status) - n_skipped,
        "top_errors": [{"error": e, "count": c} for e, c in errors.most_common(5)],
        "skipped": skipped,
        "passes": len(_pass_dirs(out)),
        "shards": shards,
        "attempted_this_run": attempted,
        "seconds_this_run": round(seconds, 2),
        "images_per_s": round(attempted / seconds, 1) if seconds > 0 and attempted else 0.0,
    }


# ---------------------------------------------------------------------------------------------------- the download
def download(p: DownloadParams, retry_failed: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the download into p.output_dir (the caller holds its lock); with `retry_failed`, add a pass
    over the rows that failed so far. Returns the stats (also written to p.stats_file)."""
    out, list_path = Path(p.output_dir), Path(p.url_list)
    every, df, skipped = _read_input(list_path, p)
    lists = _prepare_output(out, list_path, p, overwrite)
    t0 = time.perf_counter()
    attempted = _run_passes(out, lists, df, p, retry_failed)
    # Samples in key order (= URL-list order within a shard), whatever order the download threads finished in: a
    # re-download then gives the same training data order, and the cache stage keeps its shards. Relative URLs go
    # back to the list's form, so no shard records where the checkout lies.
    rewritten = _normalise_shards(out, UrlRestorer(every["url"].tolist(), list_path))  # indexed by uid
    if rewritten:
        print(f"campe download: put {rewritten} shard(s) in key order with the URLs as the list gives them")
    stats = roll_up_stats(out, len(every), time.perf_counter() - t0, attempted, skipped)
    stats["url_list"] = str(list_path)
    # `dvc metrics show` prints the headline; the counts by kind, errors and skips stay in the full file.
    write_metrics(p.stats_file, stats, {k: stats[k] for k in ("success_rate", "images_per_s") if k in stats})
    _check_success_rate(stats, list_path, p)
    return stats


def _read_input(list_path: Path, p: DownloadParams) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(every row of the list, the rows to download, the caption skips), the skips announced on stderr."""
    every = read_url_list(list_path, p)
    df, skipped = caption_skips(every)
    if len(df) == 0:
        raise DownloadInputError(f"URL list {list_path}: every one of its {len(every)} rows has a null or blank "
                                 f"caption (column '{p.caption_col}', download.caption_col); nothing to download")
    for s in skipped:
        print(f"campe download: skipping {s['count']} row(s) of {list_path} with a {s['reason']} (first uids: "
              f"{[r['uid'] for r in s['first']]}; counted in {p.stats_file})", file=sys.stderr)
    return every, df, skipped


def _prepare_output(out: Path, list_path: Path, p: DownloadParams, overwrite: bool) -> Path:
    """Refuse (or, with overwrite, remove) shards made from another list/params; write the fingerprint. Returns the
    folder of the pass lists."""
    fp = {"url_list": str(list_path), "url_list_sha256": _file_sha256(list_path), **p.fingerprint_fields()}
    fp_path = out / "fingerprint.json"
    if fp_path.exists():
        old = json.loads(fp_path.read_text())
        if old != fp and not overwrite:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise DownloadInputError(f"{out} holds shards made with different {', '.join(diff)}; "
                                f"re-run with --overwrite to replace them, or choose another --out")
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(fp_path, fp)
    lists = out / "_lists"
    lists.mkdir(exist_ok=True)
    return lists


def _write_list(df, path: Path) -> None:
    df.to_parquet(path.with_suffix(".tmp"), index=False)
    os.replace(path.with_suffix(".tmp"), path)


def _run_passes(out: Path, lists: Path, df, p: DownloadParams, retry_failed: bool) -> int:
    """Resume the newest pass (or start pass-00); with retry_failed, a new pass over the rows not yet downloaded.
    Returns the rows attempted."""
    attempted = 0
    passes = _pass_dirs(out)
    if not passes:
        _write_list(df, lists / "pass-00.parquet")
        passes = [out / "pass-00"]
    # Resume the newest pass if a previous run stopped inside it (earlier passes were complete when it started).
    last = passes[-1]
    last_list = lists / f"{last.name}.parquet"
    if not _complete(last_list, last, p):
        attempted += _rows(last_list)
        _run_img2dataset(last_list, last, p)
    if retry_failed:
        status = _read_status(out)
        ok = set(status.loc[status["status"] == "success", "uid"].tolist())
        todo = df[~df["uid"].isin(ok)]
        if len(todo) == 0:
            print("campe download: nothing to retry, every sample was downloaded")
        else:
            name = f"pass-{len(passes):02d}"
            _write_list(todo, lists / f"{name}.parquet")
            print(f"campe download: retrying {len(todo)} failed samples in {out / name}")
            attempted += len(todo)
            _run_img2dataset(lists / f"{name}.parquet", out / name, p)
    return attempted


def _check_success_rate(stats: dict[str, Any], list_path: Path, p: DownloadParams) -> None:
    if stats["success_rate"] < p.min_success_rate:
        top = "; ".join(f"{e['count']}x {e['error']}" for e in stats["top_errors"][:3]) or "none recorded"
        raise DownloadError(
            f"success rate {stats['success_rate']:.3f} of {list_path} is below download.min_success_rate="
            f"{p.min_success_rate} ({stats['failures']} of {stats['samples']} failed; top errors: {top}). "
            f"Stats in {p.stats_file}; try `campe download --retry-failed`, or fix the URL list.")


def _rows(list_path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(list_path).metadata.num_rows
