"""`campe ablate`: the ablation table in one command (methods x contrastive kinds x seeds, mean +- std).

    campe ablate                                    # params.yaml: section `ablate` + the stage sections
    campe ablate --seeds 0 1 2 --epochs 1           # override the grid's schedule / seeds
    campe ablate --methods vanilla multi_prompt     # a sub-grid
    campe ablate --table-only                       # (re)write the table from the cells finished so far
    make ablate-scratch                             # the from-scratch protocol's key variants (the command in Makefile)

The grid: every method in `ablate.methods` with the contrastive kind `ablate.kinds[0]`, and the methods in
`ablate.all_kinds_for` also with every other kind (the issue's "sigmoid vs softmax" on the full method), each over
`ablate.seeds`. A cell is one (method, kind, seed):

    1. the frozen-LM cache it needs (stages.cache.run_stage), built once per distinct text-encoder layout under
       <root>/caches/<pooling>[-neg]-<hash>: multi_prompt and multi_prompt_div share one (same layout); the
       negation variant needs its own, because the train loop refuses a cache whose manifest `negation` differs
       (campe.text.cache_manifest.MANIFEST_COMPARED); mean / last_token / single_prompt / defo one each; vanilla none;
       mean_lora none either (LoRA changes every LM layer, so it trains online: train.cache_dir '').
    2. training (campe.train.loop.train) into <root>/<name>/<method>-<kind>/seed<seed>, with train.seed,
       model.init_seed and text_encoder.init_seed all = the seed (a seed changes the init, the data order and
       dropout), the grid's steps/epochs, and nothing else changed: every method gets the same data, steps, lr,
       batch and seeds (no per-method tuning). The MLflow run (made by the train loop, in `ablate.experiment`) is
       named <name>/<method>-<kind>/seed<seed> and tagged ablation=<name>, ablation_cell, seed, loss_kind.
    3. evaluation (stages.evaluate.run_stage) on the generated test split: the `evaluate` section's image sets,
       video sets and zero-shot, as picked by `ablate.eval_sets`; metrics JSONs in the cell's eval/ folder, also
       logged into the cell's MLflow run. The frozen LM's states of the eval and val captions are computed by the
       first cell of a text layout and looked up by the others (campe.text.frozen_memo; the same tensors).
    4. <cell>/cell.json (written last, atomically) marks the cell finished; after every cell the table is rewritten
       from all finished cells by stages/ablate_table.py: `ablate.table_md` (Markdown) and `ablate.table_csv` (long
       CSV: variant, method, kind, dataset, metric, mean, std, n, seeds). std is the sample standard deviation
       (n - 1); empty for n = 1.
       `ablate.plot` shows the headline metrics per variant: mean bar, std error bar and every seed as a dot;
       beside it, <stem>_aspects.png (text -> image recall by the query caption's aspect mix) and
       <stem>_specialisation.png (per variant with prompt segments, the K x aspect specialisation matrix), with the
       Markdown tables of both and of the aspect re-weighting under each retrieval set's table.

Resumable: a finished cell (cell.json whose config hash matches) is skipped; a cell killed during training
continues from its checkpoint (train(resume=True), exact on CPU); killed during evaluation, it re-evaluates; caches
skip their finished shards. A finished cell whose config differs from the current params is an error (naming the
cell): use another `ablate.name` or delete that folder; results of two configs are never mixed in one table.

Why direct stage calls and not `dvc exp run --queue`: a queued DVC experiment runs the whole pipeline in its own
temp copy of the workspace, so every experiment re-runs the cache stage for its layout (6 layouts, 27 cells: 27
caches instead of 6), copies the shards per experiment, needs a clean git tree, and its results come back as git
refs to be parsed from `dvc exp show`; a killed queue loses the running experiments. Calling the same stage
functions in one process shares the caches by layout, resumes cell by cell and writes the table directly. The
relation to DVC: the ablation reads the outputs of the DVC pipeline (`data/shards/train` from `download`,
`data/generated` from `generate`, so run `dvc repro download` or `make repro` first) and uses the same params
sections as the stages (the `ablate` section on top); each cell's train_config.json records the resolved config
and its hash, like the train stage. It is deliberately not a stage of dvc.yaml: `dvc repro` must stay a
10-minute laptop run, and the grid costs ~27x a training run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from campe.core.config import ConfigError, from_dict
from campe.train.run_config import TRAIN_SECTIONS
from campe.core.io import atomic_write_json, json_sha256, output_lock, store_uri
from campe.text.frozen_memo import memoize_frozen_states

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "the ablation table: methods x softmax/sigmoid x seeds, mean ± std (resumable)"

ALL_METHODS = ["vanilla", "mean", "mean_lora", "last_token", "single_prompt", "defo", "multi_prompt",
               "multi_prompt_div", "multi_prompt_div_neg"]
KINDS = ("softmax", "sigmoid")
EVAL_SETS = ("image", "video", "zero_shot")
SECTIONS = (*TRAIN_SECTIONS, "cache", "evaluate")
CELL_FILE = "cell.json"
# The frozen LM's states of the eval/val captions, kept across cells (campe.text.frozen_memo): the cells of one text
# layout evaluate the same captions with the same frozen layers. ~0.1-0.8 GB per layout for the default sets.
GRID_MEMO_BYTES = 6 << 30
FIDELITY_SET = "text_fidelity"  # the table section of the prompt diagnostics (can the K prompts differ at all?)


@dataclass
class AblateParams:
    """params.yaml section `ablate`."""
    name: str = "default"  # MLflow tag ablation=<name>; cells live in <root>/<name>
    root: str = "data/ablation"  # cells under <root>/<name>/, caches (shared by all names) under <root>/caches/
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))  # rows, run with kinds[0]
    kinds: list[str] = field(default_factory=lambda: ["softmax", "sigmoid"])  # loss.kind; the first is the default
    all_kinds_for: list[str] = field(default_factory=lambda: ["multi_prompt_div_neg"])  # also run with kinds[1:]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 0  # optimizer steps of every cell; 0 = use epochs
    epochs: int = 1  # epochs of every cell when steps is 0; 0 (with steps 0) = the train section's schedule
    eval_sets: list[str] = field(default_factory=lambda: ["image", "video", "zero_shot"])  # of the evaluate section
    experiment: str = "campe-ablation"  # MLflow experiment of the cells ("" = the train section's)
    table_md: str = "metrics/ablation.md"
    table_csv: str = "metrics/ablation.csv"
    plot: str = "plots/ablation.png"  # per-seed values, mean and std of the headline metrics ("" = no picture)
    image_tower: str = ""  # every cell's train.image_tower ("" = the train section's): scratch | locked
    patience: int = 0  # every cell's train.patience (early stopping on the val loss; 0 = the train section's)
    schedule_epochs: int = 0  # every cell's train.schedule_epochs (the cosine decay's length; 0 = the train section's)
    axes: dict[str, list[int | str]] = field(default_factory=dict)  # text_encoder field -> values, for
    # axis_methods: e.g. {k: [1, 2, 4, 6, 8], trainable_layers: [1, 2]}; one cell per (method, field, value, seed)
    axis_methods: list[str] = field(default_factory=lambda: ["multi_prompt"])
    axis_methods_for: dict[str, list[str]] = field(default_factory=dict)  # axis -> its methods instead of
    # axis_methods, e.g. {trainable_layers: [multi_prompt, mean]}: a control for one axis without K cells for mean
    axis_seeds: list[int] = field(default_factory=list)  # seeds of the axis cells ([] = seeds)
    references: list[str] = field(default_factory=lambda: ["mean", "vanilla"])  # paired differences against
    # these methods (kinds[0], the same seed: same initialisation and data order)
    keep_in_memory: bool = False  # every cell's train.keep_in_memory (runtime: the same batches, not in the hash)

    def validate(self) -> None:
        for m in self.methods + self.all_kinds_for:
            if m not in ALL_METHODS:
                raise ValueError(f"method '{m}' is not one of: {', '.join(ALL_METHODS)}")
        bad = [m for m in self.all_kinds_for if m not in self.methods]
        if bad:
            raise ValueError(f"all_kinds_for names {bad} which are not in methods {self.methods}")
        if not self.methods:
            raise ValueError("methods is empty: name at least one of " + ", ".join(ALL_METHODS))
        if not self.kinds or any(k not in KINDS for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds {self.kinds} must be distinct values of: {', '.join(KINDS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds {self.seeds} must be distinct integers >= 0")
        if self.steps < 0 or self.epochs < 0:
            raise ValueError(f"steps and epochs must be >= 0 (0 = not set), got {self.steps}, {self.epochs}")
        if not self.eval_sets or any(s not in EVAL_SETS for s in self.eval_sets):
            raise ValueError(f"eval_sets {self.eval_sets} must be values of: {', '.join(EVAL_SETS)}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name {self.name!r} must be a non-empty folder name")
        if self.image_tower not in ("", "scratch", "locked"):
            raise ValueError(f"image_tower '{self.image_tower}' is not one of: scratch, locked (or \"\")")
        if self.patience < 0 or self.schedule_epochs < 0:
            raise ValueError(f"patience and schedule_epochs must be >= 0, got {self.patience}, {self.schedule_epochs}")
        self._validate_axes()

    @property
    def all_axis_methods(self) -> list[str]:
        """Every method some axis runs (axis_methods, then those only axis_methods_for names), in that order."""
        return list(dict.fromkeys(self.axis_methods + [m for ms in self.axis_methods_for.values() for m in ms]))

    def _validate_axes(self) -> None:
        from campe.text.multiprompt import MultiPromptConfig
        fields = {f.name for f in dataclasses.fields(MultiPromptConfig)} - {"pooling", "negation", "init_seed",
                                                                             "embed_dim", "model_path", "lora"}
        for name, values in self.axes.items():
            if name not in fields:
                raise ValueError(f"axes: '{name}' is not a text_encoder field an axis can vary; one of: "
                                 f"{', '.join(sorted(fields))}")
            if not values or len(set(map(str, values))) != len(values):
                raise ValueError(f"axes.{name}: {values} must be distinct values")
        stray = [a for a in self.axis_methods_for if a not in self.axes]
        if stray:
            raise ValueError(f"axis_methods_for names {stray}, which are not axes (axes: {list(self.axes)})")
        if any(not ms for ms in self.axis_methods_for.values()):
            raise ValueError(f"axis_methods_for: {self.axis_methods_for} gives an axis no methods; leave it out "
                             f"to use axis_methods")
        used = self.all_axis_methods
        bad = [m for m in used + self.references if m not in ALL_METHODS]
        if bad or "vanilla" in used:
            raise ValueError(f"axis_methods(_for) / references name {bad or ['vanilla']}: use LM methods of "
                             f"{', '.join(ALL_METHODS[1:])} for axes, and methods of the grid as references")
        if len(set(self.axis_seeds)) != len(self.axis_seeds) or min(self.axis_seeds, default=0) < 0:
            raise ValueError(f"axis_seeds {self.axis_seeds} must be distinct integers >= 0")


@dataclass(frozen=True)
class Cell:
    method: str
    kind: str
    seed: int
    axis: str = ""  # a text_encoder field this cell sets (an axis cell), "" for the main grid
    value: Any = None

    @property
    def variant(self) -> str:
        return f"{self.method}-{self.kind}" + (f"-{self.axis}={self.value}" if self.axis else "")


def grid(ap: AblateParams) -> list[Cell]:
    """Seed-major order: a stopped ablation has every variant on its first seeds rather than all seeds of a few.
    The main grid first, then the axis cells (each axis's methods x its values x axis_seeds, kinds[0]; an axis's
    methods are axis_methods_for[axis], else axis_methods)."""
    variants = [(m, ap.kinds[0]) for m in ap.methods]
    variants += [(m, k) for m in ap.methods if m in ap.all_kinds_for for k in ap.kinds[1:]]
    cells = [Cell(m, k, s) for s in ap.seeds for m, k in variants]
    cells += [Cell(m, ap.kinds[0], s, axis, v) for s in (ap.axis_seeds or ap.seeds) for m in ap.all_axis_methods
              for axis, values in ap.axes.items() if m in ap.axis_methods_for.get(axis, ap.axis_methods)
              for v in values]
    return cells


def variants_of(ap: AblateParams) -> list[str]:
    seen: dict[str, None] = {}
    for c in grid(ap):
        seen.setdefault(c.variant)
    return list(seen)


# ------------------------------------------------------------------------------------------------ one cell

def cell_dir(ap: AblateParams, cell: Cell) -> Path:
    return Path(ap.root) / ap.name / cell.variant / f"seed{cell.seed}"


def cell_sections(ap: AblateParams, base: dict[str, dict], cell: Cell) -> dict[str, dict]:
    """The four training sections of a cell: the base params with only method, kind, seed and schedule changed."""
    from campe.train.run_config import METHODS
    s = {k: dict(base.get(k) or {}) for k in TRAIN_SECTIONS}
    te = METHODS[cell.method]["text_encoder"]
    if te is not None:
        s["text_encoder"].update(te)  # the cache is built from this section as written (the run config checks it)
    if s["text_encoder"].get("lora"):  # LoRA changes every LM layer: it trains online, no cache is built for it
        s["train"]["cache_dir"] = ""
    if cell.axis:
        s["text_encoder"][cell.axis] = cell.value
    s["text_encoder"]["init_seed"] = cell.seed
    s["model"]["init_seed"] = cell.seed
    s["loss"]["kind"] = cell.kind
    t = s["train"]
    t.update(method=cell.method, seed=cell.seed, out_dir=str(cell_dir(ap, cell)), metrics_file="",
             run_name=f"{ap.name}/{cell.variant}/seed{cell.seed}")
    if ap.steps:
        t.update(steps=ap.steps)
    elif ap.epochs:
        t.update(steps=0, epochs=ap.epochs)
    if ap.experiment:
        t["experiment"] = ap.experiment
    if ap.image_tower:
        t["image_tower"] = ap.image_tower
    if ap.patience:
        t["patience"] = ap.patience
    if ap.schedule_epochs:
        t["schedule_epochs"] = ap.schedule_epochs
    if ap.keep_in_memory:
        t["keep_in_memory"] = True
    t["image_features_dir"] = str(Path(ap.root) / "caches" / "image_features")  # content-addressed: shared
    return s


def layout_key(text_encoder: Any) -> str:
    """Folder name of the cache a text-encoder config needs: cells with the same frozen-state layout share it."""
    d = dataclasses.asdict(text_encoder)
    d.pop("init_seed")  # APT and head init: not in the cached frozen states (nor is D, model.embed_dim)
    for k in ("apt_entry", "apt_init_noise"):  # where the APT enters and its init: not in the frozen states either
        d.pop(k)
    for k in ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"):  # LoRA trains online: never cached
        d.pop(k)
    if d["apt_placeholder"] == "shared":  # the default: the key a cache folder had before the switch existed
        d.pop("apt_placeholder")
    h = json_sha256(d)[:8]
    return f"{d['pooling']}{'-neg' if d['negation'] else ''}-{h}"


def _eval_params(ap: AblateParams, base: dict[str, dict], out: Path, where: str):
    from stages.evaluate import EvaluateParams
    e = dict(base.get("evaluate") or {})
    e.update(checkpoint=str(out), metrics_dir=str(out / "eval"), plots_dir=str(out / "plots"))
    if "image" not in ap.eval_sets:
        e["image_sets"] = {}
    if "video" not in ap.eval_sets:
        e["video_sets"] = {}
    if "zero_shot" not in ap.eval_sets:
        e["zero_shot_root"] = ""
    p = from_dict(EvaluateParams, e, f"{where}:evaluate")
    return p


def _fidelity(out: Path) -> dict[str, float]:
    """The trained cell's prompt diagnostics (campe.text.diagnostics, in its metrics.json); {} without prompts."""
    from campe.text.diagnostics import DIAGNOSTICS
    path = out / "metrics.json"
    m = json.loads(path.read_text()) if path.exists() else {}
    return {k: m[k] for k in DIAGNOSTICS if k in m}


