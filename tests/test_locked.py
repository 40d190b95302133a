"""The locked-image protocol (train.image_tower: locked) and early stopping, on tiny configs.

The backbone is the real EfficientNet-Lite0 from the installed wheel (nothing is downloaded); the towers on top and
the text side are the tests' tiny ones.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from campe.data.feature_cache import FeatureCacheError, FeatureCacheMissError, FeatureStore, image_keys
from campe.locked import CHANNELS, LockedImageTower, build_feature_cache, feature_manifest
from campe.train.checkpoint import CKPT, FINAL, build_run_model, load_trained_model
from campe.train.early_stopping import EarlyStopping, ValPairs
from campe.train.loop import train
from tests.test_train import _cfg, _pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _tower(embed_dim: int = 64) -> LockedImageTower:
    from campe.towers import VisionConfig
    torch.manual_seed(0)
    return LockedImageTower(VisionConfig(image_size=32, width=64, heads=2), embed_dim=embed_dim)


def _backbone_state(tower: LockedImageTower) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tower.backbone.state_dict().items()}


# ------------------------------------------------------------------------------------------------ the cache

def test_feature_cache_equals_the_live_forward_and_names_its_weights(tmp_path):
    tower = _tower()
    images = _pairs(12).images
    store = build_feature_cache(tmp_path / "feat", tower, images=images, batch=5, shard_rows=8, progress=False)
    assert len(store) == 12 and store.shards == 2  # 8 + 4 images
    manifest = json.loads((tmp_path / "feat" / "manifest.json").read_text())
    assert manifest["backbone"] == "efficientnet-lite0" and len(manifest["weights_sha256"]) == 64
    assert manifest["grid"] == 4 and manifest["channels"] == CHANNELS
    live = tower.backbone(images)  # [12,16,1280] float32, one batch (not the build's batches of 5)
    assert live.shape == (12, 16, CHANNELS)
    cached = FeatureStore.open(tmp_path / "feat", feature_manifest(32)).lookup(image_keys(images))
    # fp16 storage: equal up to its rounding (and the kernel's batch-shape rounding, ~1e-6)
    torch.testing.assert_close(cached, live, rtol=1e-3, atol=2e-3)
    tower.attach(store, strict=True)
    torch.testing.assert_close(tower(images), tower.proj(tower.pool(tower.tokens(live))), rtol=1e-3, atol=1e-3)
    # uint8 and float-in-[0,1] images are the same key (the loaders give either)
    assert image_keys(images) == image_keys(images.float() / 255.0)
    with pytest.raises(FeatureCacheMissError, match="no features"):
        tower(_pairs(2, seed=5).images)
    # other weights (or sizes): refused, naming the field
    bad = {**feature_manifest(32), "weights_sha256": "0" * 64}
    with pytest.raises(FeatureCacheError, match="weights_sha256"):
        FeatureStore.open(tmp_path / "feat", bad)


def test_interrupted_feature_build_resumes_with_only_the_missing_images(tmp_path):
    tower = _tower()
    images = _pairs(20).images
    real = tower.backbone.forward

    def dies_on_third(x, calls=[0]):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # a kill in the middle of the second shard
        return real(x)

    tower.backbone.forward = dies_on_third
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(tmp_path / "feat", tower, images=images, batch=4, shard_rows=8, progress=False)
    files = sorted(p.name for p in (tmp_path / "feat").iterdir())
    assert files == ["manifest.json", "shard-00000.parquet"]  # the finished shard; no temp file, no half shard
    tower.backbone.forward = real
    before = tower.backbone.calls
    store = build_feature_cache(tmp_path / "feat", tower, images=images, batch=4, shard_rows=8, progress=False)
    assert len(store) == 20 and tower.backbone.calls - before == 3  # 12 missing images in batches of 4
    fresh = build_feature_cache(tmp_path / "fresh", tower, images=images, batch=4, shard_rows=8, progress=False)
    keys = image_keys(images)
    torch.testing.assert_close(store.lookup(keys), fresh.lookup(keys), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("video_pool", ["mean", "attn"])
def test_locked_video_is_the_per_frame_features_pooled_as_video_pool_says(video_pool):
    from campe.towers import VisionConfig
    torch.manual_seed(0)
    tower = LockedImageTower(VisionConfig(image_size=32, width=64, heads=2, frames=4, video_pool=video_pool),
                             embed_dim=64).eval()
    assert hasattr(tower, "temporal_pool") == (video_pool == "attn")
    frames = torch.stack([_pairs(2, seed=s).images for s in range(3)], 1)  # [B=2,T=3,3,32,32] uint8
    with torch.no_grad():
        feats = torch.stack([tower.forward_features(frames[:, t]) for t in range(3)], 1)  # [2,3,width], one by one
        pooled = feats.mean(1) if video_pool == "mean" else tower.temporal_pool(feats + tower.temporal_pos[:3])
        torch.testing.assert_close(tower.forward_video(frames), tower.proj(pooled), rtol=1e-4, atol=1e-5)
        if video_pool == "attn":  # the switch matters: not the mean
            assert not torch.allclose(tower.forward_video(frames), tower.proj(feats.mean(1)), atol=1e-4)
            with pytest.raises(ValueError, match="temporal positions"):
                tower.forward_video(torch.cat([frames, frames], 1))  # 6 frames > frames=4


# ------------------------------------------------------------------------------------------------ training

def test_features_under_bf16_autocast_are_the_stored_values_and_a_bf16_locked_run_trains(tmp_path):
    """precision bf16 with the locked tower: the lookup is data, not computation. It used to run torch.cat on the
    fp16 chunks inside the step's autocast, which CPU autocast refuses (every bf16 locked run failed at step 1)."""
    data = _pairs(40)
    tower = _tower()
    build_feature_cache(tmp_path / "feat", tower, images=data.images, shard_rows=16, progress=False)
    keys = image_keys(data.images[:6])
    plain = FeatureStore.open(tmp_path / "feat", feature_manifest(32)).lookup(keys)
    fresh = FeatureStore.open(tmp_path / "feat", feature_manifest(32))  # its chunks are joined on first lookup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fresh.lookup(keys)
    assert got.dtype == torch.float32 and torch.equal(got, plain)  # the stored fp16 values, not bf16-rounded
    cfg = _cfg(tmp_path / "run", "vanilla", steps=3, precision="bf16", image_tower="locked",
               image_features_dir=str(tmp_path / "feat"))
    summary = train(cfg, source=data)
    assert summary["step"] == 3 and math.isfinite(summary["final"]["loss"])


