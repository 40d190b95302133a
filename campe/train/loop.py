"""Training loop: AdamW + warm-up/cosine, clipping, exact resume, DDP under torchrun, MLflow.

    from campe.train.loop import train
    from campe.train.run_config import resolve_run_config
    cfg = resolve_run_config({"text_encoder": {...}, "model": {...}, "loss": {...}, "train": {...}})  # params.yaml
    summary = train(cfg)                    # shards (+ cache) from cfg.train, outputs in cfg.train.out_dir
    summary = train(cfg, resume=True)       # continue from out_dir/ckpt_last.pt (a killed run: its last checkpoint)
    summary = train(cfg, source=MemoryPairs(images_uint8, captions))     # in-memory pairs (tests, small sets)

    torchrun --nproc_per_node 2 -m campe.cli train      # DDP: gloo on CPU, NCCL on GPU; train.batch_size is global

The methods and the run config: campe.train.run_config. Only the text tower's trainable parts (last LM layer, APT
vectors, heads), the image tower and the temperature (and SigLIP bias) are optimised; the frozen LM weights are
not even in the optimizer.

Outputs in out_dir (rank 0 only):
    ckpt_last.pt         resume checkpoint, written atomically every ckpt_every steps and at the end: trainable
                         weights, optimizer, scheduler, step, data position (epoch, batch), every rank's RNG states
    model.pt             final weights for evaluation (campe.train.checkpoint.load_trained_model(out_dir))
    model_config.json    resolved model config (campe.model.save_config; "text_tower_config" = the text encoder,
                         "image_tower" = train.image_tower)
    train_config.json    the resolved run config (all four sections, method applied) and its hash
    train_log.csv        per-step metrics (step, epoch, lr, loss, each term, grad_norm, samples_per_s)
    loss_curve.png       the loss terms against the step
    mlflow_run_id.txt    the MLflow run (written at the start, so evaluation and a resumed run log into it)
    metrics.json         final loss terms (means over the last 10 steps: mean_last10_<term>), throughput, the samples
                         skipped because their image does not decode (skipped_samples, skipped_fraction) and, for
                         the prompt methods, whether the K prompts differ (prompt_state_cosine, apt_movement, ...:
                         campe.text.diagnostics); also copied to train.metrics_file for DVC and logged to MLflow

Undecodable images (campe.data.imageprep): a sample whose image does not decode is left out of the batches (every
batch stays full, so the DDP ranks stay in step), warned about with its shard and key, and counted once however
many epochs see it; the count is gathered over the ranks at each metrics flush and kept in the checkpoint, and
every rank stops with TooManySkipsError once it passes train.max_skip_fraction of the data's samples.

Exact resume: the data order is a function of (seed, epoch) only, the position within the epoch is saved, and the
RNG states (dropout) are restored, so on CPU a run of 2N steps equals N steps + resume + N steps bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from campe.core.io import atomic_write_json, write_metrics
from campe.core.losses import CampeObjective, total_loss
from campe.core.tracking import Tracker, flatten_config
from campe.data.imageprep import SHOWN_SKIPS, UndecodableImageWarning, check_skip_fraction
from campe.model import CLIPModel, save_config
from campe.text.diagnostics import text_diagnostics
from campe.text.frozen_memo import FrozenStateMemo, memoize_frozen_states
from campe.train.checkpoint import (CKPT, FINAL, RUN_ID_FILE, build_run_model, load_trainable_state,
                                    torch_save_atomic, trainable_state)
from campe.train.distributed import (DistInfo, all_ranks_have, init_distributed, out_dir_lock, rng_state,
                                     set_rng_state, to_device)
from campe.train.early_stopping import EarlyStopping, ValPairs
from campe.train.log import LOG_FILE, plot_loss_curve, read_log, write_log
from campe.train.optim import lr_factor, make_optimizer
from campe.train.run_config import RunConfig, TrainParams
from campe.train.sources import CachedPairs, MemoryPairs


# The final loss terms in metrics.json (and train.metrics_file, MLflow) are means over the last FINAL_WINDOW steps,
# named so (mean_last10_contrastive_loss): the last step's own value (the last point of the logged curve) is noisier.
FINAL_WINDOW = 10
VAL_MEMO_BYTES = 1 << 30  # the val captions' frozen states (250 captions x 70 tokens x 384 floats: 27 MB here)
FINAL_PREFIX = f"mean_last{FINAL_WINDOW}_"
HEADLINE = ("steps", "samples_per_s", f"{FINAL_PREFIX}loss", f"{FINAL_PREFIX}contrastive_loss")


# ---------------------------------------------------------------------------------------------------- the loop
def _progress_enabled(tp: TrainParams, info: DistInfo) -> bool:
    return info.main and tp.progress and os.environ.get("CAMPE_NO_PROGRESS", "") not in ("1", "true")


def train(cfg: RunConfig, *, source: Any = None, model: CLIPModel | None = None, resume: bool = False,
          stop_at: int | None = None, checkpoint_at_stop: bool = True) -> dict[str, Any]:
    """Train `cfg`; returns {"step", "steps", "samples_per_s", "final": {term: value}, "run_id", "out_dir"}.

    source: None = the shards of cfg.train.shards_dir (through campe.train.data, cached or online, for LM methods when
    it is installed; else decoded into memory), or any object with batches_per_epoch(batch_size) and
    epoch_batches(epoch, batch_size, seed, rank, world_size, start) (see MemoryPairs).
    model: train this model in place (from build_run_model(cfg, ...)) instead of building one.
    resume: continue from out_dir/ckpt_last.pt when it exists (else start fresh).
    stop_at: stop after this step (with a checkpoint, or, checkpoint_at_stop=False, as if killed there).
    """
    tp = cfg.train
    info = init_distributed(tp.device)
    try:
        with out_dir_lock(tp.out_dir, info):
            return _train(cfg, info, source, model, resume, stop_at, checkpoint_at_stop)
    finally:
        if info.initialised_here:
            dist.destroy_process_group()


def _train(cfg: RunConfig, info: DistInfo, source: Any, model: CLIPModel | None, resume: bool,
           stop_at: int | None, checkpoint_at_stop: bool) -> dict[str, Any]:
    """The run, step by step (the order matters: the RNG streams and the files are those of an exact resume)."""
    out = _prepare_out_dir(cfg, info)
    model, resolved, encoder, mode = _resolve_model(cfg, source, model)
    datasets: dict[str, str] = {}
    if source is None:  # read from the data folders: the run names them (and their digests) as its inputs
        datasets = {"train-shards": cfg.train.shards_dir, **({"text-cache": cfg.train.cache_dir}
                                                             if mode == "cached" else {})}
        source = _shard_source(cfg, mode, encoder)
    text_input = _text_input_fn(cfg, model, mode)
    model.to(info.device)
    _attach_locked_features(cfg, info, model, source)
    run = _Run.start(cfg, info, out, model, source)
    run.setup_early_stopping(_val_text_fn(cfg, model, mode))
    resume_rng = run.restore() if resume and run.ckpt_path.exists() else run.fresh_log()
    run.wrap_ddp()
    objective = CampeObjective.from_config(cfg.loss, info.rank, info.world_size)
    run.open_tracking(resolved, datasets)
    return _loop(run, objective, text_input, resolved, resume_rng, stop_at, checkpoint_at_stop)


def _prepare_out_dir(cfg: RunConfig, info: DistInfo) -> Path:
    tp = cfg.train
    if tp.batch_size % info.world_size:
        raise ValueError(f"train.batch_size {tp.batch_size} is not divisible by the {info.world_size} ranks")
    out = Path(tp.out_dir)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _resolve_model(cfg: RunConfig, source: Any, model: CLIPModel | None) -> tuple[CLIPModel, dict, Any, str]:
    """(model, resolved model config, text encoder, text-input mode). LM methods read the shards through
    campe.train.data (cached frozen states, or online); the vanilla tower and explicit sources take captions."""
    mode = "plain"
    if source is None and cfg.text_encoder is not None:
        mode = "cached" if cfg.train.cache_dir else "online"
    if model is None:
        model, resolved, encoder = build_run_model(cfg, mode)
        return model, resolved, encoder, mode
    mode = "cached" if type(model.text).__name__ == "CachedTextTower" else "plain"
    encoder = getattr(model.text, "encoder", model.text)
    resolved = {"name": "default", "image_tower": cfg.train.image_tower, **dataclasses.asdict(model.cfg)}
    if cfg.text_encoder is not None:
        resolved.update(text_tower_kind="multiprompt", text_tower_config=dataclasses.asdict(cfg.text_encoder))
    return model, resolved, encoder, mode


def _attach_locked_features(cfg: RunConfig, info: DistInfo, model: CLIPModel, source: Any) -> None:
    """train.image_tower 'locked': the backbone features of every train image (and val image, with early stopping)
    go into train.image_features_dir once (rank 0; resumable); the steps then read them from there (strict: a step
    never runs the backbone)."""
    visual = model.visual
    if not hasattr(visual, "attach"):
        return
    from campe.data.feature_cache import FeatureStore
    from campe.locked import build_feature_cache, feature_manifest
    tp = cfg.train
    images = getattr(source, "images", None)
    kw: dict[str, Any] = {"images": images} if images is not None else {"shards_dir": tp.shards_dir}
    if tp.patience:
        kw.update(karpathy_json=tp.val_set, splits=("val",))
    store = None
    if info.main:
        store = build_feature_cache(tp.image_features_dir, visual, progress=_progress_enabled(tp, info), **kw)
    if info.world_size > 1:
        dist.barrier()
    if store is None:
        store = FeatureStore.open(tp.image_features_dir, feature_manifest(cfg.model.image_size))
    visual.attach(store, strict=True)


def _val_text_fn(cfg: RunConfig, model: CLIPModel, mode: str) -> Callable[[list[str]], Any]:
    """Captions -> the text tower's input, for the val loss (the LM towers take captions; the frozen layers then
    run on the fly)."""
    if cfg.text_encoder is None:
        return model.text.tokenize
    if mode == "plain":
        return model.text.layout
    return lambda captions: list(captions)


def _shard_source(cfg: RunConfig, mode: str, encoder: Any) -> Any:
    tp = cfg.train
    if mode != "plain":
        return CachedPairs(tp.shards_dir, tp.cache_dir or None, encoder, tp.num_workers, tp.keep_in_memory)
    return MemoryPairs.from_shards(tp.shards_dir, cfg.model.image_size)


class _Run:
    """The state of one training run (model, optimizer, position, skipped samples, pending metrics, MLflow run) and
    the steps that act on it."""

    def __init__(self, cfg: RunConfig, info: DistInfo, out: Path, model: CLIPModel, source: Any, total: int):
        self.cfg, self.tp, self.info, self.out, self.model, self.source = cfg, cfg.train, info, out, model, source
        self.total = total
        self.ddp: nn.Module = model
        self.ckpt_path = out / CKPT
        self.step, self.epoch, self.batch_in_epoch, self.run_id = 0, 0, 0, None
        # Samples left out because their image does not decode: id -> reason, in the order found, the same on every
        # rank (gathered at each flush). A set, so the epochs and a resume's replayed batches count each sample once.
        self.skipped: dict[str, str] = {}
        self.take_skips = getattr(source, "take_skips", lambda: [])
        self.total_samples = getattr(source, "total_samples", None)
        self.pending: list[tuple[int, int, float, dict[str, torch.Tensor]]] = []  # (step, epoch, lr, terms) to flush
        self.tracker: Tracker | None = None
        self.window_start, self.window_steps = 0.0, 0
        self.per_epoch = max(1, source.batches_per_epoch(cfg.train.batch_size))
        self.stopper: EarlyStopping | None = None  # train.patience > 0
        self.val: ValPairs | None = None
        self.val_text: Callable[[list[str]], Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # trainable weights of the best val evaluation
        self.val_memo = FrozenStateMemo(VAL_MEMO_BYTES)
        self.best_step = 0

    @classmethod
    def start(cls, cfg: RunConfig, info: DistInfo, out: Path, model: CLIPModel, source: Any) -> "_Run":
        """The schedule (total steps), optimizer and LR scheduler, and this rank's seeds."""
        tp = cfg.train
        per_epoch = source.batches_per_epoch(tp.batch_size)
        if per_epoch < 1:
            raise ValueError(f"the training data has fewer pairs than one batch ({tp.batch_size}); lower "
                             f"train.batch_size")
        run = cls(cfg, info, out, model, source, tp.steps or tp.epochs * per_epoch)
        run.optimizer = make_optimizer(model, tp)
        decay_steps = tp.schedule_epochs * per_epoch or run.total  # after it the lr stays at lr * min_lr_ratio
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(
            run.optimizer, lambda s: lr_factor(s, tp.warmup_steps, decay_steps, tp.min_lr_ratio))
        # Seeds (the weight init has its own seeds): dropout and anything random in the loop, per rank.
        torch.manual_seed(tp.seed + info.rank)
        np.random.seed((tp.seed + info.rank) % 2**32)
        random.seed(tp.seed + info.rank)
        return run

    def setup_early_stopping(self, val_text: Callable[[list[str]], Any]) -> None:
        """train.patience > 0: the val pairs (decoded once) and the rule (campe.train.early_stopping)."""
        tp = self.tp
        if not tp.patience:
            return
        self.stopper = EarlyStopping(tp.patience)
        self.val = ValPairs.from_karpathy(tp.val_set, self.cfg.model.image_size)
        self.val_text = val_text
        self.val_objective = CampeObjective.from_config(self.cfg.loss)  # one process: every rank the whole set

    def val_due(self) -> bool:
        every = self.tp.val_every or self.per_epoch
        return self.stopper is not None and (self.step % every == 0 or self.step == self.total)

    def validate(self) -> None:
        """Val loss of the current weights into the rule (the best weights kept), val_log.json and MLflow."""
        # The val captions' frozen states are the same every evaluation: computed once, then looked up.
        with memoize_frozen_states(self.val_memo):
            loss = self.val.loss(self.model, self.val_text, self.val_objective, self.tp.batch_size,
                                 self.info.device)
        if self.stopper.update(loss):
            self.best_state, self.best_step = trainable_state(self.model), self.step
        if self.info.main:
            atomic_write_json(self.out / "val_log.json", {**self.early_stopping_summary(),
                                                          "history": self.stopper.history})
            if self.tracker is not None:
                self.tracker.log_metrics([{"step": self.step, "val_loss": loss}])

    def early_stopping_summary(self) -> dict[str, Any]:
        """What metrics.json and the ablation table record: evaluations, the epoch reached, the best one."""
        if self.stopper is None:
            return {}
        st = self.stopper
        return {"val_evals": st.evals, "best_val_loss": round(st.best, 6), "best_step": self.best_step,
                "best_epoch": round(self.best_step / self.per_epoch, 3),
                "epochs_run": round(self.step / self.per_epoch, 3), "stopped_early": st.stop,
                "patience": self.tp.patience}

    def restore(self) -> dict | None:
        """Continue from ckpt_last.pt; returns this rank's saved RNG state (None: other world size, reseeded)."""
        info, ckpt_path = self.info, self.ckpt_path
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["config_hash"] != self.cfg.hash(runtime=False):
            raise ValueError(f"{ckpt_path}: written by another config (hash {ck['config_hash']}, now "
                             f"{self.cfg.hash(runtime=False)}); resume with the same params, or use a new out_dir")
        load_trainable_state(self.model, ck["model"], str(ckpt_path))
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        self.run_id = ck["mlflow_run_id"]
        self.skipped.update(ck.get("skipped", {}))
        if self.stopper is not None and ck.get("early_stopping") is not None:
            self.stopper.load_state_dict(ck["early_stopping"])
            self.best_state, self.best_step = ck["best_state"], ck["best_step"]
        resume_rng = ck["rng"][info.rank] if len(ck["rng"]) == info.world_size else None
        if resume_rng is None and info.main:
            print(f"campe train: resuming on {info.world_size} ranks from {len(ck['rng'])}: RNG streams reseeded "
                  f"(not bit-identical)", file=sys.stderr)
        if info.main:
            write_log(self.out / LOG_FILE, [], keep_upto=self.step)  # drop rows a killed run logged after its ckpt
        return resume_rng

    def fresh_log(self) -> None:
        """A run from step 0: no log rows of an earlier run."""
        if self.info.main:
            (self.out / LOG_FILE).unlink(missing_ok=True)

    def wrap_ddp(self) -> None:
        info = self.info
        if info.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                find_unused_parameters=self.cfg.model.video_pool == "attn")  # the temporal pool is idle on images

    def open_tracking(self, resolved: dict, datasets: dict[str, str]) -> None:
        """Rank 0: the run's config files, and its MLflow run (new, with its params and its input datasets
        {name: folder}, or the resumed one)."""
        cfg, info, out = self.cfg, self.info, self.out
        if not info.main:
            return
        config_dict = cfg.to_dict()
        save_config(resolved, out / "model_config.json")
        atomic_write_json(out / "train_config.json", {"config": config_dict, "params_hash": cfg.hash(),
                                                      "resume_hash": cfg.hash(runtime=False)})
        if not self.tp.tracking_uri:
            return
        self.tracker = Tracker(self.tp, self.run_id, config_hash=cfg.hash(), base_dir=cfg.base_dir)
        new_run, self.run_id = self.run_id is None, self.tracker.run_id
        (out / RUN_ID_FILE).write_text(self.run_id + "\n")
        if new_run:
            self.tracker.log_params({**flatten_config(config_dict), "params_hash": cfg.hash(),
                                     "world_size": info.world_size, "total_steps": self.total,
                                     "trainable_parameters": sum(p.numel() for p in self.model.parameters()
                                                                 if p.requires_grad)})
            self.tracker.log_datasets(datasets, base_dir=cfg.base_dir)

    def note_skips(self) -> None:
        """Gather the samples left out since the last call (every rank's), warn about new ones, and stop every
        rank alike once they pass train.max_skip_fraction of the data."""
        info, skipped = self.info, self.skipped
        new = self.take_skips()
        if info.world_size > 1:
            parts: list[Any] = [None] * info.world_size
            dist.all_gather_object(parts, new)
            new = [x for part in parts for x in part]
        for x in new:
            if x.id in skipped:
                continue
            skipped[x.id] = x.reason
            if info.main and len(skipped) <= SHOWN_SKIPS:
                more = " (further skips are counted, not shown)" if len(skipped) == SHOWN_SKIPS else ""
                warnings.warn(f"campe train: skipping sample {x.key} of {x.where}: {x.reason}{more}",
                              UndecodableImageWarning, stacklevel=2)
        if self.total_samples:
            check_skip_fraction(len(skipped), self.total_samples, self.tp.max_skip_fraction, "campe train", skipped,
                                "train.max_skip_fraction")

    def flush(self) -> None:
        """The pending step metrics, averaged over the ranks and checked finite, into the log and MLflow."""
        self.note_skips()  # on every rank at the same steps (a collective under DDP), before any checkpoint
        pending, info = self.pending, self.info
        if not pending:
            return
        keys = list(pending[0][3])
        vals = torch.stack([torch.stack([t[k].float() for k in keys]) for *_, t in pending])  # [n, terms]
        if info.world_size > 1:
            dist.all_reduce(vals)  # mean over ranks: each rank's loss is its rows against the global batch
            vals /= info.world_size
        # Checked here, not every step (a per-step check would sync the GPU): before any checkpoint is written.
        bad = (~torch.isfinite(vals)).nonzero()
        if len(bad):
            i, j = bad[0].tolist()
            raise FloatingPointError(f"step {pending[i][0]}: {keys[j]} is {float(vals[i, j])}; lower train.lr, "
                                     f"raise warmup_steps or use precision fp32")
        # samples/s since the previous flush, over all the wall time (this flush's MLflow logging and checkpoints
        # included): the windows tile the run, so their mean is the run's average, which the progress bar shows.
        now = time.perf_counter()
        rate = self.window_steps * self.tp.batch_size / max(1e-9, now - self.window_start)
        self.window_start, self.window_steps = now, 0
        rows = []
        for (s, e, lr, _), v in zip(pending, vals.cpu().tolist()):
            row = {"step": s, "epoch": e, "lr": lr, **dict(zip(keys, v)), "samples_per_s": rate}
            row["loss"] = sum(x for k, x in row.items() if k.endswith("_loss"))
            rows.append(row)
        pending.clear()
        if info.main:
            write_log(self.out / LOG_FILE, rows)
            if self.tracker is not None:
                self.tracker.log_metrics(rows)

    def checkpoint(self) -> None:
        """ckpt_last.pt (rank 0 writes it, with every rank's RNG state)."""
        info = self.info
        states = [None] * info.world_size
        if info.world_size > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if info.main:
            torch_save_atomic({"model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                               "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                               "batch_in_epoch": self.batch_in_epoch, "rng": states, "mlflow_run_id": self.run_id,
                               "skipped": dict(self.skipped),
                               "early_stopping": None if self.stopper is None else self.stopper.state_dict(),
                               "best_state": self.best_state, "best_step": self.best_step,
                               "config_hash": self.cfg.hash(runtime=False), "world_size": info.world_size},
                              self.ckpt_path)

    def train_step(self, batch: dict, objective: CampeObjective, text_input: Callable[[dict], Any],
                   autocast: Any, params: list[torch.Tensor]) -> torch.Tensor:
        """One optimizer step on a batch; its terms join the pending metrics. Returns the loss."""
        model, info, tp = self.model, self.info, self.tp
        model.train()
        images = to_device(batch["images"], info.device)
        text = to_device(text_input(batch), info.device)
        with autocast:
            terms = objective(self.ddp(images=images, text=text))
        loss = total_loss(terms)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tp.grad_clip if tp.grad_clip > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        model.clamp_logit_scale_()
        self.step += 1
        self.batch_in_epoch += 1
        self.window_steps += 1
        logged = {k: v.detach() for k, v in terms.items()}
        logged["grad_norm"] = grad_norm.detach()
        self.pending.append((self.step, self.epoch, lr, logged))
        return loss

    def after_step(self, bar: Any, loss: torch.Tensor) -> None:
        """Progress bar, metrics flush every log_every steps, checkpoint every ckpt_every steps."""
        tp, step = self.tp, self.step
        if bar is not None:
            bar.update(tp.batch_size)
            if step % tp.log_every == 0 or step == self.total:
                bar.set_postfix(step=step, loss=f"{float(loss.detach()):.4f}", refresh=False)
        if step % tp.log_every == 0:
            self.flush()
        if tp.ckpt_every and step % tp.ckpt_every == 0 and step < self.total:
            self.flush()
            self.checkpoint()