def _eval_device(train_device: str) -> str:
    import torch
    if train_device == "cuda" or (train_device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def run_cell(ap: AblateParams, base: dict[str, dict], cell: Cell, where: str, caches_done: set[str],
             log: Callable[[str], None]) -> dict[str, Any]:
    """Cache (if needed), train, evaluate one cell; returns its record (also written to <cell>/cell.json)."""
    from campe.train.run_config import resolve_run_config
    from stages.evaluate import eval_params_hash, run_stage

    out = cell_dir(ap, cell)
    cfg = resolve_run_config(cell_sections(ap, base, cell), where)
    cfg.base_dir = os.path.dirname(os.path.abspath(where)) if os.path.isfile(where) else ""  # the params file's
    ep = _eval_params(ap, base, out, where)
    config_hash = f"{cfg.hash(runtime=False)}-{eval_params_hash(dataclasses.replace(ep, checkpoint=''))}"
    finished = _finished_record(out, config_hash)
    if finished is not None:
        return finished
    timings: dict[str, float] = {}
    _ensure_caches(ap, base, cfg, ep, where, caches_done, timings, log)
    steps = _train_cell(cfg, out, timings)
    run_id = _tag_mlflow_run(ap, cell, cfg, out)
    t0 = time.perf_counter()
    results = run_stage(ep, device=_eval_device(cfg.train.device), base_dir=cfg.base_dir or None)
    timings["eval_s"] = round(time.perf_counter() - t0, 1)
    rec = {"variant": cell.variant, "method": cell.method, "kind": cell.kind, "seed": cell.seed,
           "axis": cell.axis, "value": cell.value,
           "config_hash": config_hash, "steps": steps, "mlflow_run_id": run_id, "timings": timings,
           "metrics_files": {name: str(Path(ep.metrics_dir) / f"{name}.json") for name in results},
           "metrics": {name: r["record"]["metrics"] for name, r in results.items()}}
    fidelity = _fidelity(out)
    if fidelity:
        rec["metrics"][FIDELITY_SET] = fidelity
    rec["metrics"]["training"] = _training_record(out, steps)
    atomic_write_json(out / CELL_FILE, rec)
    return rec


def _finished_record(out: Path, config_hash: str) -> dict[str, Any] | None:
    """The cell's record marked skipped when it was finished with this config; None when it is not finished; an
    error when it was finished with other params (results of two configs are never mixed)."""
    record_path = out / CELL_FILE
    if not record_path.exists():
        return None
    rec = json.loads(record_path.read_text())
    if rec.get("config_hash") != config_hash:
        raise ConfigError(f"{record_path}: this cell was finished with other params (hash {rec.get('config_hash')}"
                          f", now {config_hash}); set another ablate.name or delete {out} to redo it")
    rec["skipped"] = True
    return rec


def _ensure_caches(ap: AblateParams, base: dict[str, dict], cfg: Any, ep: Any, where: str, caches_done: set[str],
                   timings: dict[str, float], log: Callable[[str], None]) -> None:
    """The frozen-LM cache of the cell's layout (LM methods that train from a cache; points cfg.train.cache_dir at
    it) and, for the locked image tower, the shared feature cache: each built once per process."""
    if cfg.text_encoder is not None and cfg.train.cache_dir:
        from stages.cache import CacheParams, run_stage as cache_stage
        cache_out = Path(ap.root) / "caches" / layout_key(cfg.text_encoder)
        cfg.train.cache_dir = str(cache_out)
        if str(cache_out) not in caches_done:  # once per process: a re-run skips its finished shards anyway
            t0 = time.perf_counter()
            cp = from_dict(CacheParams, {**(base.get("cache") or {}), "shards_dir": cfg.train.shards_dir,
                                         "output_dir": str(cache_out)}, f"{where}:cache")
            summary = cache_stage(cp, cfg.text_encoder, embed_dim=cfg.model.embed_dim, on_mismatch="rebuild")
            caches_done.add(str(cache_out))
            timings["cache_s"] = round(time.perf_counter() - t0, 1)
            log(f"  cache {cache_out.name}: {summary['shards_written']} shards written, "
                f"{summary['shards_skipped']} reused ({timings['cache_s']} s)")
    if cfg.train.image_tower == "locked" and "image_features" not in caches_done:
        t0 = time.perf_counter()
        _locked_features(cfg, ep)
        caches_done.add("image_features")
        timings["features_s"] = round(time.perf_counter() - t0, 1)


def _train_cell(cfg: Any, out: Path, timings: dict[str, float]) -> int | None:
    """Train the cell (resuming a killed one from its checkpoint) unless its final model is there; -> its steps."""
    from campe.train.checkpoint import FINAL
    from campe.train.loop import train
    t0 = time.perf_counter()
    trained = (out / FINAL).exists() and (out / "train_config.json").exists() and json.loads(
        (out / "train_config.json").read_text()).get("resume_hash") == cfg.hash(runtime=False)
    if not trained:  # resume=True: a cell killed mid-training continues from its last checkpoint
        summary = train(cfg, resume=True)
        timings["train_s"] = round(time.perf_counter() - t0, 1)
        return summary["step"]
    return json.loads((out / "metrics.json").read_text())["steps"] if (out / "metrics.json").exists() else None


def _tag_mlflow_run(ap: AblateParams, cell: Cell, cfg: Any, out: Path) -> str | None:
    """Tag the cell's MLflow run (made by the train loop) with the ablation, the cell, seed and loss kind."""
    from campe.train.checkpoint import RUN_ID_FILE
    run_id = (out / RUN_ID_FILE).read_text().strip() if (out / RUN_ID_FILE).exists() else None
    if run_id and cfg.train.tracking_uri:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=store_uri(cfg.train.tracking_uri, cfg.base_dir or None))
        for k, v in {"ablation": ap.name, "ablation_cell": cell.variant, "seed": str(cell.seed),
                     "loss_kind": cell.kind}.items():
            client.set_tag(run_id, k, v)
    return run_id


