"""The few-shot protocol of CoOp/CoCoOp/PromptSRC: CoOp-format splits, per-seed few-shot samples, base/novel
classes, and the metrics and averages the field reports.

    s = read_split("data/fewshot", "OxfordPets")        # <root>/oxford_pets/split_zhou_OxfordPets.json + images/
    train, val = fewshot(s, shots=16, seed=1, cache_dir="data/prompt_learning/split_fewshot")
    base_train, base_val, base_test = subsample_classes(train, val, s.test, subsample="base")
    hm(base_acc, novel_acc); seed_summary(rows); dataset_average(per_dataset)

The rules (as in CoOp's datasets/*.py and Dassl's DatasetBase): few-shot sampling per label in the order the labels
first appear, random.sample(items, K) (all items when a label has fewer) with random.seed(seed), train first and
then val with min(K, 4); base = the first ceil(n/2) of the sorted labels of the train split, novel = the rest, each
relabelled 0..m-1; novel accuracy is measured among the novel classes only; HM = 2BN/(B+N); a dataset's B and N
are the means over seeds and its HM is taken from those means, and so is the average over datasets.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campe.core.io import atomic_write_json, json_sha256

# CoOp's folder and image folder of the datasets it ships split_zhou files for (other names: <root>/<Name>/ with
# images/ if that folder exists, else the paths are relative to <root>/<Name>/).
KNOWN: dict[str, tuple[str, str]] = {
    "OxfordPets": ("oxford_pets", "images"), "Caltech101": ("caltech-101", "101_ObjectCategories"),
    "StanfordCars": ("stanford_cars", ""), "OxfordFlowers": ("oxford_flowers", "jpg"),
    "Food101": ("food-101", "images"), "SUN397": ("sun397", "SUN397"), "DescribableTextures": ("dtd", "images"),
    "EuroSAT": ("eurosat", "2750"), "UCF101": ("ucf101", "UCF-101-midframes"),
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Datum:
    impath: str  # absolute
    label: int
    classname: str


@dataclass
class Split:
    name: str
    file: Path
    image_dir: Path
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    sha256: str

    def classnames(self) -> list[str]:
        """Class names by label (labels 0..n-1 after relabelling; here: sorted labels)."""
        names = {d.label: d.classname for part in (self.train, self.val, self.test) for d in part}
        return [names[k] for k in sorted(names)]


def split_paths(root: str | Path, name: str) -> tuple[Path, Path]:
    """(split file, image folder) of dataset `name` under `root`."""
    folder, images = KNOWN.get(name, (name, None))
    base = Path(root) / folder
    if images is None:
        images = "images" if (base / "images").is_dir() else ""
    return base / f"split_zhou_{name}.json", base / images


_FORMAT = ('{"train": [["<image path relative to the image folder>", <label>, "<class name>"], ...], "val": [...], '
           '"test": [...]}')


def read_split(root: str | Path, name: str) -> Split:
    """Read and check a CoOp split file. Errors name the file, the entry and the fix."""
    file, image_dir = split_paths(root, name)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: split file not found; dataset {name!r} needs CoOp's split_zhou_{name}.json "
                                f"there (set prompt_learn.data_root, or the dataset name)")
    raw = file.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e}); expected {_FORMAT}") from None
    if not isinstance(data, dict) or any(k not in data or not isinstance(data[k], list) for k in SPLITS):
        raise ValueError(f"{file}: expected an object with lists 'train', 'val' and 'test': {_FORMAT}")
    parts: dict[str, list[Datum]] = {}
    names: dict[int, tuple[str, str]] = {}
    for part in SPLITS:
        items = []
        for i, item in enumerate(data[part]):
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or isinstance(item[1], bool) or not isinstance(item[2], str)):
                raise ValueError(f"{file}: {part}[{i}] is {item!r}; each entry must be [image path, integer label, "
                                 f"class name]")
            path, label, cname = item
            seen = names.setdefault(label, (cname, f"{part}[{i}]"))
            if seen[0] != cname:
                raise ValueError(f"{file}: label {label} is class {seen[0]!r} at {seen[1]} but {cname!r} at "
                                 f"{part}[{i}]; each label needs one class name throughout the file (fix the file)")
            items.append(Datum(str(image_dir / path), label, cname))
        parts[part] = items
    if not parts["test"]:
        raise ValueError(f"{file}: the test list is empty; every dataset needs test images")
    return Split(name, file, image_dir, parts["train"], parts["val"], parts["test"],
                 json_sha256(data))


def by_label(items: list[Datum]) -> dict[int, list[Datum]]:
    """Items grouped by label, labels in order of first appearance (Dassl's split_dataset_by_label)."""
    out: dict[int, list[Datum]] = {}
    for d in items:
        out.setdefault(d.label, []).append(d)
    return out


def sample_fewshot(items: list[Datum], shots: int, rng: random.Random) -> list[Datum]:
    """Dassl's generate_fewshot_dataset (repeat=False): K per label, all of a label that has fewer."""
    out: list[Datum] = []
    for group in by_label(items).values():
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


def fewshot(split: Split, shots: int, seed: int, cache_dir: str | Path | None = None) -> tuple[list[Datum], list[Datum]]:
    """The seed's few-shot train (K per class) and val (min(K, 4) per class), cached as
    <cache_dir>/<Name>/shot_K-seed_S.json (a cache made from another version of the split file is remade)."""
    if not split.train:
        raise ValueError(f"{split.file}: the train list is empty, so this set can only be a test target (a "
                         f"shifted set: put it in prompt_learn.dg_targets), not a dataset to train on")
    cache = Path(cache_dir) / split.name / f"shot_{shots}-seed_{seed}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("split_sha256") == split.sha256:
                return ([Datum(*d) for d in data["train"]], [Datum(*d) for d in data["val"]])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: sample again and overwrite
    rng = random.Random(seed)
    train = sample_fewshot(split.train, shots, rng)
    val = sample_fewshot(split.val, min(shots, 4), rng)
    if cache is not None:
        atomic_write_json(cache, {"split_file": str(split.file), "split_sha256": split.sha256, "shots": shots,
                                  "seed": seed, "train": [[d.impath, d.label, d.classname] for d in train],
                                  "val": [[d.impath, d.label, d.classname] for d in val]})
    return train, val


def subsample_classes(*parts: list[Datum], subsample: str = "all") -> list[list[Datum]]:
    """CoOp's subsample_classes: labels of the first part sorted; base = the first ceil(n/2), new = the rest
    ("all" keeps every class); the kept labels are renumbered 0..m-1 in sorted order in every part."""
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be all, base or new, got {subsample!r}")
    labels = sorted({d.label for d in parts[0]})
    m = math.ceil(len(labels) / 2)
    keep = labels if subsample == "all" else labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(keep)}
    return [[Datum(d.impath, relabel[d.label], d.classname) for d in part if d.label in relabel] for part in parts]


