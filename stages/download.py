"""Stage `download`: a URL list -> webdataset shards with img2dataset, plus one stats metric.

    campe download                                   # params.yaml:download (default: the generated train list)
    campe download --url-list urls.parquet --out data/shards/train --stats metrics/download_stats.json
    campe download --retry-failed                    # re-download only the samples whose status was a failure

Layout of the output folder (one sub-folder per pass; every pass is plain img2dataset output):
    <out>/_lists/pass-00.parquet      the normalised input list of each pass (url, caption, extras, uid)
    <out>/pass-00/00000.tar|.parquet|_stats.json
    <out>/pass-01/...                 a --retry-failed pass: only the rows that had failed so far
    <out>/fingerprint.json            what the shards were made from (list hash + parameters)
`uid` is the row's index in the original URL list; a sample counts as downloaded if any pass fetched it. Each
finished tar is rewritten with its samples in key order and fixed member mtimes (campe.data.shards.sort_shard), so a
re-download is the same training data in the same order, in the same bytes.

Relative URLs: a url without a scheme (`../images/a.jpg`, as `campe generate` writes) is a reference relative to
the URL list's own location (RFC 3986). Only the temporary list handed to img2dataset holds it resolved (an absolute
file:// URL); every file written here (`_lists/`, each shard's .parquet and each sample's .json) keeps the url as
the list gives it, so the shards, and everything made from them, do not depend on where the checkout lies. http(s)
and other absolute URLs pass through unchanged.

Incremental: img2dataset's own incremental mode skips shards that have a `_stats.json`, so a re-run (or a run
after a kill) only does the unfinished shards. The stats roll-up reads finished shards only.

Captions: a row whose caption is null, empty or whitespace only is not downloaded (the text tower needs some text;
a null would otherwise become the text "None"). Such rows are failures like a failed URL: counted in the stats by
reason (`skipped`: reason, count and the first uids and URLs; `skipped_caption`; `top_errors`), and not retried.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from campe.core.config import load_params
from campe.core.io import output_lock
from campe.data.download import (CAPTION_SKIPS, DownloadError, DownloadInputError, DownloadParams, caption_skips,  # noqa: F401
                                 download, read_url_list, resolve_url, roll_up_stats)

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "download a URL list with img2dataset into webdataset shards"


def run_stage(p: DownloadParams, retry_failed: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the download (campe.data.download); with `retry_failed`, add a pass over the rows that failed
    so far. Holds the output folder's lock (campe.core.io.output_lock) throughout."""
    with output_lock(p.output_dir, "campe download"):
        return download(p, retry_failed, overwrite)


# ------------------------------------------------------------------------------------------------------------ CLI
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default="params.yaml", help="params file (section `download`)")
    ap.add_argument("--url-list", help="override download.url_list (parquet/csv/tsv)")
    ap.add_argument("--out", help="override download.output_dir")
    ap.add_argument("--stats", help="override download.stats_file")
    ap.add_argument("--retry-failed", action="store_true", help="re-download only the samples that failed so far")
    ap.add_argument("--overwrite", action="store_true", help="replace shards made from another list/params")


def run(args: argparse.Namespace) -> int:
    from stages.params import check_params  # here, not at the top: stages.params imports every stage

    check_params(args.params)  # the whole file, before any work
    overrides = {k: v for k, v in {"url_list": args.url_list, "output_dir": args.out,
                                   "stats_file": args.stats}.items() if v is not None}
    p = load_params(args.params, "download", DownloadParams, overrides)
    try:
        stats = run_stage(p, retry_failed=args.retry_failed, overwrite=args.overwrite)
    except DownloadError as e:
        print(f"campe download: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: stats[k] for k in ("samples", "successes", "success_rate", "shards", "images_per_s")}))
    return 0