def test_locked_step_trains_the_head_only_and_never_runs_the_backbone(tmp_path):
    data = _pairs(40)
    cfg = _cfg(tmp_path / "run", "vanilla", steps=4, image_tower="locked",
               image_features_dir=str(tmp_path / "feat"))
    model, _, _ = build_run_model(cfg)
    tower = model.visual
    assert isinstance(tower, LockedImageTower)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("backbone" in n or "net." in n for n in names)  # the frozen network is not a parameter
    assert {"visual.in_proj.weight", "visual.pos_embed", "visual.proj.weight"} <= names
    build_feature_cache(tmp_path / "feat", tower, images=data.images, progress=False)
    frozen, calls = _backbone_state(tower), tower.backbone.calls
    head = {k: v.clone() for k, v in tower.state_dict().items()}
    train(cfg, source=data, model=model)
    assert tower.backbone.calls == calls  # no backbone forward in any step (nor in the already complete build)
    after = tower.backbone.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # bit-identical, BatchNorm statistics included
    moved = [k for k, v in tower.state_dict().items() if not torch.equal(v, head[k])]
    assert "in_proj.weight" in moved and "proj.weight" in moved
    saved = torch.load(tmp_path / "run" / FINAL, weights_only=True)["model"]
    assert not any(k.startswith("visual.") and k.split(".")[1] not in ("in_proj", "pos_embed", "ln", "pool", "proj")
                   for k in saved)  # the checkpoint holds the head only
    # model_config.json records the tower: rebuilt from it, it is the locked one with the run's initial head
    from campe.model import build_model_from_config, load_config
    again, resolved = build_model_from_config(load_config(tmp_path / "run" / "model_config.json"))
    assert resolved["image_tower"] == "locked" and isinstance(again.visual, LockedImageTower)
    assert again.visual.state_dict().keys() == head.keys()
    assert all(torch.equal(again.visual.state_dict()[k], head[k]) for k in head)