def classnames_of(items: list[Datum]) -> list[str]:
    names = {d.label: d.classname for d in items}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"labels {sorted(names)} are not 0..{len(names) - 1} (relabel with subsample_classes)")
    return [names[k] for k in range(len(names))]


# ---------------------------------------------------------------------------------------------------- metrics
def hm(base: float, novel: float) -> float:
    """Harmonic mean of base and novel accuracy (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


# Student's t, 97.5th percentile, by degrees of freedom (the 95% interval of a mean over few seeds)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _spread(xs: list[float]) -> dict[str, float | None]:
    """mean, sample std, n and the half-width of the 95% t-interval of the mean. With one value the std and the
    interval are undefined: None (null in JSON, an empty CSV field, "n/a" in Markdown), never 0."""
    n = len(xs)
    std = statistics.stdev(xs) if n > 1 else None
    ci = _T975.get(n - 1, 1.96) * std / math.sqrt(n) if std is not None else None
    return {"mean": statistics.fmean(xs), "std": std, "n": n, "ci95": ci}


def fmt_spread(s: dict[str, Any], digits: int = 2, ci: bool = False) -> str:
    """A _spread as Markdown: "mean ± std" (ci: "mean ± std [±ci95]"); one seed: the mean alone ("n/a" spread)."""
    if s["std"] is None:
        return f"{s['mean']:.{digits}f} ± n/a"
    text = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{text} [±{s['ci95']:.{digits}f}]" if ci else text


def fmt_ci(s: dict[str, Any], digits: int = 2) -> str:
    """The half-width of a _spread's 95% t-interval as Markdown ("±x"; "n/a" for one seed)."""
    return "n/a" if s["ci95"] is None else f"±{s['ci95']:.{digits}f}"


def seed_summary(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("base_acc", "novel_acc")) -> dict[str, Any]:
    """Per-seed rows of one (method, dataset) -> mean/std/n of each key over the seeds; with base and novel, the HM
    of the mean B and N (parse_test_res) and the spread of the per-seed HMs."""
    out: dict[str, Any] = {k: _spread([float(r[k]) for r in rows]) for k in keys}
    if "base_acc" in keys and "novel_acc" in keys:
        out["hm"] = hm(out["base_acc"]["mean"], out["novel_acc"]["mean"])
        out["hm_per_seed"] = _spread([hm(float(r["base_acc"]), float(r["novel_acc"])) for r in rows])
    out["seeds"] = sorted(int(r["seed"]) for r in rows)
    return out


def dataset_average(per_dataset: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{dataset: seed_summary} -> the average the field reports: mean of the datasets' B and N, HM of those."""
    b = statistics.fmean(s["base_acc"]["mean"] for s in per_dataset.values())
    n = statistics.fmean(s["novel_acc"]["mean"] for s in per_dataset.values())
    return {"base_acc": b, "novel_acc": n, "hm": hm(b, n), "datasets": len(per_dataset)}
