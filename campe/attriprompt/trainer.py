"""One trainer for every prompt-learning method: few-shot training on a frozen CLIP, evaluation, checkpoints,
metrics JSON per (method, dataset, seed), an MLflow run each, and the summaries of the protocol.

    from campe.attriprompt.trainer import run_all, summarise
    run_all(params, base_dir=".", evaluate_only=False)   # every method x dataset x seed of the section
    summarise(params)                                     # <metrics_dir>/<protocol>/summary.{json,md}

base2new: train on the base classes of the seed's 16-shot sample; test base accuracy on the base test images and
novel accuracy among the novel classes only (class tokens rebuilt for them; every learner here is class-agnostic).
cross: train on all classes of `source`; test the source, each cross-dataset target (all its classes) and each
domain-generalisation target (the source's classes under shift).
Optimisation as Dassl: SGD (momentum, weight decay), the lr constant at warmup_lr for the warm-up epochs and then
cosine over all epochs (evaluated at the epoch index); PromptSRC's GPA when the method asks for it.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

import campe.attriprompt.attri  # noqa: F401  (registers "attriprompt" in METHODS)
from campe.attriprompt.backbone import Backbone, load_backbone
from campe.attriprompt.config import PromptLearnParams
from campe.attriprompt.fewshot import (Datum, classnames_of, dataset_average, fewshot, fmt_ci, fmt_spread, hm,
                                       read_split, seed_summary, subsample_classes)
from campe.attriprompt.methods import (METHODS, ClassText, PromptMethod, VisionOut, build_method, class_text,
                                       vision_pass)
from campe.core.io import atomic_file, atomic_write_bytes, atomic_write_json, json_sha256

# fields that do not change a run's result (where things go, which runs to do)
_NOT_RESULT = {"datasets", "methods", "seeds", "out_dir", "metrics_dir", "fewshot_dir", "tracking_uri", "experiment",
               "artifact_root", "device", "xd_targets", "dg_targets", "test_batch_size"}


def run_hash(p: PromptLearnParams) -> str:
    return json_sha256({k: v for k, v in asdict(p).items() if k not in _NOT_RESULT})[:16]


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=os.environ.get("CAMPE_NO_PROGRESS") == "1")


# ---------------------------------------------------------------------------------------------------- images
def load_image(d: Datum) -> Any:
    from PIL import Image
    try:
        with Image.open(d.impath) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{d.impath}: image of class {d.classname!r} does not open ({e}); check the split "
                                f"file's paths against its image folder") from None


def augment(img: Any, rng: random.Random) -> Any:
    """Random resized crop (area 0.5-1, aspect 3/4-4/3) and horizontal flip (CoOp's random_resized_crop+flip,
    with a gentler area range for small images)."""
    from PIL import Image
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.5, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img.crop((x, y, x + cw, y + ch))
            break
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def encode_set(bb: Backbone, items: list[Datum], layers: tuple[int, ...], p: PromptLearnParams,
               desc: str = "encode") -> VisionOut:
    """The frozen image side of `items` (no augmentation), in batches of test_batch_size."""
    parts = []
    starts = range(0, len(items), p.test_batch_size)
    for s in _progress(starts, len(starts), desc):
        pixels = bb.preprocess([load_image(d) for d in items[s:s + p.test_batch_size]])
        parts.append(vision_pass(bb, pixels.to(_device(p)), layers, p))
    return VisionOut.cat(parts)


@torch.no_grad()
def accuracy(method: PromptMethod, vis: VisionOut, ct: ClassText, labels: torch.Tensor, batch: int) -> float:
    """Top-1 accuracy in percent."""
    method.eval()
    correct = 0
    for s in range(0, len(labels), batch):
        correct += int((method.logits(vis[s:s + batch], ct).argmax(-1) == labels[s:s + batch]).sum())
    return 100.0 * correct / max(len(labels), 1)


def _device(p: PromptLearnParams) -> torch.device:
    if p.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(p.device)


# ---------------------------------------------------------------------------------------------------- training
def lr_at(epoch: int, p: PromptLearnParams) -> float:
    """Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), at 0-based `epoch`."""
    if epoch < p.warmup_epochs:
        return p.warmup_lr
    return 0.5 * p.lr * (1 + math.cos(math.pi * epoch / p.epochs))


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's Gaussian weights over epochs 1..E (mean, std in epochs), normalised to sum 1."""
    g = [math.exp(-((e - mean) ** 2) / (2 * std ** 2)) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(g)
    return [x / total for x in g] if total > 0 else [1.0 / epochs] * epochs


def train_method(method: PromptMethod, bb: Backbone, items: list[Datum], ct: ClassText, p: PromptLearnParams,
                 seed: int, on_epoch: Callable[[dict], None] | None = None) -> list[dict[str, float]]:
    """Few-shot training of `method`'s learnable parts; returns one row of mean loss terms per epoch."""
    params = [q for q in method.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    rng = random.Random(seed)
    labels = torch.tensor([d.label for d in items])
    layers = method.vision_layers()
    cached = None if p.augment else encode_set(bb, items, layers, p, "encode train")
    images = [load_image(d) for d in items] if p.augment else None
    gpa = gpa_weights(p.epochs, p.gpa_mean * p.epochs, p.gpa_std * p.epochs) if (method.gpa and p.gpa) else None
    gpa_sum: dict[str, torch.Tensor] = {}
    rows = []
    for epoch in range(p.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, p)
        method.train()
        order = list(range(len(items)))
        rng.shuffle(order)
        sums: dict[str, float] = {}
        batches = range(0, len(order), p.batch_size)
        for s in _progress(batches, len(batches), f"epoch {epoch + 1}/{p.epochs}"):
            idx = order[s:s + p.batch_size]
            if cached is not None:
                vis = cached[torch.tensor(idx)]
            else:
                pixels = bb.preprocess([augment(images[i], rng) for i in idx]).to(_device(p))
                vis = vision_pass(bb, pixels, layers, p)
            terms = method.losses(vis, ct, labels[idx].to(_device(p)))
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **{k: v / len(items) for k, v in sums.items()}}
        rows.append(row)
        if on_epoch:
            on_epoch(row)
        if gpa is not None:
            for k, v in method.state_dict().items():
                gpa_sum[k] = gpa_sum.get(k, 0) + gpa[epoch] * v.detach().clone()
    if gpa is not None:
        method.load_state_dict(gpa_sum)
    return rows


# ---------------------------------------------------------------------------------------------------- runs
def run_dir(p: PromptLearnParams, method: str, dataset: str, seed: int) -> Path:
    return Path(p.out_dir) / p.protocol / method / dataset / f"seed{seed}"


def metrics_path(p: PromptLearnParams, method: str, dataset: str, seed: int) -> Path:
    return Path(p.metrics_dir) / p.protocol / method / dataset / f"seed{seed}.json"


class Runner:
    """Runs (method, dataset, seed) cells on one loaded backbone, caching splits and encoded test sets."""

    def __init__(self, p: PromptLearnParams, base_dir: str = ".", backbone: Backbone | None = None):
        self.p, self.base_dir = p, base_dir
        self.bb = (backbone or load_backbone(p.clip_path)).to(_device(p))
        self._splits: dict[str, Any] = {}
        self._encoded: dict[tuple, VisionOut] = {}

    def split(self, name: str):
        if name not in self._splits:
            self._splits[name] = read_split(self.p.data_root, name)
        return self._splits[name]

    def test_set(self, key: str, items: list[Datum], layers: tuple[int, ...]) -> tuple[VisionOut, torch.Tensor]:
        if (key, layers) not in self._encoded:
            self._encoded[(key, layers)] = encode_set(self.bb, items, layers, self.p, f"encode {key}")
        return self._encoded[(key, layers)], torch.tensor([d.label for d in items], device=_device(self.p))

    def acc(self, method: PromptMethod, key: str, items: list[Datum]) -> float:
        vis, labels = self.test_set(key, items, method.vision_layers())
        ct = class_text(self.bb, classnames_of(items), self.p.templates)
        return accuracy(method, vis, ct, labels, self.p.test_batch_size)

    def tracker(self, method: str, dataset: str, seed: int, run_id: str | None):
        from campe.core.tracking import Tracker
        p = self.p
        tp = SimpleNamespace(tracking_uri=p.tracking_uri, experiment=p.experiment, artifact_root=p.artifact_root,
                             method=method, run_name=f"prompt-learn/{p.protocol}/{method}/{dataset}/seed{seed}")
        return Tracker(tp, run_id=run_id, config_hash=run_hash(p), base_dir=self.base_dir)

    def checkpoint(self, name: str, dataset: str, seed: int) -> dict[str, torch.Tensor]:
        """The saved prompt learner of a cell; refused when missing or trained under another config."""
        p = self.p
        ckpt = run_dir(p, name, dataset, seed) / "prompt_learner.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: no checkpoint; run `campe prompt-learn train` first")
        saved = torch.load(ckpt, map_location=_device(p), weights_only=True)
        if saved.get("run_hash") != run_hash(p):
            raise ValueError(f"{ckpt}: trained under another prompt_learn config (hash {saved.get('run_hash')}, "
                             f"now {run_hash(p)}); restore those params or train again with --force")
        return saved["state"]

    def fit(self, name: str, dataset: str, seed: int, train: list[Datum], evaluate_only: bool, tracker) -> tuple:
        """The method trained on `train` (or loaded from its checkpoint) and its per-epoch rows."""
        p = self.p
        method = build_method(name, self.bb, p, seed + p.init_seed).to(_device(p))
        ckpt = run_dir(p, name, dataset, seed) / "prompt_learner.pt"
        rows: list[dict] = []
        if evaluate_only and method.trains:
            method.load_state_dict(self.checkpoint(name, dataset, seed))
        elif method.trains:
            ct = class_text(self.bb, classnames_of(train), p.templates)
            rows = train_method(method, self.bb, train, ct, p, seed, lambda r: tracker.log_metrics([
                {"step": r["epoch"], **{f"train/{k}": v for k, v in r.items() if k != "epoch"}}]))
            with atomic_file(ckpt) as f:
                torch.save({"run_hash": run_hash(p), "state": method.state_dict()}, f)
        return method, rows

    def run(self, name: str, dataset: str, seed: int, evaluate_only: bool = False) -> dict[str, Any]:
        """One cell: train (or load), evaluate, write the metrics JSON and log the MLflow run."""
        from campe.core.tracking import flatten_config
        p = self.p
        if evaluate_only and METHODS[name].trains:
            self.checkpoint(name, dataset, seed)  # refuse before the cell's MLflow run is touched
        out = run_dir(p, name, dataset, seed)
        id_file = out / "mlflow_run_id.txt"
        run_id = id_file.read_text().strip() if evaluate_only and id_file.is_file() else None
        tracker = self.tracker(name, dataset, seed, run_id)
        if run_id is None:
            tracker.log_params({**flatten_config(asdict(p)), "method": name, "dataset": dataset, "seed": seed})
            tracker.client.set_tag(tracker.run_id, "campe.stage", "prompt_learn")
            atomic_write_bytes(id_file, tracker.run_id.encode())
        try:
            t0 = time.perf_counter()
            row = (self._base2new if p.protocol == "base2new" else self._cross)(name, dataset, seed, evaluate_only,
                                                                               tracker)
            row.update(method=name, dataset=dataset, seed=seed, protocol=p.protocol, shots=p.shots,
                       run_hash=run_hash(p), mlflow_run_id=tracker.run_id, seconds=time.perf_counter() - t0)
            tracker.log_metrics([{"step": p.epochs, **{k: v for k, v in _flat_numbers(row).items()}}])
            atomic_write_json(metrics_path(p, name, dataset, seed), row)
            tracker.end("FINISHED")
            return row
        except BaseException:
            tracker.end("FAILED")
            raise

    def _base2new(self, name, dataset, seed, evaluate_only, tracker) -> dict[str, Any]:
        s = self.split(dataset)
        train, val = fewshot(s, self.p.shots, seed, self.p.fewshot_dir)
        base_train, _, base_test = subsample_classes(train, val, s.test, subsample="base")
        _, _, novel_test = subsample_classes(train, val, s.test, subsample="new")
        method, rows = self.fit(name, dataset, seed, base_train, evaluate_only, tracker)
        b = self.acc(method, f"{dataset}/test/base", base_test)
        n = self.acc(method, f"{dataset}/test/new", novel_test)
        return {"base_acc": b, "novel_acc": n, "hm": hm(b, n), "n_base_classes": len(classnames_of(base_test)),
                "n_novel_classes": len(classnames_of(novel_test)), "n_train": len(base_train),
                "final_train": rows[-1] if rows else {}}

    def _cross(self, name, dataset, seed, evaluate_only, tracker) -> dict[str, Any]:
        p = self.p
        s = self.split(dataset)
        train, val = fewshot(s, p.shots, seed, p.fewshot_dir)
        train, test = subsample_classes(train, s.test, subsample="all")
        method, rows = self.fit(name, dataset, seed, train, evaluate_only, tracker)
        row: dict[str, Any] = {"source_acc": self.acc(method, f"{dataset}/test/all", test), "xd": {}, "dg": {}}
        for t in p.xd_targets:
            (tt,) = subsample_classes(self.split(t).test, subsample="all")
            row["xd"][t] = self.acc(method, f"{t}/test/all", tt)
        for t in p.dg_targets:
            (tt,) = subsample_classes(self.split(t).test, subsample="all")
            if classnames_of(tt) != classnames_of(test):
                raise ValueError(f"{self.split(t).file}: a domain-generalisation target must have the source "
                                 f"{dataset!r}'s classes (same sorted labels and names); it has "
                                 f"{len(classnames_of(tt))} classes that differ (fix the split file or move it "
                                 f"to prompt_learn.xd_targets)")
            row["dg"][t] = self.acc(method, f"{t}/test/all", tt)
        row["xd_avg"] = sum(row["xd"].values()) / len(row["xd"]) if row["xd"] else float("nan")
        row["dg_avg"] = sum(row["dg"].values()) / len(row["dg"]) if row["dg"] else float("nan")
        row.update(n_classes=len(classnames_of(test)), n_train=len(train), final_train=rows[-1] if rows else {})
        return row


