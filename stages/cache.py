"""Stage `cache`: run the frozen layers of the text LM once over every caption; training then runs only the rest.

    campe cache                                          # params.yaml sections `cache` and `text_encoder`
    campe cache --shards data/shards/train --out data/cache/train --limit 500 --batch-size 32
    campe cache --repair                                 # read every finished shard fully; redo those that fail
    campe cache --on-mismatch rebuild                    # params changed since the cache was made: start over
    torchrun --nproc-per-node 4 --no-python campe cache  # each rank caches its share of the shards

For each finished image shard `<shards>/pass-NN/NNNNN.tar` it writes `<out>/pass-NN/NNNNN.parquet`: per caption the
hidden states entering the first trainable layer (all but the last `text_encoder.trainable_layers` layers, APT
placeholders not yet replaced, negated prompts included when `text_encoder.negation` is on) in float16/bfloat16,
plus the token layout. `<out>/manifest.json` records what the cache depends on; training refuses a cache whose
manifest does not match its `text_encoder` params (see campe/text/cache_manifest.py).

Resumable and atomic: a shard is written to a hidden temp name, fsynced and renamed, so a killed run leaves no
shard that a later run or training would read; a re-run skips finished shards, redoes ones whose footer is
unreadable or whose image shard changed (size, or a digest of its sample names, order and captions:
a re-download may reorder samples), and removes temp files left by a killed run. `--repair` also reads every
finished shard in full (page checksums, every row) and redoes the ones that fail. Out of disk mid-shard: the temp
file is removed and the error says so. Captions are batched by token length within windows of 16 batches (less
padding); rows are stored in the tar's order. `--limit N` caches only the first N captions (in shard order).

Parallelism: under torchrun (RANK / WORLD_SIZE / LOCAL_WORLD_SIZE in the environment) rank r takes shards
r, r+W, r+2W, ... with no communication; torch threads = `threads`, or the cores this process may use divided by
the local ranks. Device `auto`: cuda:LOCAL_RANK when there is a GPU, else the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from campe.core.config import load_params
from campe.core.io import atomic_write_json, output_lock
from campe.core.threads import torch_threads
from campe.data.imageprep import (DEFAULT_MAX_SKIP_FRACTION, SHOWN_SKIPS, ImageDecodeError, SkipCounter, decode_image,
                                  validate_max_skip_fraction)
from campe.data.shards import image_bytes, sample_caption, shard_paths, shard_sample_count
from campe.text.cache_manifest import (CACHE_DTYPES, CacheCorruptError, CacheError, CacheMismatchError, MANIFEST,
                                       MANIFEST_COMPARED, cache_manifest, manifest_differences)
from campe.text.cache_shards import (ShardWriter, cache_shard_path, is_disk_full, iter_tar_samples, remove_stale_temps,
                                     shard_meta, tar_source_digest, truncated_rows, verify_cache_shard)
from campe.text.cached_tower import LayoutMaker
from campe.text.multiprompt import DEFAULT_EMBED_DIM, MultiPromptConfig, MultiPromptTextEncoder, build_text_encoder


# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "precompute the frozen text-LM hidden states of every caption (resumable, sharded)"

MISMATCH = ("error", "rebuild")
DEVICES = ("auto", "cpu", "cuda")
BUCKET_BATCHES = 16  # length bucketing sorts windows of this many batches (bounded memory, rows kept in tar order)


@dataclass
class CacheParams:
    """params.yaml section `cache` (the text model itself: section `text_encoder`, shared with training)."""
    shards_dir: str = "data/shards/train"  # the download stage's output
    output_dir: str = "data/cache/train"
    dtype: str = "float16"  # float16 | bfloat16: storage of the hidden states
    batch_size: int = 64  # captions per forward pass
    length_bucketing: bool = True  # sort captions by token length within windows of 16 batches (less padding)
    limit: int = 0  # cache only the first N captions (0: all); for quick runs
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads; 0: the cores this process may use / local ranks
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION  # undecodable images: stop once more than this fraction

    def validate(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype '{self.dtype}' is not one of: {', '.join(CACHE_DTYPES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0: all captions), got {self.limit}")
        if self.device not in DEVICES:
            raise ValueError(f"device '{self.device}' is not one of: {', '.join(DEVICES)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: all cores given), got {self.threads}")
        validate_max_skip_fraction(self.max_skip_fraction)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def _threads(requested: int) -> int:
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))


def _device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CacheError("cache.device is 'cuda' but torch sees no GPU; use device: auto or cpu")
    return torch.device("cuda", _env_int("LOCAL_RANK", 0))


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="captions", dynamic_ncols=True,
                disable=total == 0 or os.environ.get("CAMPE_NO_PROGRESS") == "1")


def _budgets(shards: list[str], limit: int) -> list[int | None]:
    """Captions to cache per shard: None = all; with a limit, the first `limit` captions in shard order."""
    if not limit:
        return [None] * len(shards)
    out, left = [], limit
    for s in shards:
        n = min(shard_sample_count(s), left)
        out.append(n)
        left -= n
    return out


def _shard_state(path: Path, tar: str, budget: int | None, repair: bool) -> tuple[str, str]:
    """('done' | 'todo', why) for a cache shard: done if complete (or holding its budget) and from this tar."""
    if not path.exists():
        return "todo", "new"
    try:
        meta = verify_cache_shard(path) if repair else shard_meta(path)
    except CacheCorruptError as e:
        return "todo", f"unreadable, redoing it: {e}"
    if "source_digest" not in meta:
        return "todo", "cached by an older campe (no digest of its image shard), redoing it"
    if meta.get("source_bytes") != os.path.getsize(tar) or meta["source_digest"] != tar_source_digest(tar):
        return "todo", f"{tar} changed since it was cached (its samples, captions or their order), redoing it"
    if meta.get("complete") or (budget is not None and meta.get("rows", 0) >= budget):
        return "done", ""
    return "todo", "cut short by an earlier --limit run, completing it"


@torch.no_grad()
def _encode_window(encoder: MultiPromptTextEncoder, maker: LayoutMaker, window: list[tuple[str, str]],
                   p: CacheParams, device: torch.device, writer: ShardWriter, bar) -> int:
    """Frozen states of a window of captions, batched by length, written in the window's (tar) order; returns how
    many captions were longer than text_encoder.max_length (truncated to it)."""
    keys, captions = [k for k, _ in window], [c for _, c in window]
    layout = maker(captions)  # tokenized once; batches are row subsets of it
    lengths = layout.lengths
    order = torch.argsort(lengths, descending=True, stable=True) if p.length_bucketing else torch.arange(len(keys))
    rows: list[torch.Tensor | None] = [None] * len(keys)
    dtype = CACHE_DTYPES[p.dtype]
    for chunk in order.split(p.batch_size):
        sub = layout.select(chunk).to(device)  # trimmed to its longest row
        h = encoder.frozen_hidden(sub).to(dtype).cpu()
        for j, r in enumerate(chunk.tolist()):
            rows[r] = h[j, :int(lengths[r])]
        bar.update(len(chunk))
    writer.write(keys, captions, rows, layout)
    return layout.n_truncated


def _cache_shard(encoder: MultiPromptTextEncoder, maker: LayoutMaker, tar: str, path: Path, budget: int | None,
                 p: CacheParams, device: torch.device, bar, skips: SkipCounter) -> int:
    """Write one cache shard (atomically); returns its rows. Samples whose image does not decode are left out,
    counted in `skips` (which warns and stops the stage past cache.max_skip_fraction) and listed in the shard's
    metadata, so training skips them too."""
    window_size = p.batch_size * BUCKET_BATCHES if p.length_bucketing else p.batch_size
    meta = {"source": os.path.relpath(tar, p.shards_dir), "source_bytes": os.path.getsize(tar),
            "source_digest": tar_source_digest(tar)}
    n, skipped, truncated, complete = 0, 0, 0, True
    undecodable: list[str] = []
    with ShardWriter(path, p.dtype, encoder.lm.config.hidden_size, meta) as w:
        window: list[tuple[str, str]] = []
        for key, parts in iter_tar_samples(tar):
            caption, img = sample_caption(parts), image_bytes(parts)
            if caption is None or img is None:
                skipped += 1  # training skips these samples as well
                continue
            if budget is not None and n >= budget:
                complete = False  # more captions follow: a later run without --limit completes the shard
                break
            try:
                decode_image(img)  # what training will do with it: a sample it would skip is not cached
            except ImageDecodeError as e:
                undecodable.append(key)
                skips.skip(tar, key, f"undecodable image ({e})")
                continue
            window.append((key, caption))
            n += 1
            if len(window) == window_size:
                truncated += _encode_window(encoder, maker, window, p, device, w, bar)
                window = []
        if window:
            truncated += _encode_window(encoder, maker, window, p, device, w, bar)
        w.meta.update(complete=complete, skipped_no_caption=skipped, undecodable=undecodable, truncated=truncated)
    return n


def cache_summary(shards: list[str], shards_dir: str, out: Path) -> dict[str, Any]:
    """Over every finished cache shard: cached captions, captions truncated to text_encoder.max_length, and samples
    left out because their image does not decode (count and the first shard:key)."""
    rows = truncated = count = 0
    first: list[str] = []
    for tar in shards:
        path = cache_shard_path(tar, shards_dir, out)
        if not path.exists():
            continue
        meta = shard_meta(path)
        rows += int(meta.get("rows", 0))
        truncated += truncated_rows(path, meta)
        keys = meta.get("undecodable", [])
        count += len(keys)
        first.extend(f"{tar}:{k}" for k in keys[:max(0, SHOWN_SKIPS - len(first))])
    return {"cached_captions": rows, "truncated_captions": truncated,
            "undecodable_images": {"count": count, "first": first}}


def _write_manifest_summary(out: Path, manifest: dict[str, Any], shards: list[str], shards_dir: str
                            ) -> dict[str, Any]:
    """The manifest with cache_summary(...) added. Under torchrun several ranks end at different times: each
    summarises and writes under an exclusive lock on the folder, so the last one sees every rank's shards."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        summary = cache_summary(shards, shards_dir, out)
        atomic_write_json(out / MANIFEST, {**manifest, **summary})
    finally:
        os.close(fd)  # releases the lock
    return summary


