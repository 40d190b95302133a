"""Training loop: method table, trainable vs frozen weights, learning on a tiny real set, exact resume after a kill,
MLflow in a real SQLite store, two gloo ranks vs one process, the `campe train` stage.

Towers are tiny: the vanilla CLIP text transformer, or a 2-layer BERT with random weights saved as a local
checkpoint folder (with the packaged MiniLM tokenizer) for the multi-prompt encoder. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from campe.core.config import ConfigError
from campe.core.io import git_commit
from campe.train.checkpoint import CKPT, FINAL, RUN_ID_FILE, build_run_model, load_trained_model
from campe.train.log import LOG_FILE, read_log
from campe.train.loop import train
from campe.train.optim import lr_factor, make_optimizer, split_decay
from campe.train.run_config import METHODS, resolve_run_config
from campe.train.sources import MemoryPairs
from tests.conftest import join_spawned

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=64, frames=4,
                  context_length=32, text_width=64, text_layers=2, text_heads=2)
QUIET = dict(tracking_uri="", metrics_file="", progress=False)


def _pairs(n: int = 48, seed: int = 0) -> MemoryPairs:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"]
    captions = [f"a {colours[i % 4]} {shapes[i % 3]} number {i}" for i in range(n)]
    return MemoryPairs(images, captions)


def _cfg(out: Path, method: str = "vanilla", lm: str | None = None, loss: dict | None = None, **train_kw):
    sections = {"model": dict(TINY_MODEL),
                "loss": loss if loss is not None else {"lambda_div": 0.2, "div_margin": None, "lambda_neg": 0.1},
                "train": {"method": method, "out_dir": str(out), "batch_size": 8, "warmup_steps": 2, "lr": 1e-3,
                          **QUIET, **train_kw}}
    if lm is not None:
        sections["text_encoder"] = dict(model_path=lm, k=4, defo_tokens=4, max_length=24)
    return resolve_run_config(sections)


# ------------------------------------------------------------------------------------------------ config

def test_method_table_resolves_to_the_baselines():
    loss = {"lambda_div": 0.2, "lambda_neg": 0.1}
    for method, spec in METHODS.items():
        cfg = resolve_run_config({"model": TINY_MODEL, "text_encoder": {"k": 4, "defo_tokens": 8}, "loss": loss,
                                  "train": {"method": method}})
        if spec["text_encoder"] is None:
            assert cfg.text_encoder is None and cfg.model.text_tower_kind == "vanilla"
        else:
            for k, v in spec["text_encoder"].items():
                assert getattr(cfg.text_encoder, k) == v, (method, k)
            assert cfg.model.text_tower_kind == "multiprompt" and cfg.model.embed_dim == 64
            assert not hasattr(cfg.text_encoder, "embed_dim")  # D is the model's one field
        assert (cfg.loss.lambda_div > 0) == method.startswith("multi_prompt_div"), method
        assert (cfg.loss.lambda_neg > 0) == (method == "multi_prompt_div_neg"), method
    # The contrastive switch is loss.kind; the model's temperature/bias follow it.
    cfg = resolve_run_config({"loss": {"kind": "sigmoid"}, "train": {"method": "vanilla"}})
    assert cfg.model.contrastive == "sigmoid"
    # Online the method's text-encoder fields win over the section; from a cache they must agree (next test).
    cfg = resolve_run_config({"text_encoder": {"pooling": "multi_prompt"}, "train": {"method": "mean",
                                                                                     "cache_dir": ""}})
    assert cfg.text_encoder.pooling == "mean"


@pytest.mark.parametrize("sections, message", [
    ({"train": {"method": "clip"}}, r"params:train: method 'clip' is not one of: vanilla"),
    ({"train": {"lr_max": 1.0}}, r"params:train: unknown key 'lr_max'"),
    ({"train": {"method": "multi_prompt_div"}, "loss": {"lambda_div": 0.0}},
     r"method 'multi_prompt_div' needs lambda_div > 0"),
    ({"model": {"contrastive": "softmax"}, "loss": {"kind": "sigmoid"}, "train": {"method": "vanilla"}},
     r"the switch is loss.kind"),
    ({"model": {"text_encoder": "vanilla"}, "train": {"method": "mean"}}, r"the method picks the text tower"),
    ({"model": {"text_tower_kind": "vanilla"}, "train": {"method": "mean"}}, r"the method picks the text tower"),
    ({"text_encoder": {"embed_dim": 96}, "loss": {"lambda_div": 0.1, "lambda_neg": 0.1}},
     r"embed_dim 96 disagrees with model.embed_dim 384"),
    ({"text_encoder": {"k": 5}, "loss": {"lambda_div": 0.1, "lambda_neg": 0.1}},
     r"embed_dim \(384\) must be a positive multiple of the number of prompts \(5"),
    ({"train": {"steps": 0, "epochs": 0}}, r"set steps > 0 or epochs > 0"),
    ({"text_encoder": {"negation": False}, "loss": {"lambda_div": 0.1, "lambda_neg": 0.1}},
     r"params:text_encoder: negation is False but method 'multi_prompt_div_neg' trains with negation: true; set "
     r"text_encoder.negation"),
])
def test_bad_run_config_is_a_clear_error(sections, message):
    with pytest.raises(ConfigError, match=message):
        resolve_run_config(sections)


def test_schedule_and_weight_decay_groups(tiny_lm):
    assert lr_factor(0, 4, 20, 0.1) == pytest.approx(0.25) and lr_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0) and lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    cfg = _cfg(Path("unused"), "multi_prompt_div_neg", tiny_lm)
    model, _, _ = build_run_model(cfg)
    decay, no_decay = split_decay(model)
    for name in ("logit_scale", "text.apt", "text.head_bias", "visual.pos_embed", "visual.pool.probe",
                 "visual.conv.bias", "visual.blocks.0.ln_1.weight", "text.lm.encoder.layer.1.output.LayerNorm.weight"):
        assert name in no_decay, name
    for name in ("text.head_weight", "visual.conv.weight", "visual.proj.weight", "visual.blocks.0.attn.qkv.weight",
                 "text.lm.encoder.layer.1.attention.self.query.weight"):
        assert name in decay, name
    assert not any(n.startswith(("text.lm.embeddings", "text.lm.encoder.layer.0")) for n in decay + no_decay)
    opt = make_optimizer(model, cfg.train)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.train.weight_decay, 0.0]


# ------------------------------------------------------------------------------------------------ what trains

def test_only_trainable_parameters_get_gradients_and_frozen_lm_is_bit_identical(tiny_lm, tmp_path):
    cfg = _cfg(tmp_path / "run", "multi_prompt_div_neg", tiny_lm, steps=2)
    model, _, _ = build_run_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("text.lm.") for n in frozen)
    assert not any(n.startswith("text.lm.encoder.layer.1.") for n in frozen)  # the last layer trains
    train(cfg, source=_pairs(), model=model)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n  # bit-identical
        else:
            # everything trainable got a gradient on the last step and moved: last LM layer, APT vectors,
            # heads, image tower, temperature
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, before[n]), n
    for n in ("text.apt", "text.head_weight", "text.lm.encoder.layer.1.output.dense.weight", "logit_scale",
              "visual.conv.weight"):
        assert n not in frozen


@pytest.mark.parametrize("method", [m for m in METHODS if m != "vanilla"])
def test_every_lm_baseline_trains_with_its_own_terms(method, tiny_lm, tmp_path):
    cfg = _cfg(tmp_path, method, tiny_lm, steps=1, log_every=1)
    summary = train(cfg, source=_pairs(16))
    terms = {k for k in summary["final"] if k.endswith("_loss")}
    want = {"contrastive_loss"} | ({"diversity_loss"} if "div" in method else set()) | (
        {"negation_loss"} if method.endswith("neg") else set())
    assert terms == want
    assert math.isfinite(summary["final"]["loss"])


# ------------------------------------------------------------------------------------------------ learning + MLflow

@pytest.fixture(scope="module")
def shards(tiny_generated, tmp_path_factory):
    """The tiny generated benchmark's train list through the real download stage (webdataset shards, 32 px)."""
    from stages.download import DownloadParams, run_stage as download_stage
    _, root = tiny_generated
    tmp = tmp_path_factory.mktemp("train_shards")
    download_stage(DownloadParams(url_list=str(root / "urls" / "train.parquet"), output_dir=str(tmp / "shards"),
                                  stats_file=str(tmp / "stats.json"), extra_columns=["image_id"], image_size=32,
                                  processes_count=1, thread_count=4, number_sample_per_shard=30))
    return tmp / "shards"


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """`campe train` (the stage's run()) from a params file: vanilla tiny towers, 200 steps, MLflow in SQLite."""
    from stages.train import add_arguments, run
    tmp = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    params = tmp / "params.yaml"
    import yaml
    params.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "loss": {"kind": "softmax"},
        "train": {"method": "vanilla", "shards_dir": "unused", "out_dir": "unused", "steps": 200, "batch_size": 16,
                  "lr": 2e-3, "warmup_steps": 10, "weight_decay": 0.05, "log_every": 20, "ckpt_every": 100,
                  "progress": False, "tracking_uri": uri, "experiment": "campe-test",
                  "artifact_root": str(tmp / "artifacts"), "metrics_file": str(tmp / "metrics" / "train.json")}}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp / "run"
    args = parser.parse_args(["--params", str(params), "--shards", str(shards), "--out", str(out)])
    assert run(args) == 0
    return out, uri, tmp