def _flat_numbers(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, dict) and k != "final_train":
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "shots"):
            out[f"{prefix}{k}"] = float(v)
    return out


def cells(p: PromptLearnParams) -> list[tuple[str, str, int]]:
    """(method, dataset, seed) of the section, in run order."""
    datasets = p.datasets if p.protocol == "base2new" else [p.source]
    return [(m, d, s) for d in datasets for m in p.methods for s in p.seeds]


def run_all(p: PromptLearnParams, base_dir: str = ".", evaluate_only: bool = False, force: bool = False,
            backbone: Backbone | None = None) -> list[dict[str, Any]]:
    """Every cell of the section (a cell whose metrics JSON has this config's hash is kept unless `force`), then
    the summary. One writer per output folder (campe.core.io.output_lock)."""
    from campe.core.io import output_lock

    with output_lock(p.out_dir, "campe prompt-learn", flag="prompt_learn.out_dir"):
        runner = None
        rows = []
        for m, d, s in cells(p):
            path = metrics_path(p, m, d, s)
            if not force and not evaluate_only and path.is_file():
                import json
                old = json.loads(path.read_text())
                if old.get("run_hash") == run_hash(p):
                    rows.append(old)
                    continue
            runner = runner or Runner(p, base_dir, backbone)
            rows.append(runner.run(m, d, s, evaluate_only))
        summarise(p)
        return rows