def run_stage(p: CacheParams, text_encoder: MultiPromptConfig, *, embed_dim: int = DEFAULT_EMBED_DIM,
              repair: bool = False, overwrite: bool = False, on_mismatch: str = "error", rank: int | None = None,
              world_size: int | None = None, encoder: MultiPromptTextEncoder | None = None) -> dict[str, Any]:
    """Cache (or resume caching) this rank's shards; returns a summary. `encoder`: use this one instead of
    building it from `text_encoder` (tests pass tiny models). `embed_dim` (model.embed_dim) only sizes the heads,
    which the cache never runs."""
    p.validate()
    if text_encoder.lora:
        raise CacheError("text_encoder.lora (method mean_lora): LoRA changes every layer of the LM during training, "
                         "so there are no frozen states to cache; train it online (train.cache_dir: '')")
    if on_mismatch not in MISMATCH:
        raise ValueError(f"on_mismatch must be one of {MISMATCH}, got {on_mismatch!r}")
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    # The ranks share no process group: rank 0 takes the folder's lock (the one a single process takes), rank r > 0
    # a lock of its own, so a second launch fails at its rank 0 at once.
    # the thread count is restored after the stage: it runs in-process in `campe ablate` and the flows
    with (output_lock(p.output_dir, "campe cache", part=f"rank{rank}" if rank else ""),
          torch_threads(_threads(p.threads))):
        return _cache(p, text_encoder, embed_dim, repair, overwrite, on_mismatch, rank, world_size, encoder)