def test_a_few_hundred_steps_drive_the_loss_down_and_beat_chance_retrieval(trained, shards):
    out, _, tmp = trained
    rows = read_log(out / LOG_FILE)
    assert [int(r["step"]) for r in rows] == list(range(1, 201))  # every step logged once
    first, last = [sum(r["loss"] for r in part) / len(part) for part in (rows[:20], rows[-20:])]
    assert last < 0.5 * first, (first, last)
    # lr follows warm-up + cosine (the logged lr is the one the step used)
    for r in rows[::37]:
        assert r["lr"] == pytest.approx(2e-3 * lr_factor(int(r["step"]) - 1, 10, 200, 0.1), rel=1e-6)
    # Retrieval on the training images (one caption each) with the saved final model, vs chance 1/N.
    model, cfg = load_trained_model(out)
    pairs = MemoryPairs.from_shards(shards, 32)
    first = {}  # each distinct image once, with its first caption
    for i in range(len(pairs)):
        first.setdefault(pairs.images[i].numpy().tobytes(), i)
    idx = torch.tensor(sorted(first.values()))
    with torch.no_grad():
        img = model.encode_image(pairs.images[idx])
        txt = model.encode_text([pairs.captions[i] for i in idx.tolist()])["text"]
    n = len(idx)
    i2t = ((img @ txt.T).argmax(1) == torch.arange(n)).float().mean().item()
    t2i = ((txt @ img.T).argmax(1) == torch.arange(n)).float().mean().item()
    assert n >= 20 and i2t > 4 / n and t2i > 4 / n, (n, i2t, t2i)
    metrics = (tmp / "metrics" / "train.json").read_text()
    assert '"mean_last10_contrastive_loss"' in metrics and '"samples_per_s"' in metrics
    headline = json.loads((tmp / "metrics" / "train.headline.json").read_text())
    assert set(headline) == {"steps", "samples_per_s", "mean_last10_loss", "mean_last10_contrastive_loss"}
    last10 = [r["contrastive_loss"] for r in rows[-10:]]  # named so: the mean over the last 10 logged steps
    assert headline["mean_last10_contrastive_loss"] == pytest.approx(sum(last10) / 10, abs=1e-6)