def _locked_features(cfg: Any, ep: Any) -> None:
    """The locked backbone's features of the train shards, the val split and the evaluated image sets, once for the
    whole ablation (the cells then only read them; content-addressed, so every cell shares them)."""
    from campe.locked import LockedImageTower, build_feature_cache
    from campe.towers import VisionConfig
    tower = LockedImageTower(VisionConfig(image_size=cfg.model.image_size), embed_dim=cfg.model.embed_dim)
    sets = list(dict.fromkeys([*(ep.image_sets.values()), *([cfg.train.val_set] if cfg.train.patience else [])]))
    build_feature_cache(cfg.train.image_features_dir, tower, shards_dir=cfg.train.shards_dir)
    for ann in sets:
        build_feature_cache(cfg.train.image_features_dir, tower, karpathy_json=ann,
                            splits=(ep.karpathy_split, "val"))


def _training_record(out: Path, steps: int | None) -> dict[str, float]:
    """The cell's schedule as reached: steps, epochs run, best epoch, stopped early (early stopping)."""
    m = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    rec = {"steps": float(m.get("steps", steps or 0))}
    for k in ("epochs_run", "best_epoch", "best_val_loss"):
        if k in m:
            rec[k] = float(m[k])
    if "stopped_early" in m:
        rec["stopped_early"] = float(bool(m["stopped_early"]))
    return rec