def _progress_bar(run: _Run) -> Any:
    if not _progress_enabled(run.tp, run.info):
        return None
    from tqdm import tqdm
    b = run.tp.batch_size
    # smoothing=0: the rate shown is the average since the bar started (metrics.json's samples_per_s at the end),
    # not tqdm's default moving average of the last refreshes, which swings with each MLflow flush.
    return tqdm(total=run.total * b, initial=run.step * b, unit="sample", unit_scale=True, dynamic_ncols=True,
                mininterval=1.0, smoothing=0, desc=f"train {run.cfg.method}")


def _loop(run: _Run, objective: CampeObjective, text_input: Callable[[dict], Any], resolved: dict,
          resume_rng: dict | None, stop_at: int | None, checkpoint_at_stop: bool) -> dict[str, Any]:
    """The steps until the end of the schedule (or stop_at), then the final model and metrics; the MLflow run ends
    with the status the run ended with (a paused run leaves it open)."""
    tp, info, source = run.tp, run.info, run.source
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=tp.precision == "bf16")
    params = [p for p in run.model.parameters() if p.requires_grad]
    bar = _progress_bar(run)
    status = "FAILED"
    start_step = run.step
    if resume_rng is not None:
        set_rng_state(resume_rng)  # last thing before the loop: nothing above may shift the restored streams
    t_start = run.window_start = time.perf_counter()
    run.window_steps = 0
    try:
        batches = source.epoch_batches(run.epoch, tp.batch_size, tp.seed, info.rank, info.world_size,
                                       run.batch_in_epoch)
        empty_epochs = 0
        while run.step < run.total and (stop_at is None or run.step < stop_at):
            batch = next(batches, None)
            if not all_ranks_have(batch is not None, info):
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError("an epoch of the training data gave no batch; check train.batch_size")
                batches = source.epoch_batches(run.epoch, tp.batch_size, tp.seed, info.rank, info.world_size, 0)
                continue
            empty_epochs = 0
            loss = run.train_step(batch, objective, text_input, autocast, params)
            if run.val_due():
                run.validate()
            run.after_step(bar, loss)
            if run.stopper is not None and run.stopper.stop:
                break
        stopped_early = run.stopper is not None and run.stopper.stop
        # stop_at: paused (or, checkpoint_at_stop=False, as if killed); the MLflow run stays open
        if run.step < run.total and not stopped_early:
            status = "RUNNING"
            if checkpoint_at_stop:
                run.flush()
                run.checkpoint()
            return {"step": run.step, "steps": run.total, "stopped": True, "run_id": run.run_id,
                    "out_dir": str(run.out)}
        run.flush()
        run.checkpoint()
        if run.best_state is not None:  # early stopping: the final model is the best val evaluation's
            load_trainable_state(run.model, run.best_state, "best val weights")
        summary = _finish(run.cfg, info, run.model, resolved, run.out, run.tracker, run.step, run.total, start_step,
                          time.perf_counter() - t_start, run.run_id, run.skipped, run.total_samples,
                          run.early_stopping_summary())
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        if run.tracker is not None and status != "RUNNING":
            run.tracker.end(status)


