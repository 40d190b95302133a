"""Stage `evaluate`: zero-shot image-text and video-text retrieval, zero-shot classification, pictures.

    campe evaluate                                             # params.yaml:evaluate, the trained checkpoint
    campe evaluate --checkpoint path/to/out_dir --image-set flickr=/data/flickr30k/dataset_flickr30k.json
    campe evaluate --video-set msrvtt=/data/msrvtt            # naming sets on the command line: only those
    campe evaluate --zero-shot data/generated                  # only zero-shot classification

dvc.yaml runs one stage per configured set (foreach over `evaluate.image_sets` / `evaluate.video_sets`, and one
zero-shot stage), each naming its one set on the command line, so a new set is a new stage and the others stay
cached.

For each image set (Karpathy-split JSON: Flickr30k, COCO, the generated set) and video set (MSR-VTT style folder),
writes `<metrics_dir>/<name>.json` (dataset, split, caption policy, checkpoint, params hash, the metrics
`i2t_R@1` ... `t2i_median_rank`, and the aspect re-weighted metrics when weights are set), a recall bar chart, a
retrieval-examples grid and, for multi-prompt models, one patch-similarity map per prompt segment. When the
captions name their aspects (a generated set), retrieval aspect by aspect (campe.core.aspects): text -> image R@1/R@5
by the query caption's aspect mix and aspect type (`mix/...`, `aspect/...`, picture `<set>_by_aspect.png`); for
models with K >= 2 prompt segments the K x aspect specialisation matrix (`seg<k>/...`, `<set>_specialisation.png`)
and the aspect re-weighting chosen on `aspect_val_split` and measured on the evaluated split (`reweight/...`).
Zero-shot classification on the generated set's shape and colour classes goes to `<metrics_dir>/zero_shot.json`,
for each prompt set of `zero_shot_prompts` (grammar: the generator's own subject phrases; templates: the old
"a photo of a {} object." set), with the rate of colour predictions that are the image's background colour. Everything
is also logged to the training run in MLflow when the checkpoint has an `mlflow_run_id.txt`.

Images and video frames are preprocessed as in training (campe.data.imageprep: aspect ratio kept, white border). An
image or video that does not decode is left out with its captions, warned about (set and file), counted in the
record (`undecodable`: count and the first files), and the set fails once they pass evaluate.max_skip_fraction.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from campe import plots
from campe.core import aspects as asp
from campe.core.config import load_params
from campe.core.io import atomic_write_json, json_sha256, store_uri, write_metrics
from campe.core.retrieval import (RetrievalParams, eval_record, retrieval_metrics, zero_shot_classify,
                                  zero_shot_predict)
from campe.core.tracking import log_batch
from campe.data.evaldata import (ZERO_SHOT_PROMPT_SETS, EvalDataParams, class_folder, load_karpathy, load_msrvtt,
                                 load_scenes, make_zero_shot_folders, zero_shot_prompts)
from campe.data.imageprep import DEFAULT_MAX_SKIP_FRACTION, SkipCounter, validate_max_skip_fraction
from campe.embed import Embedder


# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "image/video retrieval, zero-shot classification and pictures for a checkpoint"


@dataclass
class EvaluateParams(RetrievalParams, EvalDataParams):
    """params.yaml section `evaluate`: its own fields, and as flat keys of the same section those of the retrieval
    computation (campe.core.retrieval.RetrievalParams) and of the eval data loaders
    (campe.data.evaldata.EvalDataParams), with their defaults and their checks."""

    checkpoint: str = "data/models/campe"  # a `campe train` out_dir (model.pt + train_config.json)
    image_sets: dict[str, str] = field(default_factory=lambda: {"generated": "data/generated/dataset_karpathy.json"})
    video_sets: dict[str, str] = field(default_factory=lambda: {"generated_msrvtt": "data/generated/msrvtt"})
    zero_shot_root: str = "data/generated"  # a generated set: shape and colour classes ("" = skip)
    metrics_dir: str = "metrics/eval"
    plots_dir: str = "plots/eval"
    batch_size: int = 256
    examples: int = 4  # queries shown in the retrieval-examples grid and images in the aspect maps
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION  # undecodable images/videos: stop past this fraction
    # zero-shot class prompts, each set reported (the first with plain keys, the others as <set>/<key>):
    # grammar = the generator's own subject phrases, templates = "a photo of a {} object." (the old set)
    zero_shot_prompts: list[str] = field(default_factory=lambda: ["grammar", "templates"])
    aspect_val_split: str = "val"  # split of an image set with aspects where re-weighting is chosen ("" = not measured)
    reweight_grid: list[float] = field(default_factory=lambda: list(asp.REWEIGHT_GRID))  # up-weights tried (1 always)

    def validate(self) -> None:
        # The two library dataclasses own the checks of their fields.
        RetrievalParams.validate(self)
        EvalDataParams.validate(self)
        if self.batch_size < 1 or self.examples < 0:
            raise ValueError("batch_size must be >= 1 and examples >= 0")
        validate_max_skip_fraction(self.max_skip_fraction)
        bad = [x for x in self.zero_shot_prompts if x not in ZERO_SHOT_PROMPT_SETS]
        if not self.zero_shot_prompts or bad or len(set(self.zero_shot_prompts)) != len(self.zero_shot_prompts):
            raise ValueError(f"zero_shot_prompts {self.zero_shot_prompts} must be distinct values of "
                             f"{list(ZERO_SHOT_PROMPT_SETS)}")
        if not self.reweight_grid or not all(0 < w < float("inf") for w in self.reweight_grid):
            raise ValueError(f"reweight_grid {self.reweight_grid} must be a non-empty list of weights > 0")
        if self.aspect_val_split and self.aspect_val_split == self.karpathy_split:
            raise ValueError(f"aspect_val_split {self.aspect_val_split!r} is the evaluated split: re-weighting "
                             f"is chosen on another split (val) and reported on {self.karpathy_split!r}")


def eval_params_hash(p: EvaluateParams) -> str:
    """sha256 (12 hex) of the evaluate params: `params_hash` of each eval record."""
    return json_sha256(dataclasses.asdict(p))[:12]


def _metrics(p: EvaluateParams, img: torch.Tensor, txt: torch.Tensor, txt_to_img, k_segments: int | None) -> dict:
    """Plain metrics, and the aspect re-weighted ones (prefixed `reweighted_`) when weights are set."""
    kw = dict(ks=p.ks, chunk=p.chunk or None, ties=p.ties, tie_tol=p.tie_tol)
    out = retrieval_metrics(img, txt, torch.as_tensor(txt_to_img), **kw)
    if p.aspect_weights:
        if k_segments is None:
            raise ValueError("evaluate.aspect_weights is set but the model's text tower gives no prompt segments "
                             "(only multi-prompt/defo towers do); set aspect_weights: []")
        if len(p.aspect_weights) != k_segments:
            raise ValueError(f"evaluate.aspect_weights has {len(p.aspect_weights)} weights but the checkpoint "
                             f"{p.checkpoint} has K={k_segments} prompt segments: give one weight per prompt")
        w = retrieval_metrics(img, txt, torch.as_tensor(txt_to_img), weights=p.aspect_weights,
                              k_segments=k_segments, **kw)
        out.update({f"reweighted_{k}": v for k, v in w.items()})
    return out


def _examples_grid(p: EvaluateParams, name: str, img: torch.Tensor, txt: torch.Tensor, image_paths, captions,
                   txt_to_img) -> Path:
    n = min(p.examples, len(captions))
    queries = list(range(0, len(captions), max(1, len(captions) // max(n, 1))))[:n]
    scores = txt[queries] @ img.T  # [n, N]
    top = scores.topk(min(5, img.shape[0]), dim=1).indices
    missed = []  # the right image and its rank (1 + the images scored above it) when it is not in the top 5
    for q, s, row in zip(queries, scores, top):
        right = txt_to_img[q]
        missed.append(None if right in row.tolist() else (image_paths[right], 1 + int((s > s[right]).sum())))
    return plots.retrieval_examples_grid(
        [captions[q] for q in queries], [[image_paths[j] for j in row.tolist()] for row in top],
        [[j == txt_to_img[q] for j in row.tolist()] for q, row in zip(queries, top)],
        Path(p.plots_dir) / f"{name}_examples.png", missed=missed,
        title=f"{name}: text -> image, top 5 (correct marked; the right image with its rank when missed)")


def _aspect_maps(p: EvaluateParams, name: str, emb: Embedder, image_paths, captions, txt_to_img, txt: torch.Tensor,
                 k: int) -> Path:
    """Per prompt segment k: <patch embedding segment k, text segment k> over the patch grid of a few images."""
    from campe.embed import aspect_maps, load_images

    idx = list(range(min(p.examples, len(image_paths))))
    first_caption = {i: next(j for j, t in enumerate(txt_to_img) if t == i) for i in idx}
    patches = emb.patches([image_paths[i] for i in idx])  # [B, P, D]
    maps = aspect_maps(patches, txt[[first_caption[i] for i in idx]], k)  # [B, K, g, g]
    images = load_images([image_paths[i] for i in idx], emb.image_size).permute(0, 2, 3, 1).numpy()
    grid, D = maps.shape[-1], txt.shape[1]
    caption = (f"Column APT-j: for each of the {grid}x{grid} image patches, the dot product of the patch's embedding "
               f"segment j with segment j of the embedding of the image's first caption (its prompt APT-j); "
               f"both are slices of L2-normalised {D}-d embeddings, so the K segment terms of one patch add up to "
               f"its cosine with the caption. One colour scale for all maps; upsampled bilinearly.")
    return plots.aspect_maps_grid(images, maps.numpy(), [f"APT-{i + 1}" for i in range(k)],
                                  Path(p.plots_dir) / f"{name}_aspect_maps.png", caption=caption,
                                  scale_label="<patch segment j, caption segment j>")


class _Undecodable:
    """on_undecodable for Embedder.images / .videos: warns and counts (SkipCounter: stops past
    evaluate.max_skip_fraction) and keeps the indices, to drop those items and their captions."""

    def __init__(self, name: str, total: int, p: EvaluateParams, kind: str = "image"):
        self.counter = SkipCounter("campe evaluate", total, p.max_skip_fraction, "evaluate.max_skip_fraction")
        self.name, self.kind, self.indices = name, kind, []

    def __call__(self, index: int, path: str, reason: str) -> None:
        self.indices.append(index)
        self.counter.skip(self.name, path, f"undecodable {self.kind} ({reason})")


def evaluate_image_set(p: EvaluateParams, emb: Embedder, name: str, ann: str) -> dict[str, Any]:
    ds = load_karpathy(ann, split=p.karpathy_split, max_captions=p.max_captions, on_missing=p.on_missing)
    bad = _Undecodable(name, len(ds.image_paths), p)
    img = emb.images(ds.image_paths, bad)
    ds = ds.without(bad.indices)
    txt, seg = emb.texts(ds.captions)
    k = None if seg is None else seg.shape[1]
    metrics = _metrics(p, img, txt, ds.txt_to_img, k)
    files = [plots.recall_bars(metrics, Path(p.plots_dir) / f"{name}_recall.png", title=name)]
    if p.examples:  # examples: 0 turns the example pictures off
        files.append(_examples_grid(p, name, img, txt, ds.image_paths, ds.captions, ds.txt_to_img))
    if k is not None and p.examples:
        files.append(_aspect_maps(p, name, emb, ds.image_paths, ds.captions, ds.txt_to_img, txt, k))
    extra: dict[str, Any] = {}
    if ds.aspects:  # the captions name their aspects (a generated set): retrieval aspect by aspect
        by_aspect, extra, more = _aspect_analysis(p, emb, name, ann, img, txt, ds, k)
        metrics.update(by_aspect)
        files += more
    rec = eval_record(metrics, dataset=name, split=p.karpathy_split, caption_policy=f"first {p.max_captions}",
                      checkpoint=p.checkpoint, params_hash=eval_params_hash(p), weights=p.aspect_weights or None,
                      ties=p.ties, tie_tol=p.tie_tol, annotation=str(ann), images=len(ds.image_paths),
                      captions=len(ds.captions),
                      skipped=ds.skipped, undecodable=bad.counter.record(), k_segments=k, **extra)
    return {"record": rec, "files": files}


def _aspect_analysis(p: EvaluateParams, emb: Embedder, name: str, ann: str, img: torch.Tensor, txt: torch.Tensor,
                     ds, k: int | None) -> tuple[dict[str, float], dict[str, Any], list[Path]]:
    """(metrics, record fields, pictures) of campe.core.aspects on a set whose captions name their aspects: t2i
    R@1/R@5 by the query caption's aspect mix and by aspect type; with K >= 2 prompt segments also the
    specialisation matrix (segment k's similarity alone) and the re-weighting chosen on `aspect_val_split`."""
    from campe.data.synth_scenes import ASPECTS

    kw = dict(order=ASPECTS, ties=p.ties, tie_tol=p.tie_tol)
    metrics = asp.aspect_breakdown(img, txt, ds.txt_to_img, ds.aspects, **kw)
    extra: dict[str, Any] = {"aspect_captions": asp.aspect_counts(ds.aspects, ASPECTS)}
    n = extra["aspect_captions"]["mix"]
    panels = {f"text -> image R@{q} by the query caption's aspect mix (captions)":
              {"": {f"{m} ({n[m]})": [metrics[f"mix/{m}/t2i_R@{q}"]] for m in n}} for q in asp.ASPECT_KS}
    files = [plots.grouped_bars(panels, Path(p.plots_dir) / f"{name}_by_aspect.png", title=name)]
    if k is None or k < 2:
        return metrics, extra, files
    spec = asp.specialisation(img, txt, ds.txt_to_img, ds.aspects, k, **kw)
    metrics.update(asp.specialisation_metrics(spec))
    extra["specialisation"] = spec
    rows, cols = spec["rows"], spec["aspects"]
    files.append(plots.heatmaps(
        {"t2i R@1 (%)": (spec["t2i_R@1"], rows, cols), "t2i R@5 (%)": (spec["t2i_R@5"], rows, cols),
         "R@1 + R@5 minus the segment's mean": (asp.specialisation_scores(spec), rows[:-1], cols)},
        Path(p.plots_dir) / f"{name}_specialisation.png",
        title=f"{name}: text -> image with segment k's similarity alone, by an aspect the query mentions"))
    if p.aspect_val_split:
        plan = _choose_reweighting(p, emb, name, ann, k, kw)
        metrics.update(asp.reweighting_effect(img, txt, ds.txt_to_img, ds.aspects, plan, k, **kw))
        extra["reweighting"] = {"chosen_on": p.aspect_val_split, "grid": p.reweight_grid, "per_aspect": plan}
    return metrics, extra, files


def _choose_reweighting(p: EvaluateParams, emb: Embedder, name: str, ann: str, k: int, kw: dict) -> dict:
    """The per-aspect segment and weight, chosen on the `aspect_val_split` images of the same annotation file."""
    split = p.aspect_val_split
    hint = "set evaluate.aspect_val_split: \"\" to skip the re-weighting measurement"
    try:
        val = load_karpathy(ann, split=split, max_captions=p.max_captions, on_missing=p.on_missing)
    except ValueError as e:
        raise ValueError(f"{e}; re-weighting is chosen on split {split!r}: {hint}") from None
    if not val.aspects:
        raise ValueError(f"{ann}: the captions of split {split!r} do not name their aspects; {hint}")
    bad = _Undecodable(f"{name}/{split}", len(val.image_paths), p)
    img = emb.images(val.image_paths, bad)
    val = val.without(bad.indices)
    txt, _ = emb.texts(val.captions)
    return asp.choose_reweighting(img, txt, val.txt_to_img, val.aspects, k, p.reweight_grid, **kw)


def evaluate_video_set(p: EvaluateParams, emb: Embedder, name: str, root: str) -> dict[str, Any]:
    ds = load_msrvtt(root, policy=p.msrvtt_policy, max_captions=p.msrvtt_max_captions, on_missing=p.on_missing)
    bad = _Undecodable(name, len(ds.video_paths), p, "video")
    vid = emb.videos(ds.video_paths, bad)
    ds = ds.without(bad.indices)
    txt, seg = emb.texts(ds.captions)
    k = None if seg is None else seg.shape[1]
    # Video sets name the directions v2t / t2v (MSR-VTT convention).
    metrics = {key.replace("i2t_", "v2t_").replace("t2i_", "t2v_"): v
               for key, v in _metrics(p, vid, txt, ds.txt_to_video, k).items()}
    files = [plots.recall_bars(metrics, Path(p.plots_dir) / f"{name}_recall.png", title=name)]
    rec = eval_record(metrics, dataset=name, split="test", caption_policy=p.msrvtt_policy, checkpoint=p.checkpoint,
                      params_hash=eval_params_hash(p), weights=p.aspect_weights or None, ties=p.ties,
                      tie_tol=p.tie_tol, root=str(root),
                      videos=len(ds.video_paths), captions=len(ds.captions), skipped=ds.skipped,
                      undecodable=bad.counter.record(), frames=p.video_frames, k_segments=k)
    return {"record": rec, "files": files}


def evaluate_zero_shot(p: EvaluateParams, emb: Embedder, work_dir: Path) -> dict[str, Any]:
    """Shape and colour classification of the generated test images, with each prompt set of
    evaluate.zero_shot_prompts (the first with plain keys, the others as <set>/<key>); for colour also how often the
    top-1 prediction is one of the image's background colours (wrong by construction: the generator never paints
    the main subject in its background's colour), and that rate for a uniformly random prediction."""
    folders = make_zero_shot_folders(p.zero_shot_root, work_dir / "zero_shot")
    scenes = load_scenes(p.zero_shot_root, "test")
    metrics: dict[str, float] = {}
    undecodable: dict[str, dict] = {}
    classes: dict[str, int] = {}
    for task, folder in folders.items():
        paths, labels, names = class_folder(folder)
        bad = _Undecodable(f"zero_shot/{task}", len(paths), p)
        img = emb.images(paths, bad)
        dropped = set(bad.indices)
        kept = [i for i in range(len(paths)) if i not in dropped]
        undecodable[task], classes[task] = bad.counter.record(), len(names)
        y = torch.as_tensor([labels[i] for i in kept])
        bg = [set(scenes[Path(paths[i]).name]["background"]["colours"]) for i in kept] if task == "colour" else None
        for j, prompt_set in enumerate(p.zero_shot_prompts):
            pre = "" if j == 0 else f"{prompt_set}/"
            res = _zero_shot_task(p, emb, img, y, names, task, prompt_set, bg)
            metrics.update({pre + key: v for key, v in res.items()})
        if bg is not None:
            metrics[f"{task}_background_chance"] = 100.0 * sum(len(b & set(names)) / len(names) for b in bg) / len(bg)
    rec = eval_record(metrics, dataset="generated_zero_shot", split="test",
                      caption_policy=f"class prompts: {', '.join(p.zero_shot_prompts)} (the first: plain keys)",
                      checkpoint=p.checkpoint, params_hash=eval_params_hash(p), weights=p.aspect_weights or None,
                      ties=p.ties, tie_tol=p.tie_tol, classes=classes, prompt_sets=list(p.zero_shot_prompts),
                      undecodable=undecodable)
    return {"record": rec, "files": []}


def _zero_shot_task(p: EvaluateParams, emb: Embedder, img: torch.Tensor, y: torch.Tensor, names: list[str],
                    task: str, prompt_set: str, bg: list[set] | None) -> dict[str, float]:
    """<task>_top1, <task>_top1_is_background (bg given: each image's background colours), <task>_top5, and
    the reweighted_ ones when evaluate.aspect_weights is set."""
    prompts = zero_shot_prompts(task, names, prompt_set)
    txt, seg = emb.texts([s for row in prompts for s in row])
    class_emb = txt.view(len(prompts), len(prompts[0]), -1)
    kw = dict(ks=[k for k in p.zero_shot_ks if k <= len(names)], ties=p.ties, tie_tol=p.tie_tol)
    out: dict[str, float] = {}
    for pre, w in [("", {})] + ([("reweighted_", dict(weights=p.aspect_weights, k_segments=seg.shape[1]))]
                                if p.aspect_weights and seg is not None else []):
        res = zero_shot_classify(img, class_emb, y, **kw, **w)
        out[f"{pre}{task}_top1"] = res.pop("top1")
        if bg is not None:
            pred = zero_shot_predict(img, class_emb, **w).tolist()
            out[f"{pre}{task}_top1_is_background"] = 100.0 * sum(names[c] in b for c, b in zip(pred, bg)) / len(bg)
        out.update({f"{pre}{task}_{key}": v for key, v in res.items()})
    return out


def evaluate_all(p: EvaluateParams, emb: Embedder, work_dir: Path) -> dict[str, dict[str, Any]]:
    """Every configured set; writes one metrics JSON each (atomically) and returns {name: {record, files}}."""
    results: dict[str, dict[str, Any]] = {}
    for name, ann in p.image_sets.items():
        results[name] = evaluate_image_set(p, emb, name, ann)
    for name, root in p.video_sets.items():
        results[name] = evaluate_video_set(p, emb, name, root)
    if p.zero_shot_root:
        results["zero_shot"] = evaluate_zero_shot(p, emb, work_dir)
    for name, r in results.items():
        write_metrics(Path(p.metrics_dir) / f"{name}.json", r["record"], headline(r["record"]["metrics"]))
    return results


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The figures `dvc metrics show` prints for a set (<set>.headline.json): R@1/5/10 both ways, or zero-shot
    top-1/top-5 (re-weighted ones, ranks and rsum stay in <set>.json)."""
    return {k: v for k, v in metrics.items() if re.fullmatch(r"(i2t|t2i|v2t|t2v)_R@\d+|\w+_top[15]", k)
            and not k.startswith("reweighted_")}


# ------------------------------------------------------------------------------------------------ MLflow + CLI
def mlflow_metric_name(dataset: str, metric: str) -> str:
    return f"eval/{dataset}/{metric.replace('@', '_at_')}"


def training_run(checkpoint: str, base_dir: str | None) -> tuple[str, str] | None:
    """(store URI, run id) of the MLflow training run the checkpoint names in mlflow_run_id.txt, checked to be in
    its store (train.tracking_uri of train_config.json; a relative one resolved against `base_dir`, the params
    file's folder). None when there is nothing to log into. Checked before any work, and without creating a store:
    a run that is not there is one ValueError line naming the run, the store and the fix."""
    id_file, cfg_file = Path(checkpoint) / "mlflow_run_id.txt", Path(checkpoint) / "train_config.json"
    if not id_file.exists() or not cfg_file.exists():
        return None  # no run recorded (load_trained_model names a missing train_config.json)
    raw = json.loads(cfg_file.read_text())["config"]["train"].get("tracking_uri", "")
    if not raw:
        return None
    uri, run_id = store_uri(raw, base_dir), id_file.read_text().strip()
    fix = ("pass the --params of the project that trained it (a relative train.tracking_uri "
           f"{raw!r} is resolved against the params file's folder)" if uri != raw else
           f"check train.tracking_uri {raw!r} in {cfg_file}")
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is not None and not db.exists():  # MLflow would create an empty store here, then not find the run
        raise ValueError(f"the MLflow training run {run_id} named in {id_file} cannot be logged into: there is no "
                         f"store {db}; {fix}")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        raise ValueError(f"the MLflow training run {run_id} named in {id_file} is not in the store {uri}; "
                         f"{fix}") from None
    return uri, run_id


def log_to_training_run(p: EvaluateParams, run: tuple[str, str] | None, results: dict[str, dict[str, Any]]
                        ) -> str | None:
    """Log every metric (as `eval/<set>/<metric>`, see mlflow_metric_name), metrics JSON and picture into the
    training run `run` = (store URI, run id) from training_run. Returns that run id (None: no run to log into)."""
    if run is None:
        return None
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tracking_uri, run_id = run
    client = MlflowClient(tracking_uri=tracking_uri)
    now = int(time.time() * 1000)
    # MLflow refuses '@' in metric names: i2t_R@1 is logged as eval/<set>/i2t_R_at_1.
    metrics = [Metric(mlflow_metric_name(name, k), float(v), now, 0)
               for name, r in results.items() for k, v in r["record"]["metrics"].items()]
    log_batch(client, run_id, metrics=metrics)
    for name, r in results.items():
        client.log_artifact(run_id, str(Path(p.metrics_dir) / f"{name}.json"), artifact_path="eval")
        for f in r["files"]:
            client.log_artifact(run_id, str(f), artifact_path="eval/plots")
    return run_id


def _named_paths(items: list[str] | None, flag: str) -> dict[str, str] | None:
    if items is None:
        return None
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected NAME=PATH, e.g. {flag} flickr30k=/data/dataset_flickr30k.json")
        name, path = item.split("=", 1)
        out[name] = path
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default="params.yaml", help="params file (section `evaluate`)")
    ap.add_argument("--checkpoint", help="a `campe train` out_dir (overrides evaluate.checkpoint)")
    ap.add_argument("--image-set", action="append", metavar="NAME=JSON",
                    help="a Karpathy-split JSON to evaluate (repeatable; replaces evaluate.image_sets)")
    ap.add_argument("--video-set", action="append", metavar="NAME=DIR",
                    help="an MSR-VTT-style folder (repeatable; replaces evaluate.video_sets)")
    ap.add_argument("--zero-shot", metavar="DIR",
                    help="a generated set to classify zero-shot (overrides evaluate.zero_shot_root)")
    ap.add_argument("--no-zero-shot", action="store_true", help="skip zero-shot classification")
    ap.add_argument("--metrics-dir", help="overrides evaluate.metrics_dir")
    ap.add_argument("--plots-dir", help="overrides evaluate.plots_dir")


def run_stage(p: EvaluateParams, device: str = "cpu", base_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate p.checkpoint on every configured set and log into its training run. base_dir: the params file's
    folder, against which a relative MLflow store of the checkpoint is resolved (None: the working dir)."""
    from campe.train.checkpoint import load_trained_model

    run = training_run(p.checkpoint, base_dir)  # before any work: a run that is not there is an error now
    model, cfg = load_trained_model(p.checkpoint, device=device)
    # Both text towers take a list of captions (the multi-prompt one builds its prompt layout itself).
    emb = Embedder(model, text_batch=lambda captions: captions, batch_size=p.batch_size, frames=p.video_frames,
                   progress=os.environ.get("CAMPE_NO_PROGRESS") != "1")
    with tempfile.TemporaryDirectory(prefix="campe-eval-") as work:
        results = evaluate_all(p, emb, Path(work))
    log_to_training_run(p, run, results)
    return results


def run(args: argparse.Namespace) -> int:
    from stages.params import check_params  # here, not at the top: stages.params imports every stage

    check_params(args.params)  # the whole file, before any work
    overrides: dict[str, Any] = {}
    for key, value in (("checkpoint", args.checkpoint), ("metrics_dir", args.metrics_dir),
                       ("plots_dir", args.plots_dir), ("image_sets", _named_paths(args.image_set, "--image-set")),
                       ("video_sets", _named_paths(args.video_set, "--video-set"))):
        if value is not None:
            overrides[key] = value
    named = {"image_sets": args.image_set, "video_sets": args.video_set, "zero_shot_root": args.zero_shot}
    if any(v is not None for v in named.values()):
        # Naming sets on the command line means: only those (one dvc stage per set relies on it).
        for key, value in named.items():
            if value is None:
                overrides[key] = "" if key == "zero_shot_root" else {}
    if args.zero_shot is not None:
        if not args.zero_shot:
            raise ValueError("--zero-shot: give a generated set's folder (e.g. data/generated)")
        overrides["zero_shot_root"] = args.zero_shot
    if args.no_zero_shot:
        overrides["zero_shot_root"] = ""
    p = load_params(args.params, "evaluate", EvaluateParams, overrides)
    if not (p.image_sets or p.video_sets or p.zero_shot_root):
        raise ValueError(f"nothing to evaluate: {args.params}:evaluate has no image_sets, no video_sets and an "
                         "empty zero_shot_root (and none was named with --image-set / --video-set / --zero-shot)")
    results = run_stage(p, base_dir=os.path.dirname(os.path.abspath(args.params)))
    per_aspect = ("mix/", "aspect/", "seg", "reweight/")  # in the metrics files; the summary line stays short
    summary = {name: {k: round(v, 2) for k, v in r["record"]["metrics"].items()
                      if ("R@1" in k or "top1" in k) and not k.startswith(per_aspect)} for name, r in results.items()}
    print(json.dumps(summary))
    return 0