def finished_records(ap: AblateParams) -> list[dict[str, Any]]:
    """cell.json of every finished cell of the grid (grid order)."""
    out = []
    for c in grid(ap):
        p = cell_dir(ap, c) / CELL_FILE
        if p.exists():
            out.append(json.loads(p.read_text()))
    return out


# ------------------------------------------------------------------------------------------------ driver

def run_ablation(ap: AblateParams, base: dict[str, dict], where: str = "params",
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the grid with the base stage sections `base` (text_encoder, model, loss, train, cache,
    evaluate); rewrite the tables after each cell. Returns {"cells", "ran", "skipped", "rows", "seconds"}."""
    ap.validate()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    unknown = set(base) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)} for the ablation; expected {SECTIONS}")
    with output_lock(ap.root, "campe ablate", flag="--root"):  # its cells and caches: one ablation at a time
        return _run_grid(ap, base, where, log)


def _run_grid(ap: AblateParams, base: dict[str, dict], where: str, log: Callable[[str], None]) -> dict[str, Any]:
    from stages.ablate_table import write_tables
    cells = grid(ap)
    caches_done: set[str] = set()
    ran = skipped = 0
    t_all = time.perf_counter()
    with memoize_frozen_states(max_bytes=GRID_MEMO_BYTES) as memo:
        for i, cell in enumerate(cells, 1):
            head = f"[{i}/{len(cells)}] {cell.variant} seed {cell.seed}"
            t0 = time.perf_counter()
            rec = run_cell(ap, base, cell, where, caches_done, log=lambda s: log(f"{head}{s}"))
            if rec.get("skipped"):
                skipped += 1
                log(f"{head}: finished earlier, skipped")
                continue
            ran += 1
            first = next(iter(rec["metrics"].values()), {})
            shown = ", ".join(f"{k}={first[k]:.1f}" for k in ("i2t_R@1", "t2i_R@1", "rsum") if k in first)
            log(f"{head}: {shown} ({time.perf_counter() - t0:.0f} s: {rec['timings']}; frozen text states "
                f"reused {memo.hits}, computed {memo.misses})")
            write_tables(ap)
    rows = write_tables(ap)
    return {"cells": len(cells), "ran": ran, "skipped": skipped, "rows": rows,
            "seconds": round(time.perf_counter() - t_all, 1)}


def load_sections(path: str) -> tuple[dict[str, Any], dict[str, dict]]:
    """(the ablate section, the stage sections it builds cells from); the whole file is checked first."""
    from stages.params import check_params  # stages.params imports this module

    data = check_params(path)
    return dict(data.get("ablate") or {}), {k: dict(data.get(k) or {}) for k in SECTIONS}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default="params.yaml", help="params file (section `ablate` + the stage sections)")
    ap.add_argument("--name", help="override ablate.name (a new name = a new set of cells)")
    ap.add_argument("--root", help="override ablate.root")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="override ablate.methods")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, help="override ablate.kinds (the first is every method's)")
    ap.add_argument("--no-axes", action="store_true", help="no axis cells (ablate.axes = {}, axis_methods_for = {})")
    ap.add_argument("--seeds", nargs="+", type=int, help="override ablate.seeds")
    ap.add_argument("--steps", type=int, help="override ablate.steps (every cell)")
    ap.add_argument("--epochs", type=int, help="override ablate.epochs (every cell, when steps is 0)")
    ap.add_argument("--eval-sets", nargs="+", choices=EVAL_SETS, help="override ablate.eval_sets")
    ap.add_argument("--table-md", help="override ablate.table_md")
    ap.add_argument("--table-csv", help="override ablate.table_csv")
    ap.add_argument("--plot", help="override ablate.plot (\"\" = no picture)")
    ap.add_argument("--image-tower", choices=["scratch", "locked"], help="override ablate.image_tower")
    ap.add_argument("--patience", type=int, help="override ablate.patience (early stopping of every cell)")
    ap.add_argument("--schedule-epochs", type=int, help="override ablate.schedule_epochs (every cell's cosine decay "
                                                        "length in epochs; the lr then stays at its floor)")
    ap.add_argument("--table-only", action="store_true", help="only (re)write the table from the finished cells")


def params_from_args(args: argparse.Namespace) -> tuple[AblateParams, dict[str, dict]]:
    """(the ablate section with the command line's overrides, the stage sections) from `add_arguments`' args."""
    raw, base = load_sections(args.params)
    over = {k: v for k, v in {"name": args.name, "root": args.root, "methods": args.methods, "seeds": args.seeds,
                              "steps": args.steps, "epochs": args.epochs, "eval_sets": args.eval_sets,
                              "table_md": args.table_md, "table_csv": args.table_csv, "plot": args.plot,
                              "image_tower": args.image_tower, "patience": args.patience,
                              "schedule_epochs": args.schedule_epochs,
                              "kinds": args.kinds, "axes": {} if args.no_axes else None,
                              "axis_methods_for": {} if args.no_axes else None}.items()
            if v is not None}
    if args.methods is not None and "all_kinds_for" not in over:
        over["all_kinds_for"] = [m for m in raw.get("all_kinds_for", AblateParams().all_kinds_for)
                                 if m in args.methods]
    return from_dict(AblateParams, {**raw, **over}, f"{args.params}:ablate"), base


def run(args: argparse.Namespace) -> int:
    ap, base = params_from_args(args)
    if args.table_only:
        from stages.ablate_table import write_tables
        ap.validate()
        rows = write_tables(ap)
        print(json.dumps({"rows": len(rows), "table_md": ap.table_md, "table_csv": ap.table_csv, "plot": ap.plot}))
        return 0
    out = run_ablation(ap, base, str(args.params))
    print(json.dumps({k: out[k] for k in ("cells", "ran", "skipped", "seconds")}
                     | {"table_md": ap.table_md, "table_csv": ap.table_csv}))
    return 0