def _text_input_fn(cfg: RunConfig, model: CLIPModel, mode: str) -> Callable[[dict], Any]:
    if cfg.text_encoder is None:
        tower = model.text
        return lambda batch: tower.tokenize(batch["captions"])
    if mode != "plain":
        return lambda batch: batch["text"]
    encoder = model.text
    return lambda batch: encoder.layout(batch["captions"])


def _finish(cfg: RunConfig, info: DistInfo, model: CLIPModel, resolved: dict, out: Path, tracker: Tracker | None,
            step: int, total: int, start_step: int, elapsed: float, run_id: str | None, skipped: dict[str, str],
            total_samples: int | None, early: dict[str, Any] | None = None) -> dict[str, Any]:
    tp = cfg.train
    samples_per_s = (step - start_step) * tp.batch_size / max(elapsed, 1e-9)
    skip_fraction = round(len(skipped) / total_samples, 6) if total_samples else 0.0
    summary: dict[str, Any] = {"step": step, "steps": total, "samples_per_s": round(samples_per_s, 2),
                               "seconds": round(elapsed, 2), "run_id": run_id, "out_dir": str(out),
                               "skipped_samples": len(skipped)}
    if not info.main:
        return summary
    rows = read_log(out / LOG_FILE)  # the whole run, across resumes
    last = rows[-FINAL_WINDOW:] if rows else []  # the "final" figures: means over the last steps (one is noisy)
    final = {k: sum(r[k] for r in last) / len(last) for k in last[0]
             if k not in ("step", "epoch", "samples_per_s")} if last else {}
    summary["final"] = {k: round(v, 6) for k, v in final.items()}
    torch_save_atomic({"model": trainable_state(model), "config": resolved, "step": step}, out / FINAL)
    plot_loss_curve(rows, out / "loss_curve.png", title=f"{cfg.method} ({cfg.loss.kind})")
    diagnostics = {k: round(v, 6) for k, v in text_diagnostics(model.text).items()}  # {} without prompts
    metrics = {"steps": step, "samples_per_s": summary["samples_per_s"], "world_size": info.world_size,
               "skipped_samples": len(skipped), "skipped_fraction": skip_fraction,
               **{f"{FINAL_PREFIX}{k}": v for k, v in summary["final"].items()}, **diagnostics, **(early or {})}
    summary.update(early or {})
    atomic_write_json(out / "metrics.json", metrics)
    if tp.metrics_file:
        write_metrics(tp.metrics_file, metrics, {k: metrics[k] for k in HEADLINE if k in metrics})
    if tracker is not None:
        tracker.log_metrics([{"step": step, "samples_per_s_run": samples_per_s, "skipped_samples": len(skipped),
                              "skipped_fraction": skip_fraction, **diagnostics,
                              **{FINAL_PREFIX + k: v for k, v in summary["final"].items() if k.endswith("loss")}}])
        for name in ("train_config.json", "model_config.json", FINAL, "loss_curve.png", LOG_FILE, "metrics.json"):
            tracker.log_artifact(out / name)
    return summary