def test_locked_run_resumes_bit_for_bit(tmp_path):
    def cfg(out):
        return _cfg(out, "vanilla", steps=8, ckpt_every=3, log_every=2, image_tower="locked",
                    image_features_dir=str(tmp_path / "feat"))
    data = _pairs(40)
    train(cfg(tmp_path / "full"), source=data)
    train(cfg(tmp_path / "killed"), source=data, stop_at=5, checkpoint_at_stop=False)  # ckpt at 3, "killed" at 5
    train(cfg(tmp_path / "killed"), source=data, resume=True)
    a = torch.load(tmp_path / "full" / CKPT, weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / CKPT, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ early stopping

def test_early_stopping_rule_on_a_constructed_loss_sequence():
    rule = EarlyStopping(patience=3)
    seq = [5.0, 4.0, 4.5, 3.0, 3.1, 3.2, 3.05, 1.0]
    stopped_at = None
    for i, x in enumerate(seq, 1):
        rule.update(x)
        if rule.stop:
            stopped_at = i
            break
    # best 3.0 at evaluation 4, then 3.1, 3.2, 3.05: three without a new best -> stop at 7 (1.0 never seen)
    assert (stopped_at, rule.best, rule.best_eval, rule.bad) == (7, 3.0, 4, 3)
    rule = EarlyStopping(patience=2, min_delta=0.5)
    for x in (5.0, 4.7, 4.6):  # improvements smaller than min_delta do not count
        rule.update(x)
    assert rule.stop and rule.best == 5.0 and rule.best_eval == 1
    state = EarlyStopping(patience=2)
    state.load_state_dict(rule.state_dict())
    assert state.state_dict() == rule.state_dict()
    with pytest.raises(FloatingPointError):
        EarlyStopping(1).update(math.nan)


def test_schedule_epochs_ends_the_cosine_decay_there_and_holds_the_floor(tmp_path):
    """train.schedule_epochs: the decay spans that many epochs and the lr then stays at lr * min_lr_ratio (a max
    epochs above it runs on at the floor); 0 keeps the decay over the whole run. The logged lr is the step's."""
    from campe.train.log import LOG_FILE, read_log
    from campe.train.optim import lr_factor
    data = _pairs(40)  # batch 8: 5 steps an epoch
    lrs = {}
    for sched in (0, 2):
        cfg = _cfg(tmp_path / f"s{sched}", "vanilla", steps=0, epochs=4, schedule_epochs=sched, warmup_steps=2)
        train(cfg, source=data)
        rows = read_log(tmp_path / f"s{sched}" / LOG_FILE)
        assert [int(r["step"]) for r in rows] == list(range(1, 21))
        decay = sched * 5 or 20
        for r in rows:
            want = cfg.train.lr * lr_factor(int(r["step"]) - 1, 2, decay, cfg.train.min_lr_ratio)
            assert r["lr"] == pytest.approx(want, rel=1e-6)
        lrs[sched] = [r["lr"] for r in rows]
    floor = 1e-3 * 0.1
    assert all(x == pytest.approx(floor) for x in lrs[2][10:])  # epochs 3-4: at the floor
    assert lrs[0][9] > 3 * floor and lrs[0][-1] < lrs[0][10]  # without it: still decaying over the whole run
    # unset, it is not hashed (HASHED_IF_NOT): runs and finished ablation cells keep their hashes; set, it is
    from campe.train.run_config import HASHED_IF_NOT
    a = _cfg(tmp_path / "h", "vanilla", steps=0, epochs=4)
    hashed = {k for k, v in a.to_dict()["train"].items() if HASHED_IF_NOT.get(("train", k), object()) != v}
    assert "schedule_epochs" not in hashed and "epochs" in hashed
    assert a.hash() != _cfg(tmp_path / "h", "vanilla", steps=0, epochs=4, schedule_epochs=2).hash()


@pytest.mark.parametrize("image_tower", ["scratch", "locked"])
def test_training_stops_by_the_rule_and_keeps_the_best_weights(tiny_generated, image_tower, tmp_path):
    _, gen = tiny_generated
    val_set = str(gen / "dataset_karpathy.json")
    cfg = _cfg(tmp_path / "run", "vanilla", steps=60, lr=3e-2, warmup_steps=1, patience=2, val_every=2,
               val_set=val_set, image_tower=image_tower, image_features_dir=str(tmp_path / "feat"))
    summary = train(cfg, source=_pairs(40))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history = json.loads((tmp_path / "run" / "val_log.json").read_text())["history"]
    rule = EarlyStopping(patience=2)
    for n, x in enumerate(history, 1):  # the loop applied exactly the rule to the losses it measured
        rule.update(x)
        assert rule.stop == (n == len(history) and metrics["stopped_early"])
    assert metrics["steps"] == summary["step"] == 2 * len(history)
    assert metrics["val_evals"] == len(history) and metrics["best_val_loss"] == pytest.approx(min(history), abs=1e-6)
    assert metrics["epochs_run"] == pytest.approx(summary["step"] / 5) and "best_epoch" in metrics
    # model.pt holds the best evaluation's weights: its val loss is the best one
    model, rcfg = load_trained_model(tmp_path / "run")
    from campe.core.losses import CampeObjective
    val = ValPairs.from_karpathy(val_set, 32)
    loss = val.loss(model, model.text.tokenize, CampeObjective.from_config(rcfg.loss), 8)
    assert loss == pytest.approx(min(history), rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------------------------ evaluation

@pytest.mark.parametrize("image_tower", ["scratch", "locked"])
def test_evaluation_retrieval_zero_shot_and_per_apt_maps_for_both_protocols(tiny_generated, tiny_lm, image_tower,
                                                                              tmp_path):
    """A multi-prompt run of each protocol through the evaluate stage: retrieval, video, zero-shot and the per-APT
    patch maps (a 4x4 grid for the locked tower); the locked run's test images come from its feature cache."""
    from stages.evaluate import EvaluateParams, run_stage
    _, gen = tiny_generated
    feat = tmp_path / "feat"
    cfg = _cfg(tmp_path / "run", "multi_prompt", tiny_lm, steps=3, image_tower=image_tower,
               image_features_dir=str(feat))
    data = _pairs(24)
    if image_tower == "locked":  # the eval images too, as `campe ablate` does before its cells
        model, _, _ = build_run_model(cfg)
        build_feature_cache(feat, model.visual, images=data.images, karpathy_json=gen / "dataset_karpathy.json",
                            progress=False)
    train(cfg, source=data)
    model, _ = load_trained_model(tmp_path / "run")
    if image_tower == "locked":
        assert isinstance(model.visual, LockedImageTower) and model.visual.store is not None
    p = EvaluateParams(checkpoint=str(tmp_path / "run"), image_sets={"gen": str(gen / "dataset_karpathy.json")},
                       video_sets={"gen_video": str(gen / "msrvtt")}, zero_shot_root=str(gen),
                       metrics_dir=str(tmp_path / "metrics"), plots_dir=str(tmp_path / "plots"), video_frames=4,
                       batch_size=16, examples=2)
    results = run_stage(p)
    assert set(results) == {"gen", "gen_video", "zero_shot"}
    gen_rec = results["gen"]["record"]
    assert gen_rec["k_segments"] == 4 and {"i2t_R@1", "t2i_R@10", "rsum"} <= set(gen_rec["metrics"])
    assert {"shape_top1", "colour_top1"} <= set(results["zero_shot"]["record"]["metrics"])
    assert (tmp_path / "plots" / "gen_aspect_maps.png").stat().st_size > 0
    if image_tower == "locked":  # the test images' features were cached (evaluation found them there)
        store = FeatureStore.open(feat, feature_manifest(32))
        from campe.data.evaldata import load_karpathy
        from campe.embed import load_images
        ds = load_karpathy(gen / "dataset_karpathy.json", split="test")
        assert not store.missing(image_keys(load_images(ds.image_paths, 32)))