def test_mlflow_run_has_params_step_metrics_artifacts_and_run_id_file(trained):
    from mlflow.tracking import MlflowClient
    out, uri, tmp = trained
    run_id = (out / RUN_ID_FILE).read_text().strip()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "campe-test" and exp.artifact_location == (tmp / "artifacts" / "campe-test").as_uri()
    p = run.data.params
    assert p["method"] == "vanilla" and p["train.lr"] == "0.002" and p["model.width"] == "64"
    assert p["loss.kind"] == "softmax" and len(p["params_hash"]) == 12 and p["total_steps"] == "200"
    # Named stage/config/date, tagged with the config hash and (inside a git checkout) the commit.
    assert re.fullmatch(r"train/vanilla/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", run.info.run_name), run.info.run_name
    tags = run.data.tags
    assert tags["campe.config_hash"] == p["params_hash"] and tags["campe.stage"] == "train"
    assert tags.get("mlflow.source.git.commit") == git_commit()
    history = client.get_metric_history(run_id, "contrastive_loss")
    csv_rows = read_log(out / LOG_FILE)
    assert sorted(m.step for m in history) == list(range(1, 201))
    by_step = {m.step: m.value for m in history}
    assert all(by_step[int(r["step"])] == pytest.approx(r["contrastive_loss"], rel=1e-6) for r in csv_rows)
    for key in ("lr", "loss", "grad_norm", "logit_scale", "samples_per_s"):
        assert len(client.get_metric_history(run_id, key)) == 200, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"train_config.json", "model_config.json", FINAL, "loss_curve.png", LOG_FILE} <= artifacts
    local = Path(client.download_artifacts(run_id, "loss_curve.png", str(tmp / "dl")))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_from_the_cache_matches_online_and_reloads_for_evaluation(shards, tiny_lm, tmp_path):
    """source=None with an LM method reads the shards through campe.train.data: cached float16 frozen states vs the frozen
    layers run online give the same losses up to float16 rounding; the saved model reloads with the plain tower."""
    from stages.cache import CacheParams, run_stage as cache_stage
    runs = {}
    for name, cache in (("cached", str(tmp_path / "cache")), ("online", "")):
        cfg = _cfg(tmp_path / name, "multi_prompt_div_neg", tiny_lm, steps=4, log_every=1, shards_dir=str(shards),
                   cache_dir=cache)
        if cache:
            cache_stage(CacheParams(shards_dir=str(shards), output_dir=cache, threads=1), cfg.text_encoder)
        train(cfg)
        runs[name] = read_log(tmp_path / name / LOG_FILE)
    assert len(runs["cached"]) == len(runs["online"]) == 4
    for a, b in zip(runs["cached"], runs["online"]):
        for k in ("contrastive_loss", "negation_loss", "positive_cosine"):
            assert a[k] == pytest.approx(b[k], rel=2e-3, abs=1e-4), k
    model, cfg = load_trained_model(tmp_path / "cached")
    state = torch.load(tmp_path / "cached" / FINAL, weights_only=True)["model"]
    assert "text.encoder.apt" in state and torch.equal(model.text.apt, state["text.encoder.apt"])
    with torch.no_grad():
        emb = model.encode_text(["a red circle", "two blue squares"])
    assert emb["text"].shape == (2, 64) and emb["negated"].shape == (2, 64)