def _cache(p: CacheParams, text_encoder: MultiPromptConfig, embed_dim: int, repair: bool, overwrite: bool,
           on_mismatch: str, rank: int, world_size: int, encoder: MultiPromptTextEncoder | None) -> dict[str, Any]:
    out = Path(p.output_dir)
    shards = shard_paths(p.shards_dir)
    if not shards:
        raise CacheError(f"{p.shards_dir}: no finished image shards (pass-NN/NNNNN.tar with _stats.json); run "
                         f"`campe download` first or set cache.shards_dir")
    device = _device(p.device)
    if encoder is None:
        encoder = build_text_encoder(text_encoder, embed_dim=embed_dim)
    encoder = encoder.to(device).eval()
    manifest = {**cache_manifest(encoder, p.dtype), "limit": p.limit, "shards_dir": str(p.shards_dir)}
    _open_output(out, manifest, overwrite, on_mismatch, world_size)

    plan = _Plan.make(shards, p, out, rank, world_size, repair)
    written, nbytes, redone, seconds = _write_shards(encoder, plan, p, out, device, rank, world_size)
    summary = _write_manifest_summary(out, manifest, shards, p.shards_dir)
    todo, mine = plan.todo, plan.mine
    return {**summary, "shards": len(shards), "rank": rank, "world_size": world_size, "shards_this_rank": len(mine),
            "shards_written": len(todo), "shards_skipped": len(mine) - len(todo), "shards_redone": redone,
            "captions_written": written, "seconds": round(seconds, 2),
            "captions_per_s": round(written / seconds, 1) if written and seconds > 0 else 0.0,
            "bytes_written": nbytes, "bytes_per_caption": round(nbytes / written, 1) if written else 0.0,
            "threads": torch.get_num_threads(), "device": str(device), "output_dir": str(out)}