# ---------------------------------------------------------------------------------------------------- summary
def _read_rows(p: PromptLearnParams) -> dict[str, dict[str, list[dict]]]:
    """method -> dataset -> the per-seed metrics rows that exist."""
    import json
    out: dict[str, dict[str, list[dict]]] = {}
    for m, d, s in cells(p):
        path = metrics_path(p, m, d, s)
        if path.is_file():
            out.setdefault(m, {}).setdefault(d, []).append(json.loads(path.read_text()))
    return out


def summarise(p: PromptLearnParams) -> dict[str, Any]:
    """Seed means/stds per (method, dataset) and the protocol's averages -> <metrics_dir>/<protocol>/summary.json
    and summary.md (a table). base2new: B, N, HM per dataset and their dataset average (HM of the mean B and N).
    cross: source accuracy, each target, the cross-dataset average and the domain-generalisation average."""
    rows = _read_rows(p)
    summary: dict[str, Any] = {"protocol": p.protocol, "shots": p.shots, "methods": {}}
    lines = []
    if p.protocol == "base2new":
        # cells: mean ± std over the seeds; 95% CI: half-width of the t-interval of the mean (HM: of the per-seed HMs)
        lines += ["| method | dataset | base | novel | HM | base 95% CI | novel 95% CI | HM 95% CI | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, per in rows.items():
            per_ds = {d: seed_summary(r) for d, r in per.items()}
            summary["methods"][m] = {"datasets": per_ds, "average": dataset_average(per_ds)}
            for d, s in per_ds.items():
                lines.append(f"| {m} | {d} | {fmt_spread(s['base_acc'])} | {fmt_spread(s['novel_acc'])} | "
                             f"{s['hm']:.2f} | {fmt_ci(s['base_acc'])} | {fmt_ci(s['novel_acc'])} | "
                             f"{fmt_ci(s['hm_per_seed'])} | {len(s['seeds'])} |")
            a = summary["methods"][m]["average"]
            lines.append(f"| {m} | **average** | {a['base_acc']:.2f} | {a['novel_acc']:.2f} | {a['hm']:.2f} | | | | |")
    else:
        lines += ["| method | source | cross-dataset avg | DG avg | source 95% CI | cross-dataset 95% CI | DG 95% CI "
                  "| seeds |", "|---|---|---|---|---|---|---|---|"]
        for m, per in rows.items():
            for d, r in per.items():
                flat = [{"seed": x["seed"], "source_acc": x["source_acc"], "xd_avg": x["xd_avg"],
                         "dg_avg": x["dg_avg"], **{f"xd/{k}": v for k, v in x["xd"].items()},
                         **{f"dg/{k}": v for k, v in x["dg"].items()}} for x in r]
                keys = tuple(k for k in flat[0] if k != "seed")
                s = seed_summary(flat, keys)
                summary["methods"][m] = {d: s}
                ks = ("source_acc", "xd_avg", "dg_avg")
                lines.append(f"| {m} | {' | '.join(fmt_spread(s[k]) for k in ks)} | "
                             f"{' | '.join(fmt_ci(s[k]) for k in ks)} | {len(s['seeds'])} |")
    folder = Path(p.metrics_dir) / p.protocol
    atomic_write_json(folder / "summary.json", summary)
    atomic_write_bytes(folder / "summary.md", ("\n".join(lines) + "\n").encode())
    return summary