# ------------------------------------------------------------------------------------------------ resume

def _ckpt(out: Path) -> dict:
    return torch.load(out / CKPT, map_location="cpu", weights_only=True)


def test_killed_run_resumes_bit_for_bit(tiny_lm, tmp_path):
    """12 steps in one go == killed at step 8 (checkpoint at 5) + --resume; dropout is on, so RNG matters too."""
    def cfg(out, **kw):
        return _cfg(out, "multi_prompt_div_neg", tiny_lm, steps=12, ckpt_every=5, log_every=2, **kw)

    data = _pairs(40)  # 5 batches per epoch: the run crosses epochs, the kill falls in the second one
    full = tmp_path / "full"
    train(cfg(full), source=data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = tmp_path / "killed"
    # tracking is a runtime field: it does not change the numbers, and the resumed run logs into the same run
    c = cfg(killed, tracking_uri=uri, artifact_root=str(tmp_path / "art"))
    stopped = train(c, source=data, stop_at=8, checkpoint_at_stop=False)
    assert stopped["stopped"] and _ckpt(killed)["step"] == 5
    assert int(read_log(killed / LOG_FILE)[-1]["step"]) == 8  # logged past the checkpoint before the "kill"
    run_id = (killed / RUN_ID_FILE).read_text().strip()
    train(c, source=data, resume=True)

    a, b = _ckpt(full), _ckpt(killed)
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(full / LOG_FILE)) == strip(read_log(killed / LOG_FILE))  # same losses, step by step
    assert (killed / RUN_ID_FILE).read_text().strip() == run_id
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert {m.step for m in history} == set(range(1, 13))  # steps 6-8 twice: the killed run logged them too
    # A different config refuses to resume from this checkpoint.
    with pytest.raises(ValueError, match="written by another config"):
        train(_cfg(killed, "multi_prompt_div_neg", tiny_lm, steps=12, ckpt_every=5, lr=5e-4), source=data,
              resume=True)


# ------------------------------------------------------------------------------------------------ DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cfg, data) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    train(cfg, source=data)