def _open_output(out: Path, manifest: dict[str, Any], overwrite: bool, on_mismatch: str, world_size: int) -> None:
    """Keep a cache made with the same settings, replace or refuse one made with others (and a folder this stage did
    not write); then write the manifest (every rank writes the same content, atomically)."""
    if (overwrite or on_mismatch == "rebuild") and world_size > 1 and (out / MANIFEST).exists():
        found = json.loads((out / MANIFEST).read_text())
        if overwrite or manifest_differences(found, manifest, MANIFEST_COMPARED + ("dtype",)):
            raise CacheError("--overwrite / --on-mismatch rebuild delete the cache: run that once with a single "
                             "process, then launch the ranks")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if (out / MANIFEST).exists():
        try:
            found = json.loads((out / MANIFEST).read_text())
        except ValueError:
            found = {}
        diff = manifest_differences(found, manifest, MANIFEST_COMPARED + ("dtype",))
        if diff and on_mismatch == "rebuild":
            print(f"campe cache: {out} was made with other settings ({'; '.join(diff)}); rebuilding it",
                  file=sys.stderr)
            shutil.rmtree(out)
        elif diff:
            raise CacheMismatchError(
                f"{out} holds a cache made with other settings: {'; '.join(diff)}. Re-run with --on-mismatch "
                f"rebuild (or --overwrite) to replace it, or choose another --out")
    elif out.exists() and any(out.glob("pass-*/*.parquet")):
        raise CacheError(f"{out} has cache shards but no {MANIFEST}: it was not written by this stage; remove it "
                         f"or re-run with --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST, manifest)  # every rank writes the same content (atomic rename)


@dataclass
class _Plan:
    """This rank's shards: `mine` (indices into `shards`), their caption budgets and states, and the `todo` ones."""
    shards: list[str]
    budgets: list[int | None]
    mine: list[int]
    states: dict[int, tuple[str, str]]
    todo: list[int]

    @classmethod
    def make(cls, shards: list[str], p: CacheParams, out: Path, rank: int, world_size: int, repair: bool) -> _Plan:
        budgets = _budgets(shards, p.limit)
        mine = [i for i in range(rank, len(shards), world_size) if budgets[i] is None or budgets[i] > 0]
        states = {}
        for i in mine:
            path = cache_shard_path(shards[i], p.shards_dir, out)
            remove_stale_temps(path)  # left by a killed run (only this rank touches its shards)
            states[i] = _shard_state(path, shards[i], budgets[i], repair)
        return cls(shards, budgets, mine, states, [i for i in mine if states[i][0] == "todo"])

    def expected(self, i: int) -> int:
        return self.budgets[i] if self.budgets[i] is not None else shard_sample_count(self.shards[i])


def _write_shards(encoder: MultiPromptTextEncoder, plan: _Plan, p: CacheParams, out: Path, device: torch.device,
                  rank: int, world_size: int) -> tuple[int, int, list[str], float]:
    """Cache the plan's todo shards; returns (captions written, bytes written, shards redone, seconds)."""
    shards, todo = plan.shards, plan.todo
    total = sum(plan.expected(i) for i in plan.mine)
    done_captions = sum(plan.expected(i) for i in plan.mine if i not in todo)
    maker = LayoutMaker(encoder)
    skips = SkipCounter("campe cache", total, p.max_skip_fraction, "cache.max_skip_fraction")
    for i in plan.mine:
        if i not in todo:  # finished by an earlier run, which warned about them then
            meta = shard_meta(cache_shard_path(shards[i], p.shards_dir, out))
            skips.add_known([f"{shards[i]}:{k}" for k in meta.get("undecodable", [])])
    t0, written, nbytes, redone = time.perf_counter(), 0, 0, []
    bar = _progress(total, done_captions, f"campe cache [{rank}/{world_size}]" if world_size > 1 else "campe cache")
    try:
        for i in todo:
            path = cache_shard_path(shards[i], p.shards_dir, out)
            why = plan.states[i][1]
            if why != "new":
                print(f"campe cache: {path}: {why}", file=sys.stderr)
                redone.append(str(path))
            try:
                written += _cache_shard(encoder, maker, shards[i], path, plan.budgets[i], p, device, bar, skips)
            except OSError as e:
                if is_disk_full(e):
                    kept = len(list(out.glob("pass-*/*.parquet")))
                    raise CacheError(
                        f"out of disk space writing cache shard {path} ({e}); no partial shard was left behind. "
                        f"Free space under {out} and re-run `campe cache`: the {kept} finished shards are kept"
                    ) from None
                raise
            nbytes += path.stat().st_size
    finally:
        bar.close()
    return written, nbytes, redone, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------------ CLI
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default="params.yaml", help="params file (sections `cache` and `text_encoder`)")
    ap.add_argument("--shards", help="override cache.shards_dir (the download stage's output)")
    ap.add_argument("--out", help="override cache.output_dir")
    ap.add_argument("--limit", type=int, help="override cache.limit: cache only the first N captions")
    ap.add_argument("--batch-size", type=int, help="override cache.batch_size")
    ap.add_argument("--dtype", choices=tuple(CACHE_DTYPES), help="override cache.dtype")
    ap.add_argument("--device", choices=DEVICES, help="override cache.device")
    ap.add_argument("--threads", type=int, help="override cache.threads")
    ap.add_argument("--repair", action="store_true",
                    help="read every finished shard in full and redo the ones that fail (truncated / corrupt)")
    ap.add_argument("--overwrite", action="store_true", help="delete the output folder first and cache everything")
    ap.add_argument("--on-mismatch", choices=MISMATCH, default="error",
                    help="when the existing cache was made with other text_encoder params: error (default) or "
                         "rebuild it")


