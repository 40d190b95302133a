"""Cache stage and training from the cache: equivalence with the full model, query-only last layer, online mode,
manifest checks, corrupt / truncated shards and --repair, resume, no partial shard on a failed write, rank split.

Image shards are real: the download stage on the tiny generated benchmark (3 shards of 16). Tiny decoders are built
from configs with random weights; MiniLM is the packaged default. Nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import resource
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


transformers = pytest.importorskip("transformers")
from transformers import AutoModel  # noqa: E402

from campe.text.cache_manifest import (CacheCorruptError, CacheError, CacheMismatchError, CacheMissingError,
                                       check_manifest)
from campe.text.cache_shards import cache_shard_path, read_cache_shard
from campe.text.cached_tower import CachedTextTower
from campe.train.data import collate_samples, open_training_data
from campe.core.losses import CampeObjective, total_loss  # noqa: E402
from campe.model import build_model  # noqa: E402
from campe.text.model_folder import resolve_model_path  # noqa: E402
from campe.text.multiprompt import build_text_encoder  # noqa: E402
from stages.cache import CacheParams, run_stage as cache_stage, run  # noqa: E402
from stages.download import DownloadParams, run_stage as download_stage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FP16_ATOL = 2e-3  # L2-normalised embeddings (entries ~0.05) from float16-rounded hidden states (2^-11 relative)


@pytest.fixture(scope="module")
def shards(tiny_generated, tmp_path_factory) -> Path:
    _, root = tiny_generated
    tmp = tmp_path_factory.mktemp("cache_shards")
    p = DownloadParams(url_list=str(root / "urls" / "train.parquet"), output_dir=str(tmp / "shards"),
                       stats_file=str(tmp / "stats.json"), extra_columns=["image_id"], image_size=32,
                       processes_count=1, thread_count=4, number_sample_per_shard=16, timeout=3)
    assert download_stage(p)["successes"] == 48
    return tmp / "shards"


def tiny_decoder(family: str, vocab_size: int, layers: int = 3) -> torch.nn.Module:
    from transformers import (Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)
    cls, extra = {"llama": (LlamaConfig, {}), "gemma": (GemmaConfig, {}), "qwen2": (Qwen2Config, {}),
                  "qwen3": (Qwen3Config, {}), "gemma2": (Gemma2Config, {"sliding_window": 6}),
                  "mistral": (MistralConfig, {"sliding_window": 5})}[family]
    torch.manual_seed(0)  # same weights every time: the manifest's weight hash must not change between builds
    cfg = cls(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, head_dim=16, vocab_size=vocab_size, **extra)
    return AutoModel.from_config(cfg).eval()


@pytest.fixture
def make_encoder(tok, minilm_lm):
    """family ("minilm" or a decoder) + config overrides -> a fresh encoder on a private copy of the model."""
    def make(family: str = "llama", **kw):
        if family == "minilm":
            return build_text_encoder(model=copy.deepcopy(minilm_lm), tokenizer=tok, **kw)
        kw = {"k": 3, "embed_dim": 48, **kw}
        return build_text_encoder(model=tiny_decoder(family, tok.vocab_size), tokenizer=tok, **kw)
    return make


def cache(shards: Path, out: Path, enc, **kw) -> dict:
    return cache_stage(CacheParams(shards_dir=str(shards), output_dir=str(out), batch_size=8, threads=1,
                                   **{k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(
                                       CacheParams)}}),
                       enc.cfg, encoder=enc, **{k: v for k, v in kw.items() if k in ("repair", "on_mismatch")})


def all_batches(data, batch_size: int = 16) -> list[dict]:
    samples = list(data)
    return [collate_samples(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("pass-*/*.parquet"))}


CAPTIONS = ["a dog", "a red circle on a blue background next to a small green square", "two cats on a mat"]


# ------------------------------------------------------------------------------------------------ query-only layer

def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("family,trainable", [("minilm", 1), ("minilm", 2), ("llama", 1), ("llama", 2),
                                              ("qwen2", 1), ("qwen3", 1), ("gemma", 1), ("gemma2", 2),
                                              ("mistral", 1)])
def test_query_only_last_layer_equals_the_full_layer(family, trainable, make_encoder):
    """Outputs and the gradients of every trainable parameter, query-only vs the full last layer, in float32 (with
    negated prompts, so both pooled position sets go through it); and the query-only pass really does less work."""
    enc = make_encoder(family, negation=True, trainable_layers=trainable)
    with torch.no_grad():
        enc.apt.normal_(std=float(enc.apt.std()))  # distinct APTs, so a mix-up of positions would show
    layout = enc.layout(CAPTIONS)
    hidden = enc.frozen_hidden(layout)
    fast, full = CachedTextTower(enc), CachedTextTower(enc, query_only=False)
    assert fast.query_only and not full.query_only
    weights = torch.randn(3, enc.embed_dim, generator=torch.Generator().manual_seed(0))
    results = []
    for tower in (fast, full):
        enc.zero_grad(set_to_none=True)
        out = tower({"hidden": hidden, "layout": layout})
        ((out["embedding"] * weights).sum() + (out["neg_embedding"] * weights).sum()).backward()
        results.append(({k: v.detach() for k, v in out.items()},
                        {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}))
    (o1, g1), (o2, g2) = results
    for key in o2:
        torch.testing.assert_close(o1[key], o2[key], atol=1e-5, rtol=1e-4, msg=f"{family}: {key}")
    assert g1.keys() == g2.keys() and len(g1) > 3
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-4, msg=f"{family}: grad of {name}")
    batch = {"hidden": hidden, "layout": layout}
    f_fast, f_full = _flops(lambda: fast(batch)), _flops(lambda: full(batch))
    assert f_fast < 0.8 * f_full, (f_fast, f_full)


def test_unsupported_layer_falls_back_to_the_full_layer_with_a_note(tok):
    """A decoder family without a query-only implementation (Olmo2: norms after the sub-blocks) still trains from
    the cache, with the full last layer and a warning saying so."""
    from transformers import Olmo2Config
    torch.manual_seed(0)
    lm = AutoModel.from_config(Olmo2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=128, vocab_size=tok.vocab_size,
                                           eos_token_id=None, pad_token_id=0)).eval()
    enc = build_text_encoder(model=lm, tokenizer=tok, k=3, embed_dim=48)
    with pytest.warns(UserWarning, match="query-only last layer not implemented for Olmo2DecoderLayer"):
        tower = CachedTextTower(enc)
    assert not tower.query_only and "full layer" in tower.note
    layout = enc.layout(CAPTIONS)
    with torch.no_grad():
        out = tower({"hidden": enc.frozen_hidden(layout), "layout": layout})
        torch.testing.assert_close(out["embedding"], enc(layout)["embedding"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ cache vs full model

@pytest.mark.parametrize("family,dtype,atol,limit", [("minilm", "float16", FP16_ATOL, 16),
                                                     ("llama", "float16", FP16_ATOL, 0),
                                                     ("qwen2", "bfloat16", 8 * FP16_ATOL, 0)])
def test_cached_embeddings_equal_the_full_model_and_online_mode(family, dtype, atol, limit, shards, tmp_path,
                                                                make_encoder):
    """Captions through cache stage -> parquet -> open_training_data -> collate -> the cached tower equal the full
    multi-prompt model on the caption text (float16/bfloat16 tolerance); the online tower (text_cache: false)
    gives the full model's numbers exactly. MiniLM (the default config as is): the first shard, for time."""
    enc = make_encoder(family, negation=family != "minilm")
    summary = cache(shards, tmp_path / "cache", enc, dtype=dtype, limit=limit)
    n = limit or 48
    assert (summary["shards_written"], summary["captions_written"]) == (-(-n // 16), n)
    cached = all_batches(open_training_data(shards, tmp_path / "cache", enc))
    online = all_batches(open_training_data(shards, None, enc))[:len(cached)]
    assert [b["keys"] for b in cached] == [b["keys"] for b in online] and sum(len(b["keys"]) for b in cached) == n
    tower, online_tower = CachedTextTower(enc), CachedTextTower(enc, online=True)
    for b, o in zip(cached, online):
        assert b["text"]["hidden"].dtype == getattr(torch, dtype) and "hidden" not in o["text"]
        assert b["images"].dtype == torch.float32 and b["images"].shape[1:] == (3, 32, 32)
        assert 0 <= b["images"].min() and b["images"].max() <= 1 and b["images"].std() > 0.05
        with torch.no_grad():
            ref = enc(b["captions"])
            got = tower(b["text"])
            live = online_tower(o["text"])
            from_text = tower(b["captions"])  # evaluation input: captions, frozen layers on the fly
        for key in ref:
            torch.testing.assert_close(live[key], ref[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(from_text[key], ref[key], atol=1e-5, rtol=1e-5)
            if key.endswith("embedding") or key.endswith("segments"):
                err = (got[key] - ref[key]).abs().max().item()
                assert err < atol, f"{family} {key}: cache path differs from the full model by {err}"
                assert err > 0 or dtype == "float32"  # the states really went through the low-precision cache


def test_cached_tower_in_the_clip_model_trains_apt_heads_and_last_layer_only(shards, tmp_path, make_encoder):
    enc = make_encoder("minilm", k=4, negation=True)
    cache(shards, tmp_path / "cache", enc, limit=8)
    batch = collate_samples(list(open_training_data(shards, tmp_path / "cache", enc)))
    assert len(batch["keys"]) == 8
    model, cfg = build_model("tiny", text_tower=CachedTextTower(enc), embed_dim=enc.embed_dim, image_size=32)
    assert cfg["text_tower_config"]["k"] == 4
    hidden = batch["text"]["hidden"]
    objective = CampeObjective(lambda_div=0.1, lambda_neg=0.1)
    total_loss(objective(model(images=batch["images"], text=batch["text"]))).backward()
    assert not hidden.requires_grad and hidden.grad is None
    last = f"lm.encoder.layer.{enc.num_layers - 1}."
    for name, p in enc.named_parameters():
        trainable = name in ("apt", "head_weight", "head_bias") or name.startswith(last)
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert (enc.apt.grad.abs().sum(1) > 0).all()  # every prompt's APT
    assert model.visual.conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ manifest

def test_cache_for_another_model_template_or_k_is_refused_naming_the_field(shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    out = tmp_path / "cache"
    cache(shards, out, enc)
    assert check_manifest(out, make_encoder("llama"))["k"] == 3  # a rebuilt identical encoder is accepted
    cases = {"k (cache: 3, params: 4)": make_encoder("llama", k=4),
             "template (cache: 'the {apt} of the image means:', params: 'a photo of {apt}')":
                 make_encoder("llama", template="a photo of {apt}"),
             "negation (cache: False, params: True)": make_encoder("llama", negation=True),
             "trainable_layers (cache: 1, params: 2)": make_encoder("llama", trainable_layers=2),
             "model_class (cache: 'LlamaModel', params: 'Qwen2Model')": make_encoder("qwen2")}
    for message, other in cases.items():
        with pytest.raises(CacheMismatchError) as e:
            open_training_data(shards, out, other)
        assert message in str(e.value) and str(out) in str(e.value)
    # The same weights under another seed: the model hash differs.
    other = make_encoder("llama")
    with torch.no_grad():
        other.lm.embed_tokens.weight.add_(1e-3)
    with pytest.raises(CacheMismatchError, match="model_hash"):
        check_manifest(out, other)
    # The stage refuses to mix settings in one folder unless told to rebuild.
    before = mtimes(out)
    with pytest.raises(CacheMismatchError, match=r"template .*--on-mismatch rebuild"):
        cache(shards, out, make_encoder("llama", template="a photo of {apt}"))
    assert mtimes(out) == before
    with pytest.raises(CacheMismatchError, match=r"dtype \(cache: 'float16', params: 'bfloat16'\)"):
        cache(shards, out, enc, dtype="bfloat16")
    summary = cache(shards, out, make_encoder("llama", template="a photo of {apt}"), on_mismatch="rebuild")
    assert summary["shards_written"] == 3
    check_manifest(out, make_encoder("llama", template="a photo of {apt}"))


def test_missing_cache_and_missing_shard_are_clear_errors(shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    with pytest.raises(CacheMissingError, match="run `campe cache"):
        open_training_data(shards, tmp_path / "nothing", enc)
    out = tmp_path / "cache"
    cache(shards, out, enc)
    victim = sorted(out.glob("pass-*/*.parquet"))[1]
    victim.unlink()
    with pytest.raises(CacheMissingError, match=r"1 of 3 image shards .*00001\.tar"):
        open_training_data(shards, out, enc)
    with pytest.raises(FileNotFoundError, match="no such shard folder"):
        cache(tmp_path / "nothing", tmp_path / "c2", enc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no finished image shards .*campe download"):
        cache(tmp_path / "empty", tmp_path / "c2", enc)


# ------------------------------------------------------------------------------------------------ corrupt shards

def test_truncated_and_corrupt_shards_name_the_shard_and_repair_redoes_only_them(shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    out = tmp_path / "cache"
    cache(shards, out, enc)
    good = {b["keys"][0]: b["text"]["hidden"] for b in all_batches(open_training_data(shards, out, enc), 1)}
    paths = sorted(out.glob("pass-*/*.parquet"))
    truncated, flipped, intact = paths
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    data = bytearray(flipped.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):  # inside the hidden-state pages, footer intact
        data[i] ^= 0xFF
    flipped.write_bytes(bytes(data))
    intact_mtime = intact.stat().st_mtime_ns

    with pytest.raises(CacheCorruptError, match=rf"{truncated}.*--repair"):
        open_training_data(shards, out, enc)  # the footer check at open time
    with pytest.raises(CacheCorruptError, match=rf"{flipped}.*--repair"):
        for _ in read_cache_shard(flipped):  # page checksums on read
            pass

    # A plain re-run redoes the truncated shard (unreadable footer) and cannot see the flipped bits...
    s = cache(shards, out, enc)
    assert s["shards_redone"] == [str(truncated)] and s["shards_written"] == 1
    with pytest.raises(CacheCorruptError, match=str(flipped)):
        all_batches(open_training_data(shards, out, enc))
    # ... --repair reads every shard in full and redoes just the corrupt one.
    s = cache(shards, out, enc, repair=True)
    assert s["shards_redone"] == [str(flipped)] and s["shards_written"] == 1
    assert intact.stat().st_mtime_ns == intact_mtime
    again = {b["keys"][0]: b["text"]["hidden"] for b in all_batches(open_training_data(shards, out, enc), 1)}
    assert again.keys() == good.keys()
    assert all(torch.equal(again[k], good[k]) for k in good)


def test_cache_of_other_image_shards_is_detected(shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    out = tmp_path / "cache"
    cache(shards, out, enc)
    a, b = sorted(out.glob("pass-*/*.parquet"))[:2]
    a.write_bytes(b.read_bytes())  # a readable shard, but of another tar
    with pytest.raises(CacheCorruptError, match=rf"{a} does not match .*00000\.tar.*--repair"):
        all_batches(open_training_data(shards, out, enc))
    s = cache(shards, out, enc)  # the stage sees it is another tar's (size / digest of names and captions)
    assert s["shards_redone"] == [str(a)] and s["shards_written"] == 1
    assert sum(len(x["keys"]) for x in all_batches(open_training_data(shards, out, enc))) == 48


def test_reordered_image_shard_same_size_is_recached(shards, tmp_path, make_encoder):
    """A re-download can write the same samples in another order (img2dataset's threads): same tar size, stale cache.
    The stage must redo that shard, and training then reads it without a mismatch."""
    import shutil
    import tarfile
    enc = make_encoder("llama")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    out = tmp_path / "cache"
    cache(copy, out, enc)
    tar_path = sorted(copy.glob("pass-*/*.tar"))[1]
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))
    keys[0], keys[1] = keys[1], keys[0]  # swap the first two samples
    size = tar_path.stat().st_size
    with tarfile.open(tar_path, "w") as tf:
        for k in keys:
            for m, data in members:
                if m.name.split(".")[0] == k:
                    tf.addfile(m, io.BytesIO(data) if data is not None else None)
    assert tar_path.stat().st_size == size  # the old size-only check could not see it
    with pytest.raises(CacheCorruptError, match="does not match"):
        all_batches(open_training_data(copy, out, enc))
    s = cache(copy, out, enc)
    assert s["shards_written"] == 1 and s["shards_redone"] == [str(cache_shard_path(tar_path, copy, out))]
    assert sum(len(x["keys"]) for x in all_batches(open_training_data(copy, out, enc))) == 48


# ------------------------------------------------------------------------------------------------ resume, limit

def test_rerun_skips_finished_shards_and_clears_a_killed_runs_temp_file(shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    out = tmp_path / "cache"
    first = cache(shards, out, enc)
    assert (first["shards_written"], first["captions_written"]) == (3, 48)
    before = mtimes(out)
    again = cache(shards, out, enc)
    assert (again["shards_written"], again["shards_skipped"]) == (0, 3) and mtimes(out) == before
    # A run killed inside shard 1 leaves only its hidden temp file; readers never look at it.
    victim = sorted(out.glob("pass-*/*.parquet"))[1]
    temp = victim.with_name(f".{victim.name}.12345.tmp")
    victim.rename(temp)
    temp.write_bytes(temp.read_bytes()[:1000])
    with pytest.raises(CacheMissingError):
        open_training_data(shards, out, enc)
    s = cache(shards, out, enc)
    assert (s["shards_written"], s["captions_written"]) == (1, 16) and not temp.exists()
    after = mtimes(out)
    assert {k: v for k, v in after.items() if k != str(victim)} == {k: v for k, v in before.items()
                                                                     if k != str(victim)}
    assert len(list(open_training_data(shards, out, enc))) == 48


def test_limit_caches_a_prefix_that_trains_and_a_full_run_completes_it(shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    out = tmp_path / "cache"
    s = cache(shards, out, enc, limit=20)
    assert (s["captions_written"], s["shards_written"]) == (20, 2)  # 16 + 4: the third shard is not started
    data = open_training_data(shards, out, enc)
    assert data.num_samples == 20 and len(list(data)) == 20
    s = cache(shards, out, enc)
    assert (s["shards_written"], s["shards_skipped"], s["captions_written"]) == (2, 1, 32)
    assert len(list(open_training_data(shards, out, enc))) == 48


# ------------------------------------------------------------------------------------------------ failed writes

@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with EFBIG, as a full disk fails them with ENOSPC (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):
    """A real small filesystem (ENOSPC when full); skips where mounting is not allowed."""
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the file-size-limit case covers it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("how", ["file_size_limit", "full_tmpfs"])
def test_out_of_disk_mid_shard_leaves_no_partial_shard(how, shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    ref = tmp_path / "ref"
    cache(shards, ref, enc, limit=16)
    one_shard = next(ref.glob("pass-*/*.parquet")).stat().st_size  # a full shard's size (16 captions)
    with contextlib.ExitStack() as stack:
        if how == "full_tmpfs":  # room for one shard and a half: the second shard hits ENOSPC
            out = stack.enter_context(_small_tmpfs(tmp_path / "mnt", f"{one_shard * 3 // 2}")) / "cache"
        else:  # any file past half a shard fails: the first shard hits EFBIG
            out = tmp_path / "cache"
            stack.enter_context(_file_size_limit(one_shard // 2))
        with pytest.raises(CacheError, match=r"out of disk space writing cache shard .*no partial shard"):
            cache(shards, out, enc)
        files = sorted(p.name for p in out.rglob("*") if p.is_file())
        assert not any(n.endswith(".tmp") for n in files), files  # the temp file was removed
        finished = sorted(out.glob("pass-*/*.parquet"))
        assert len(finished) == (1 if how == "full_tmpfs" else 0)  # shards finished before the failure are kept
        for p in finished:
            assert sum(1 for _ in read_cache_shard(p)) == 16
        if how == "full_tmpfs":
            with pytest.raises(CacheMissingError):
                open_training_data(shards, out, enc)  # training never sees the missing shard as data
    if how == "file_size_limit":
        s = cache(shards, out, enc)  # with room again, the same command finishes
        assert s["shards_written"] == 3 and len(list(open_training_data(shards, out, enc))) == 48


# ------------------------------------------------------------------------------------------------ ranks

def test_ranks_and_workers_take_disjoint_shards_and_epochs_reshuffle(shards, tmp_path, make_encoder):
    enc = make_encoder("llama")
    out = tmp_path / "cache"
    for rank in (0, 1):  # as two torchrun ranks would
        s = cache_stage(CacheParams(shards_dir=str(shards), output_dir=str(out), batch_size=8, threads=1), enc.cfg,
                        encoder=enc, rank=rank, world_size=2)
        assert s["shards_written"] == (2 if rank == 0 else 1)
    keys = {}
    for rank in (0, 1):
        data = open_training_data(shards, out, enc, rank=rank, world_size=2, shuffle_seed=3, epoch=0)
        keys[rank] = [s["key"] for s in data]
        assert len(keys[rank]) == data.num_samples
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 48
    epoch1 = [s["key"] for s in open_training_data(shards, out, enc, rank=0, world_size=2, shuffle_seed=3,
                                                   epoch=1)]
    assert epoch1 != keys[0]
    # Two DataLoader workers split the rank's shards: every sample once.
    data = open_training_data(shards, out, enc, shuffle_seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2, collate_fn=collate_samples)
    seen = [k for b in loader for k in b["keys"]]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 48


def test_keep_in_memory_gives_the_same_batches_without_reading_again(shards, tmp_path, make_encoder):
    """train.keep_in_memory: epochs after the first come from memory (the tars are emptied by then) and every batch
    equals the streamed one (images, cached states, layout, keys)."""
    import shutil

    from campe.core.config import ConfigError
    from campe.train.run_config import resolve_run_config
    from campe.train.sources import CachedPairs
    enc = make_encoder("llama")
    cache(shards, tmp_path / "cache", enc)
    copy_dir = tmp_path / "shards"
    shutil.copytree(shards, copy_dir)
    streamed = CachedPairs(str(shards), str(tmp_path / "cache"), enc)
    kept = CachedPairs(str(copy_dir), str(tmp_path / "cache"), enc, keep_in_memory=True)
    for epoch in range(3):
        want = list(streamed.epoch_batches(epoch, 8, seed=5))
        got = list(kept.epoch_batches(epoch, 8, seed=5))
        assert [b["keys"] for b in got] == [b["keys"] for b in want] and len(want) == 6
        for g, w in zip(got, want):
            assert torch.equal(g["images"], w["images"]) and g["images"].dtype == torch.float32
            assert torch.equal(g["text"]["hidden"], w["text"]["hidden"])
            assert torch.equal(g["text"]["layout"].input_ids, w["text"]["layout"].input_ids)
        if epoch == 0:
            assert len(kept._memory) == 3
            for tar in copy_dir.rglob("*.tar"):  # later epochs must not read the shards again
                tar.write_bytes(b"")
    with pytest.raises(ConfigError, match="keep_in_memory needs num_workers 0"):
        resolve_run_config({"train": {"keep_in_memory": True, "num_workers": 2}})


# ------------------------------------------------------------------------------------------------ CLI

def _cache_cli(params: Path) -> int:
    """`campe cache --params PARAMS` (the stage's run())."""
    import argparse
    from stages.cache import add_arguments
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    return run(ap.parse_args(["--params", str(params)]))


def test_cli_run_reads_both_params_sections(shards, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"text_encoder:\n  k: 2\n  embed_dim: 64\ncache:\n  shards_dir: {shards}\n"
                      f"  output_dir: {tmp_path / 'cache'}\n  batch_size: 4\n  limit: 5\n  threads: 1\n")
    assert _cache_cli(params) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["captions_written"] == 5 and summary["bytes_per_caption"] > 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (manifest["k"], manifest["model_class"], manifest["dtype"]) == (2, "BertModel", "float16")
    params.write_text(params.read_text().replace("batch_size: 4", "batch_sise: 4"))
    from campe.core.config import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        _cache_cli(params)


# ------------------------------------------------------------------------------------------------ undecodable, blank

def test_undecodable_image_and_blank_caption_are_left_out_counted_and_skipped_alike(shards, tmp_path,
                                                                                     make_encoder):
    """A tar member KEY.jpg with garbage bytes: the cache stage warns (shard and key), leaves the sample out, lists
    it in the shard metadata and counts it in the manifest; training data (cached and online) skips the same
    sample. A whitespace-only caption (shards from elsewhere) is no caption: left out, no 'caption is empty'."""
    import re
    import warnings

    from campe.data.imageprep import TooManySkipsError, UndecodableImageWarning
    from tests.shard_tools import damaged_copy

    root, bad = damaged_copy(shards, tmp_path / "shards", garbage=1, blank=1)
    (tar, key), = bad["garbage"]
    enc = make_encoder("llama")
    out = tmp_path / "cache"
    with pytest.warns(UndecodableImageWarning, match=rf"skipping {key} of {re.escape(tar)}: undecodable image"):
        s = cache(root, out, enc, max_skip_fraction=0.05)
    assert s["captions_written"] == s["cached_captions"] == 46
    assert s["undecodable_images"] == {"count": 1, "first": [f"{tar}:{key}"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["undecodable_images"] == s["undecodable_images"] and manifest["cached_captions"] == 46

    data = open_training_data(root, out, enc)
    with pytest.warns(UndecodableImageWarning, match=rf"skipping sample {key} of shard {re.escape(tar)}"):
        keys = [x["key"] for x in data]
    assert len(keys) == data.num_samples == 46 and key not in keys and data.total_samples == 48
    batches = list(data.batches(16))  # two full batches; the 14 left over are dropped
    assert [len(b["keys"]) for b in batches if "images" in b] == [16, 16]
    assert [(x.where, x.key) for b in batches for x in b["skipped"]] == [(tar, key)]
    online = open_training_data(root, None, enc)
    with pytest.warns(UndecodableImageWarning, match=rf"{key} of shard {re.escape(tar)}: undecodable image"):
        assert [x["key"] for x in online] == keys

    # A re-run keeps the finished shards and their count; past the fraction the stage stops, naming the sample.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndecodableImageWarning)  # known skips are not warned about again
        s = cache(root, out, enc, max_skip_fraction=0.05)
    assert s["shards_written"] == 0 and s["undecodable_images"]["count"] == 1
    want = rf"1 of 48 samples could not be decoded .*cache.max_skip_fraction=0.0 .*{re.escape(f'{tar}:{key}')}"
    with pytest.warns(UndecodableImageWarning), pytest.raises(TooManySkipsError, match=want):
        cache(root, tmp_path / "cache0", enc, max_skip_fraction=0.0)
    assert not list((tmp_path / "cache0").glob("pass-*/*.parquet"))  # no partial shard left behind


def test_truncated_captions_are_counted_in_the_manifest_and_printed(shards, tmp_path, tok, capsys):
    from campe.text.cache_shards import iter_tar_samples
    from campe.data.shards import shard_paths

    params = tmp_path / "params.yaml"
    params.write_text(f"text_encoder:\n  k: 2\n  embed_dim: 64\n  max_length: 12\ncache:\n  shards_dir: {shards}\n"
                      f"  output_dir: {tmp_path / 'cache'}\n  batch_size: 16\n  threads: 1\n")
    assert _cache_cli(params) == 0
    captured = capsys.readouterr()
    captions = [p["txt"].decode() for t in shard_paths(shards) for _, p in iter_tar_samples(t)]
    want = sum(len(tok(c)["input_ids"]) > 12 for c in captions)  # [CLS] caption [SEP] longer than max_length
    assert 0 < want < len(captions) == 48
    assert json.loads(captured.out.strip().splitlines()[-1])["truncated_captions"] == want
    assert f"{want} of 48 cached captions were longer than text_encoder.max_length=12 tokens" in captured.err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["truncated_captions"] == want and manifest["cached_captions"] == 48
    # A shard cached before the count was kept in its metadata: the count comes from its `truncated` column.
    from campe.text.cache_shards import shard_meta, truncated_rows
    paths = sorted((tmp_path / "cache").glob("pass-*/*.parquet"))
    old = [{k: v for k, v in shard_meta(p).items() if k != "truncated"} for p in paths]
    assert sum(truncated_rows(p, m) for p, m in zip(paths, old)) == sum(map(truncated_rows, paths)) == want


def test_the_stage_restores_the_callers_thread_count(shards, tmp_path, make_encoder):
    """The stage runs with cache.threads and gives the caller its own count back (it runs in-process in `campe
    ablate` and the flows: a grid started with one thread ran every later cell on all cores), also when it fails."""
    from campe.core.threads import torch_threads
    enc = make_encoder("llama")
    with torch_threads(1):
        s = cache_stage(CacheParams(shards_dir=str(shards), output_dir=str(tmp_path / "cache"), batch_size=8,
                                    threads=2), enc.cfg, encoder=enc)
        assert s["threads"] == 2 and s["shards_written"] == 3
        assert torch.get_num_threads() == 1
        (tmp_path / "none").mkdir()
        with pytest.raises(CacheError, match="no finished image shards"):
            cache_stage(CacheParams(shards_dir=str(tmp_path / "none"), output_dir=str(tmp_path / "c2"), threads=2),
                        enc.cfg, encoder=enc)
        assert torch.get_num_threads() == 1
