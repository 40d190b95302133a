"""The evaluation stage end to end on the tiny generated set, with real (untrained) models."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from campe.embed import Embedder, load_images
from campe.data.evaldata import MissingFilesError, load_karpathy
from campe.model import build_model
from campe.core.aspects import aspect_breakdown
from campe.core.retrieval import retrieval_metrics
from stages.evaluate import EvaluateParams, evaluate_all, evaluate_image_set


@pytest.fixture(scope="module")
def vanilla():
    torch.manual_seed(0)
    model, _ = build_model("tiny")
    return model, Embedder(model, model.text.tokenize, batch_size=7, frames=4, progress=False)


def _params(root, tmp_path, **kw):
    base = dict(checkpoint="untrained", image_sets={"gen": str(root / "dataset_karpathy.json")},
                video_sets={"gen_video": str(root / "msrvtt")}, zero_shot_root=str(root),
                metrics_dir=str(tmp_path / "metrics"), plots_dir=str(tmp_path / "plots"), video_frames=4)
    base.update(kw)
    return EvaluateParams(**base)


def test_all_sets_write_named_metrics_records_and_pictures(tiny_generated, vanilla, tmp_path):
    _, root = tiny_generated
    p = _params(root, tmp_path)
    results = evaluate_all(p, vanilla[1], tmp_path)
    assert set(results) == {"gen", "gen_video", "zero_shot"}
    gen = json.loads((tmp_path / "metrics" / "gen.json").read_text())
    assert {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_median_rank",
            "t2i_mean_rank"} <= set(gen["metrics"])
    assert (gen["dataset"], gen["split"], gen["checkpoint"]) == ("gen", "test", "untrained")
    assert len(gen["params_hash"]) == 12 and gen["images"] == 6 and gen["captions"] == 30
    vid = json.loads((tmp_path / "metrics" / "gen_video.json").read_text())
    assert {"v2t_R@1", "t2v_R@1", "t2v_R@10"} <= set(vid["metrics"]) and vid["caption_policy"] == "1k-A"
    zs = json.loads((tmp_path / "metrics" / "zero_shot.json").read_text())
    assert {"shape_top1", "shape_top5", "colour_top1", "colour_top5"} <= set(zs["metrics"])
    for r in results.values():
        assert all(0.0 <= v <= 100.0 for k, v in r["record"]["metrics"].items() if "rank" not in k and k != "rsum")
        assert all(f.exists() and f.stat().st_size > 0 for f in r["files"])


def test_zero_shot_prompt_sets_and_background_rate_equal_a_direct_computation(tiny_generated, vanilla, tmp_path):
    """Each prompt set's top-1 and the share of colour predictions that are one of the image's background colours,
    against the plain computation: prompts embedded one by one, class = argmax of the averaged normalised prompts."""
    from campe.data.evaldata import class_folder, grammar_prompts, zero_shot_prompts

    _, root = tiny_generated
    model, emb = vanilla
    p = _params(root, tmp_path, image_sets={}, video_sets={})
    rec = evaluate_all(p, emb, tmp_path)["zero_shot"]["record"]
    m = rec["metrics"]
    assert rec["prompt_sets"] == ["grammar", "templates"]
    scenes = {im["filename"]: im["scene"] for im in json.loads((root / "dataset_karpathy.json").read_text())["images"]}
    paths, labels, names = class_folder(tmp_path / "zero_shot" / "colour")
    bg = [scenes[path.rsplit("/", 1)[-1]]["background"]["colours"] for path in paths]
    with torch.no_grad():
        img = torch.cat([model.encode_image(load_images([path], 32)) for path in paths])
        for prompt_set, pre in (("grammar", ""), ("templates", "templates/")):
            prompts = zero_shot_prompts("colour", names, prompt_set)
            cls = torch.nn.functional.normalize(torch.stack([torch.nn.functional.normalize(torch.cat(
                [model.encode_text(model.text.tokenize([s]))["text"] for s in row]), dim=-1).mean(0)
                for row in prompts]), dim=-1)
            pred = (img @ cls.T).argmax(1).tolist()
            assert m[f"{pre}colour_top1"] == pytest.approx(100 * sum(c == y for c, y in zip(pred, labels)) / len(paths))
            assert m[f"{pre}colour_top1_is_background"] == pytest.approx(
                100 * sum(names[c] in b for c, b in zip(pred, bg)) / len(paths))
    assert m["colour_background_chance"] == pytest.approx(100 * sum(len(b) for b in bg) / 8 / len(paths))
    assert list(m).index("colour_top1_is_background") == list(m).index("colour_top1") + 1  # beside its figure
    assert grammar_prompts("colour", names) == zero_shot_prompts("colour", names)
    p = _params(root, tmp_path, image_sets={}, video_sets={}, zero_shot_prompts=["templates"])
    old = evaluate_all(p, emb, tmp_path)["zero_shot"]["record"]["metrics"]
    assert old["colour_top1"] == m["templates/colour_top1"] and not any("/" in k for k in old)


def test_batched_stage_metrics_equal_one_by_one_reference(tiny_generated, vanilla, tmp_path):
    _, root = tiny_generated
    model, emb = vanilla
    p = _params(root, tmp_path, video_sets={}, zero_shot_root="")
    rec = evaluate_image_set(p, emb, "gen", str(root / "dataset_karpathy.json"))["record"]
    ds = load_karpathy(root / "dataset_karpathy.json")
    with torch.no_grad():
        img = torch.cat([model.encode_image(load_images([path], 32)) for path in ds.image_paths])
        txt = torch.cat([model.encode_text(model.text.tokenize([c]))["text"] for c in ds.captions])
    ref = retrieval_metrics(img, txt, torch.tensor(ds.txt_to_img))
    assert {k: rec["metrics"][k] for k in ref} == pytest.approx(ref)
    # the generated captions name their aspects: the breakdown is that of the reference embeddings
    ref = aspect_breakdown(img, txt, ds.txt_to_img, ds.aspects)
    assert ds.aspects and len(ref) >= 4
    assert {k: v for k, v in rec["metrics"].items() if k.startswith(("mix/", "aspect/"))} == pytest.approx(ref)
    assert sum(rec["aspect_captions"]["mix"].values()) == len(ds.captions)


def test_aspect_weights_all_ones_equal_plain_and_need_segments(tiny_generated, vanilla, tmp_path):
    from campe.text.multiprompt import MultiPromptConfig, build_text_encoder

    _, root = tiny_generated
    enc = build_text_encoder(MultiPromptConfig(k=4), embed_dim=128)
    model, _ = build_model("tiny", text_tower=enc, embed_dim=128)
    emb = Embedder(model, enc.layout, batch_size=16, progress=False)
    p = _params(root, tmp_path, aspect_weights=[1.0] * 4, video_sets={}, zero_shot_root="")
    res = evaluate_image_set(p, emb, "gen", str(root / "dataset_karpathy.json"))
    m = res["record"]["metrics"]
    assert res["record"]["k_segments"] == 4
    plain = [k for k in m if f"reweighted_{k}" in m]
    assert {"i2t_R@1", "t2i_R@5", "rsum"} <= set(plain)
    assert {k: m[f"reweighted_{k}"] for k in plain} == pytest.approx({k: m[k] for k in plain})
    assert {"gen_aspect_maps.png", "gen_by_aspect.png", "gen_specialisation.png"} <= {f.name for f in res["files"]}
    # K = 4 segments: the specialisation matrix (its all row = the plain breakdown) and re-weighting chosen on val
    spec = res["record"]["specialisation"]
    assert spec["rows"] == ["APT-1", "APT-2", "APT-3", "APT-4", "all"]
    # (the record's metrics are rounded to 6 decimals when made, the matrix keeps full precision)
    assert spec["t2i_R@1"][-1] == pytest.approx([m[f"aspect/{a}/t2i_R@1"] for a in spec["aspects"]], abs=1e-6)
    assert all(f"seg{i}/aspect/{a}/t2i_R@5" in m for i in range(1, 5) for a in spec["aspects"])
    rw = res["record"]["reweighting"]
    assert rw["chosen_on"] == "val" and set(rw["per_aspect"]) <= set(spec["aspects"])
    for a, choice in rw["per_aspect"].items():
        assert choice["weight"] in [1.0, *p.reweight_grid]
        assert m[f"reweight/{a}/delta_t2i_R@1"] == pytest.approx(m[f"reweight/{a}/t2i_R@1"] - m[f"aspect/{a}/t2i_R@1"])
    p_no_val = _params(root, tmp_path, video_sets={}, zero_shot_root="", aspect_val_split="", examples=0)
    m = evaluate_image_set(p_no_val, emb, "gen", str(root / "dataset_karpathy.json"))["record"]["metrics"]
    assert not any(k.startswith("reweight/") for k in m) and any(k.startswith("seg1/") for k in m)
    with pytest.raises(ValueError, match="aspect_weights is set but the model's text tower gives no prompt segments"):
        evaluate_image_set(p, vanilla[1], "gen", str(root / "dataset_karpathy.json"))
    p = _params(root, tmp_path, aspect_weights=[1.0] * 3, video_sets={}, zero_shot_root="")
    with pytest.raises(ValueError, match="has 3 weights but the checkpoint untrained has K=4 prompt segments"):
        evaluate_image_set(p, emb, "gen", str(root / "dataset_karpathy.json"))


def test_missing_images_error_or_skip_and_count(tiny_generated, vanilla, tmp_path):
    _, root = tiny_generated
    copy = tmp_path / "gen"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("msrvtt"))
    (copy / "images" / "test_000002.jpg").unlink()
    p = _params(copy, tmp_path, video_sets={}, zero_shot_root="")
    with pytest.raises(MissingFilesError, match=r"(?s)test_000002.jpg.*on_missing"):
        evaluate_all(p, vanilla[1], tmp_path)
    p = _params(copy, tmp_path, video_sets={}, zero_shot_root="", on_missing="skip")
    rec = evaluate_all(p, vanilla[1], tmp_path)["gen"]["record"]
    assert (rec["images"], rec["skipped"]) == (5, 1)


def test_examples_zero_turns_the_example_pictures_off(tiny_generated, vanilla, tmp_path):
    _, root = tiny_generated
    p = _params(root, tmp_path, video_sets={}, zero_shot_root="", examples=0)
    files = evaluate_image_set(p, vanilla[1], "gen", str(root / "dataset_karpathy.json"))["files"]
    assert [f.name for f in files] == ["gen_recall.png", "gen_by_aspect.png"]  # the aspect bars are no example


def test_campe_evaluate_on_a_trained_checkpoint_logs_into_its_mlflow_run(tiny_generated, tmp_path):
    """Train a tiny vanilla model for a few steps (real MLflow SQLite store), then `campe evaluate` its out_dir."""
    import argparse

    import yaml
    from mlflow.tracking import MlflowClient

    from campe.train.loop import train
    from campe.train.run_config import resolve_run_config
    from campe.train.sources import MemoryPairs
    from stages import evaluate as stage
    from tests.test_train import TINY_MODEL

    _, root = tiny_generated
    ds = load_karpathy(root / "dataset_karpathy.json", split="train", max_captions=1)
    pairs = MemoryPairs(load_images(ds.image_paths, 32), ds.captions)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    cfg = resolve_run_config({"model": dict(TINY_MODEL), "loss": {"kind": "softmax"},
                              "train": {"method": "vanilla", "out_dir": str(out), "steps": 3, "batch_size": 8,
                                        "warmup_steps": 1, "progress": False, "metrics_file": "",
                                        "tracking_uri": uri, "artifact_root": str(tmp_path / "art")}})
    train(cfg, source=pairs)

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"video_frames": 4, "examples": 2}}))
    ap = argparse.ArgumentParser()
    stage.add_arguments(ap)
    args = ap.parse_args(["--params", str(params), "--checkpoint", str(out),
                          "--image-set", f"gen={root / 'dataset_karpathy.json'}", "--no-zero-shot",
                          "--metrics-dir", str(tmp_path / "metrics"), "--plots-dir", str(tmp_path / "plots")])
    assert stage.run(args) == 0
    rec = json.loads((tmp_path / "metrics" / "gen.json").read_text())
    assert rec["checkpoint"] == str(out) and set(rec) >= {"dataset", "split", "caption_policy", "params_hash"}

    client = MlflowClient(tracking_uri=uri)
    run_id = (out / "mlflow_run_id.txt").read_text().strip()
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/gen/i2t_R_at_1"] == pytest.approx(rec["metrics"]["i2t_R@1"])
    assert logged["eval/gen/t2i_R_at_10"] == pytest.approx(rec["metrics"]["t2i_R@10"])
    assert logged["eval/gen/t2i_median_rank"] == pytest.approx(rec["metrics"]["t2i_median_rank"])
    names = {a.path for a in client.list_artifacts(run_id, "eval")} | {
        a.path for a in client.list_artifacts(run_id, "eval/plots")}
    assert {"eval/gen.json", "eval/plots/gen_recall.png", "eval/plots/gen_examples.png"} <= names

    # `--zero-shot DIR` alone (the evaluate_zero_shot dvc stage): only zero-shot, the configured sets are cleared.
    args = ap.parse_args(["--params", str(params), "--checkpoint", str(out), "--zero-shot", str(root),
                          "--metrics-dir", str(tmp_path / "zs"), "--plots-dir", str(tmp_path / "zs_plots")])
    assert stage.run(args) == 0
    assert sorted(f.name for f in (tmp_path / "zs").iterdir()) == ["zero_shot.headline.json", "zero_shot.json"]
    head = json.loads((tmp_path / "zs" / "zero_shot.headline.json").read_text())
    assert set(head) == {"shape_top1", "shape_top5", "colour_top1", "colour_top5"}  # what dvc metrics show prints
    assert json.loads((tmp_path / "zs" / "zero_shot.json").read_text())["dataset"] == "generated_zero_shot"

    # A checkpoint folder that is not a finished training run: a clear error naming it.
    with pytest.raises(FileNotFoundError, match=r"model.pt: not found.*campe train"):
        stage.run_stage(stage.EvaluateParams(checkpoint=str(tmp_path / "nope")))


def _cli_args(params, *argv):
    import argparse

    import stages.evaluate as stage
    ap = argparse.ArgumentParser()
    stage.add_arguments(ap)
    return stage, ap.parse_args(["--params", str(params), *argv])


def test_campe_evaluate_refuses_to_evaluate_nothing(tmp_path):
    """One dvc stage per set names its set on the command line; an empty selection is an error naming the fix."""
    import yaml
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"image_sets": {}, "video_sets": {}, "zero_shot_root": ""}}))
    stage, args = _cli_args(params, "--checkpoint", str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="nothing to evaluate.*params.yaml:evaluate"):
        stage.run(args)
    stage, args = _cli_args(params, "--zero-shot", "")
    with pytest.raises(ValueError, match="--zero-shot: give a generated set"):
        stage.run(args)



def test_undecodable_images_and_videos_are_skipped_counted_and_stop_past_the_fraction(tiny_generated, vanilla,
                                                                                        tmp_path):
    """Garbage bytes in a test image and in a test video: each is left out with its captions and a warning naming
    the set and the file, counted in the record (`undecodable`), and past evaluate.max_skip_fraction the set fails."""
    import csv

    from campe.data.imageprep import TooManySkipsError, UndecodableImageWarning

    _, root = tiny_generated
    copy = tmp_path / "gen"
    shutil.copytree(root, copy)
    bad_image = copy / "images" / "test_000002.jpg"
    bad_image.write_bytes(b"not a jpeg at all")
    with open(copy / "msrvtt" / "MSRVTT_JSFUSION_test.csv") as f:
        video_id = next(csv.DictReader(f))["video_id"]
    bad_video = copy / "msrvtt" / "videos" / f"{video_id}.mp4"
    bad_video.write_bytes(b"not an mp4 either")

    p = _params(copy, tmp_path, max_skip_fraction=0.5)
    with pytest.warns(UndecodableImageWarning) as w:
        results = evaluate_all(p, vanilla[1], tmp_path)
    messages = [str(x.message) for x in w]
    assert any(f"skipping {bad_image} of gen: undecodable image" in m for m in messages)
    assert any(f"skipping {bad_video} of gen_video: undecodable video" in m for m in messages)
    gen = results["gen"]["record"]
    assert (gen["images"], gen["captions"], gen["skipped"]) == (5, 25, 0)
    assert gen["undecodable"] == {"count": 1, "first": [f"gen:{bad_image}"]}
    vid = results["gen_video"]["record"]
    assert (vid["videos"], vid["captions"]) == (2, 2) and vid["undecodable"]["count"] == 1  # 1k-A: one caption each
    zs = results["zero_shot"]["record"]
    assert {t: r["count"] for t, r in zs["undecodable"].items()} == {"shape": 1, "colour": 1}
    on_disk = json.loads((tmp_path / "metrics" / "gen.json").read_text())
    assert on_disk["undecodable"]["count"] == 1

    # One of 6 images is more than the default 1 %: the set stops, naming the file.
    p = _params(copy, tmp_path, video_sets={}, zero_shot_root="")
    want = rf"1 of 6 samples could not be decoded .*evaluate.max_skip_fraction=0.01 .*{bad_image}"
    with pytest.warns(UndecodableImageWarning), pytest.raises(TooManySkipsError, match=want):
        evaluate_all(p, vanilla[1], tmp_path)