def test_two_gloo_ranks_match_one_process_on_the_whole_batch(tmp_path):
    data = _pairs(32)
    cfgs = {name: _cfg(tmp_path / name, "vanilla", steps=3, batch_size=16, log_every=1) for name in ("one", "two")}
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), cfgs["two"], data), nprocs=2, join=False,
                             start_method="spawn")
    train(cfgs["one"], source=data)  # meanwhile, one process on the whole batch
    join_spawned(ctx)
    one, two = _ckpt(tmp_path / "one"), _ckpt(tmp_path / "two")
    assert two["world_size"] == 2 and len(two["rng"]) == 2
    for k, v in one["model"].items():
        assert torch.allclose(two["model"][k], v, atol=1e-5, rtol=1e-4), k
    changed = [k for k, v in one["model"].items() if not torch.equal(v, _initial_state()[k])]
    assert len(changed) > 10  # the comparison is not between untouched weights
    log1, log2 = read_log(tmp_path / "one" / LOG_FILE), read_log(tmp_path / "two" / LOG_FILE)
    for r1, r2 in zip(log1, log2):  # the logged loss is the mean over ranks = the full-batch loss
        assert r2["contrastive_loss"] == pytest.approx(r1["contrastive_loss"], rel=1e-4)


def _initial_state() -> dict:
    model, _, _ = build_run_model(_cfg(Path("unused")))
    return model.state_dict()


# ------------------------------------------------------------------------------------------------ undecodable images

@pytest.fixture(scope="module")
def damaged(shards, tmp_path_factory):
    """The train shards (30 + 18 samples) with one sample's image bytes replaced by garbage and one caption blanked,
    in the smaller shard, which every epoch reads to its end (48 samples in the shards, 46 trainable): (folder,
    the bad sample's id 'shard:key', its key)."""
    from tests.shard_tools import damaged_copy
    root, bad = damaged_copy(shards, tmp_path_factory.mktemp("damaged") / "shards", garbage=1, blank=1, shard=-1)
    (tar, key), = bad["garbage"]
    return root, f"{tar}:{key}", key


def _metrics(path: Path) -> dict:
    import json
    return json.loads(path.read_text())


def test_undecodable_sample_is_skipped_counted_once_and_resume_stays_exact(damaged, tiny_lm, tmp_path):
    """Online from damaged shards over three epochs: the sample is warned about once (shard and key), counted once
    in metrics.json, MLflow and the checkpoint; a run killed and resumed equals the uninterrupted one bit for
    bit, with the same count."""
    from campe.data.imageprep import UndecodableImageWarning
    root, sid, key = damaged

    def cfg(out, **kw):
        return _cfg(out, "multi_prompt_div_neg", tiny_lm, steps=14, ckpt_every=5, log_every=2,
                    shards_dir=str(root), cache_dir="", metrics_file=str(out / "train.json"), max_skip_fraction=0.05,
                    **kw)

    full = tmp_path / "full"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.warns(UndecodableImageWarning, match=rf"campe train: skipping sample {key} of .*undecodable") as w:
        summary = train(cfg(full, tracking_uri=uri, artifact_root=str(tmp_path / "art")))
    assert sum(key in str(x.message) for x in w) == 1  # 46 samples, 5 batches of 8 per epoch: 3 epochs, one warning
    assert summary["skipped_samples"] == 1 and _ckpt(full)["epoch"] == 2
    m = _metrics(full / "train.json")
    assert (m["skipped_samples"], m["skipped_fraction"]) == (1, round(1 / 48, 6))
    assert list(_ckpt(full)["skipped"]) == [sid]
    from mlflow.tracking import MlflowClient
    run_id = (full / RUN_ID_FILE).read_text().strip()
    assert [x.value for x in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "skipped_samples")] == [1.0]

    killed = tmp_path / "killed"
    with pytest.warns(UndecodableImageWarning, match=key):
        train(cfg(killed), stop_at=8, checkpoint_at_stop=False)
    assert _ckpt(killed)["step"] == 5 and list(_ckpt(killed)["skipped"]) == [sid]
    assert train(cfg(killed), resume=True)["skipped_samples"] == 1  # known from the checkpoint: no new warning
    a, b = _ckpt(full), _ckpt(killed)
    assert a["step"] == b["step"] == 14
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(full / LOG_FILE)) == strip(read_log(killed / LOG_FILE))
    assert _metrics(killed / "train.json")["skipped_samples"] == 1