def run(args: argparse.Namespace) -> int:
    from stages.params import check_params, joint_embed_dim  # here, not at the top: it imports every stage

    data = check_params(args.params)  # the whole file, before any work
    overrides = {k: v for k, v in {"shards_dir": args.shards, "output_dir": args.out, "limit": args.limit,
                                   "batch_size": args.batch_size, "dtype": args.dtype, "device": args.device,
                                   "threads": args.threads}.items() if v is not None}
    p = load_params(args.params, "cache", CacheParams, overrides)
    enc = load_params(args.params, "text_encoder", MultiPromptConfig)
    try:
        summary = run_stage(p, enc, embed_dim=joint_embed_dim(data), repair=args.repair, overwrite=args.overwrite,
                            on_mismatch=args.on_mismatch)
    except CacheError as e:
        print(f"campe cache: error: {e}", file=sys.stderr)
        return 1
    n, cached = summary["truncated_captions"], summary["cached_captions"]
    print(f"campe cache: {n} of {cached} cached captions were longer than text_encoder.max_length="
          f"{enc.max_length} tokens and were truncated to it; {summary['undecodable_images']['count']} sample(s) "
          f"left out with an undecodable image (both counted in {Path(p.output_dir) / MANIFEST})", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("shards", "rank", "shards_written", "shards_skipped",
                                              "captions_written", "captions_per_s", "bytes_per_caption",
                                              "truncated_captions")}
                     | {"undecodable_images": summary["undecodable_images"]["count"]}))
    return 0