def test_cached_and_vanilla_training_skip_the_same_sample_and_too_many_skips_stop(damaged, tiny_lm, tmp_path):
    from campe.data.imageprep import TooManySkipsError, UndecodableImageWarning
    from stages.cache import CacheParams, run_stage as cache_stage
    root, sid, key = damaged
    cache = str(tmp_path / "cache")
    cfg = _cfg(tmp_path / "cached", "multi_prompt_div_neg", tiny_lm, steps=12, log_every=4, shards_dir=str(root),
               cache_dir=cache, metrics_file=str(tmp_path / "cached.json"), max_skip_fraction=0.05)
    with pytest.warns(UndecodableImageWarning, match=key):
        cache_stage(CacheParams(shards_dir=str(root), output_dir=cache, threads=1, max_skip_fraction=0.05),
                    cfg.text_encoder)
    with pytest.warns(UndecodableImageWarning, match=rf"skipping sample {key} of .*found by campe cache"):
        assert train(cfg)["skipped_samples"] == 1
    assert _metrics(tmp_path / "cached.json")["skipped_fraction"] == round(1 / 48, 6)

    pairs = MemoryPairs.from_shards(root, 32)  # the vanilla tower's data: decoded once, the same sample left out
    assert len(pairs) == 46 and [x.id for x in pairs.skipped] == [sid] and pairs.total_samples == 48
    vanilla = _cfg(tmp_path / "vanilla", "vanilla", steps=3, log_every=1, shards_dir=str(root),
                   metrics_file=str(tmp_path / "vanilla.json"), max_skip_fraction=0.05)
    with pytest.warns(UndecodableImageWarning, match=key):
        assert train(vanilla)["skipped_samples"] == 1

    for c in (dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_skip_fraction=0.0,
                                                                   out_dir=str(tmp_path / "c0"))),
              dataclasses.replace(vanilla, train=dataclasses.replace(vanilla.train, max_skip_fraction=0.0,
                                                                       out_dir=str(tmp_path / "v0")))):
        want = rf"campe train: 1 of 48 samples could not be decoded .*train.max_skip_fraction=0.0 .*{key}"
        with pytest.warns(UndecodableImageWarning), pytest.raises(TooManySkipsError, match=want):
            train(c)
        assert not (Path(c.train.out_dir) / FINAL).exists()


def _ddp_train(rank: int, world_size: int, port: int, cfg, err_dir: str) -> None:
    from campe.data.imageprep import TooManySkipsError
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        train(cfg)
    except TooManySkipsError as e:  # recorded per rank: the test checks that every rank stopped, none hung
        Path(err_dir, f"rank{rank}.err").write_text(str(e))


def test_ddp_ranks_count_a_skip_alike_and_stop_together_past_the_fraction(damaged, tiny_lm, tmp_path):
    """Two gloo ranks online on the damaged shards: full batches on both ranks, the skip seen by one rank is
    counted once by all (checkpoint and metrics); past the fraction both ranks stop at the same flush."""
    root, sid, key = damaged
    kw = dict(steps=8, batch_size=8, log_every=2, shards_dir=str(root), cache_dir="")
    ok = _cfg(tmp_path / "ok", "multi_prompt_div_neg", tiny_lm, metrics_file=str(tmp_path / "ok.json"),
              max_skip_fraction=0.05, **kw)
    stop = _cfg(tmp_path / "stop", "multi_prompt_div_neg", tiny_lm, max_skip_fraction=0.0, **kw)
    for cfg in (ok, stop):
        ctx = mp.start_processes(_ddp_train, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
        join_spawned(ctx, timeout=240)
    ck = _ckpt(tmp_path / "ok")
    assert ck["step"] == 8 and ck["world_size"] == 2 and list(ck["skipped"]) == [sid]
    assert _metrics(tmp_path / "ok.json")["skipped_samples"] == 1
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "train.max_skip_fraction=0.0" in errors[0] and sid in errors[0]
    assert not (tmp_path / "stop" / FINAL).exists()


def test_a_run_config_saved_before_the_renames_resolves_to_the_same_run():
    """train_config.json of a run from before D and the tower kind had one name each holds text_encoder.embed_dim
    and model.text_encoder: it resolves to the same RunConfig and the same hashes (resume checks, ablation cells),
    and the config saved now holds neither old key."""
    loss = {"lambda_div": 0.2, "lambda_neg": 0.1}
    for method in ("vanilla", "multi_prompt_div_neg"):
        new = resolve_run_config({"model": TINY_MODEL, "text_encoder": {"k": 4}, "loss": loss,
                                  "train": {"method": method}})
        old = new.to_dict()
        old["model"]["text_encoder"] = old["model"].pop("text_tower_kind")
        if old["text_encoder"] is not None:
            old["text_encoder"]["embed_dim"] = TINY_MODEL["embed_dim"]
        again = resolve_run_config({k: old[k] or {} for k in ("text_encoder", "model", "loss", "train")})
        assert again.to_dict() == new.to_dict() and again.hash() == new.hash(), method
        assert "text_encoder" not in new.to_dict()["model"]
