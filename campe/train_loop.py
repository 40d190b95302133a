"""Training loop: AdamW + warm-up/cosine, clipping, exact resume, DDP under torchrun, MLflow, the baselines table.

    from campe.train_loop import resolve_run_config, train
    cfg = resolve_run_config({"text_encoder": {...}, "model": {...}, "loss": {...}, "train": {...}})  # params.yaml
    summary = train(cfg)                    # shards (+ cache) from cfg.train, outputs in cfg.train.out_dir
    summary = train(cfg, resume=True)       # continue from out_dir/ckpt_last.pt (a killed run: its last checkpoint)
    summary = train(cfg, source=MemoryPairs(images_uint8, captions))     # in-memory pairs (tests, small sets)

    torchrun --nproc_per_node 2 -m campe.cli train      # DDP: gloo on CPU, NCCL on GPU; train.batch_size is global

`train.method` picks the paper's method or a baseline; METHODS below is the one table of what each switch changes
(text tower pooling/negation, loss weights). The contrastive switch is `loss.kind` (softmax | sigmoid); the model's
`contrastive` follows it. Only the text tower's trainable parts (last LM layer, APT vectors, heads), the image
tower and the temperature (and SigLIP bias) are optimised; the frozen LM weights are not even in the optimizer.

Outputs in out_dir (rank 0 only):
    ckpt_last.pt         resume checkpoint, written atomically every ckpt_every steps and at the end: trainable
                         weights, optimizer, scheduler, step, data position (epoch, batch), every rank's RNG states
    model.pt             final weights for evaluation (load_trained_model(out_dir))
    model_config.json    resolved model config (campe.model.save_config; "text_tower_config" = the text encoder)
    train_config.json    the resolved run config (all four sections, method applied) and its hash
    train_log.csv        per-step metrics (step, epoch, lr, loss, each term, grad_norm, samples_per_s)
    loss_curve.png       the loss terms against the step
    mlflow_run_id.txt    the MLflow run (written at the start, so evaluation and a resumed run log into it)
    metrics.json         final loss terms, throughput and the samples skipped because their image does not decode
                         (skipped_samples, skipped_fraction; also copied to train.metrics_file for DVC and logged
                         to MLflow)

Undecodable images (campe.imageprep): a sample whose image does not decode is left out of the batches (every batch
stays full, so the DDP ranks stay in step), warned about with its shard and key, and counted once however many
epochs see it; the count is gathered over the ranks at each metrics flush and kept in the checkpoint, and every
rank stops with TooManySkipsError once it passes train.max_skip_fraction of the data's samples.

Exact resume: the data order is a function of (seed, epoch) only, the position within the epoch is saved, and the
RNG states (dropout) are restored, so on CPU a run of 2N steps equals N steps + resume + N steps bit for bit.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from campe.config import ConfigError, from_dict
from campe.imageprep import (DEFAULT_MAX_SKIP_FRACTION, SHOWN_SKIPS, ImageDecodeError, SkippedSample,
                             UndecodableImageWarning, check_skip_fraction, decode_image, validate_max_skip_fraction)
from campe.io import OutputInUse, atomic_write_bytes, atomic_write_json, output_lock, store_uri
from campe.losses import CampeObjective, LossConfig, total_loss
from campe.model import CLIPModel, ModelConfig, build_model, save_config
from campe.multiprompt import MultiPromptConfig, PromptLayout

CKPT = "ckpt_last.pt"
FINAL = "model.pt"
RUN_ID_FILE = "mlflow_run_id.txt"
LOG_FILE = "train_log.csv"
PRECISIONS = ("fp32", "bf16")
TRAIN_SECTIONS = ("text_encoder", "model", "loss", "train")  # the params sections one training run reads

# ---------------------------------------------------------------------------------------------------- configs

_NO_AUX = {"lambda_div": 0.0, "lambda_neg": 0.0}

# The paper's method and its baselines, as overrides of the text_encoder / model / loss sections.
#   text_encoder None: the vanilla CLIP text transformer trained from scratch (campe.model), no LM. Otherwise the
#     fields the method sets; training from a cache, a text_encoder section that states one of them must state the
#     same value (the cache stage reads that section as written, so cache and training agree).
#   loss: weights forced to 0 for the terms the method leaves out.
#   needs: loss weights that must be > 0 in the loss section (the method is that term).
METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {"text_encoder": None, "model": {"text_encoder": "vanilla"}, "loss": _NO_AUX},
    "mean": {"text_encoder": {"pooling": "mean", "negation": False}, "loss": _NO_AUX},  # LM + mean pool
    "last_token": {"text_encoder": {"pooling": "last_token", "negation": False}, "loss": _NO_AUX},
    "single_prompt": {"text_encoder": {"pooling": "single_prompt", "negation": False}, "loss": _NO_AUX},
    "defo": {"text_encoder": {"pooling": "defo", "negation": False}, "loss": _NO_AUX},  # M lone learned tokens
    "multi_prompt": {"text_encoder": {"pooling": "multi_prompt", "negation": False}, "loss": _NO_AUX},
    "multi_prompt_div": {"text_encoder": {"pooling": "multi_prompt", "negation": False},
                         "loss": {"lambda_neg": 0.0}, "needs": ("lambda_div",)},
    "multi_prompt_div_neg": {"text_encoder": {"pooling": "multi_prompt", "negation": True},
                             "loss": {}, "needs": ("lambda_div", "lambda_neg")},
}
# Fields of other sections that the run config derives (a section may state them only with the derived value).
DERIVED = {("model", "contrastive"): "loss.kind", ("model", "text_encoder"): "train.method",
           ("text_encoder", "embed_dim"): "model.embed_dim"}


@dataclass
class TrainParams:
    """params.yaml section `train`."""
    method: str = "multi_prompt_div_neg"  # one of METHODS
    shards_dir: str = "data/shards/train"  # the download stage's webdataset shards
    cache_dir: str = "data/cache/train"  # frozen LM states from the cache stage; "" = compute them online
    out_dir: str = "models/campe"
    metrics_file: str = "metrics/train.json"  # final loss terms and samples/s for DVC; "" = none
    steps: int = 0  # optimizer steps; 0 = epochs x batches per epoch
    epochs: int = 2
    batch_size: int = 64  # global batch (split over the ranks; contrastive negatives span all of it)
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine decays the lr to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.1  # not on gains, biases, embeddings, APT vectors, temperature
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    seed: int = 0  # data order and dropout (the weight init has model.init_seed / text_encoder.init_seed)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda
    num_workers: int = 0  # data loader workers for the cached data
    log_every: int = 10  # steps between metric flushes (every step is logged; this sets how often)
    ckpt_every: int = 200  # steps between checkpoints (and one at the end); 0 = only at the end
    progress: bool = True  # tqdm bar (samples/s, ETA) on rank 0; CAMPE_NO_PROGRESS=1 also turns it off
    tracking_uri: str = "sqlite:///mlflow.db"  # MLflow store (a relative one: beside the params file); "" = none
    experiment: str = "campe"
    artifact_root: str = "mlartifacts"  # a new experiment stores its artifacts in <artifact_root>/<experiment>
    run_name: str = ""  # MLflow run name; "" = train/<method>/<UTC date>
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION  # undecodable images: stop once more than this fraction

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not one of: {', '.join(METHODS)}")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError(f"set steps > 0 or epochs > 0 (steps={self.steps}, epochs={self.epochs})")
        for name in ("batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "num_workers", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0 and self.eps > 0):
            raise ValueError("beta1 and beta2 must be in [0, 1) and eps > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision '{self.precision}' is not one of: {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device '{self.device}' is not one of: auto, cpu, cuda")
        validate_max_skip_fraction(self.max_skip_fraction)


# Fields that may change between a run and its resume (they do not change the numbers).
RUNTIME_FIELDS = ("shards_dir", "cache_dir", "out_dir", "metrics_file", "num_workers", "log_every", "ckpt_every",
                  "progress", "tracking_uri", "experiment", "artifact_root", "run_name", "device", "max_skip_fraction")


@dataclass
class RunConfig:
    """Everything a training run needs, with the method's overrides applied.

    text_encoder None = the vanilla text tower; model = ModelConfig fields (with text_encoder / contrastive /
    embed_dim derived), validated.
    """
    method: str
    text_encoder: MultiPromptConfig | None
    model: ModelConfig
    loss: LossConfig
    train: TrainParams
    # The folder a relative train.tracking_uri / artifact_root is resolved against (the params file's; "" = the
    # working dir). Not part of the config: never saved, never hashed.
    base_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method,
                "text_encoder": None if self.text_encoder is None else dataclasses.asdict(self.text_encoder),
                "model": dataclasses.asdict(self.model), "loss": dataclasses.asdict(self.loss),
                "train": dataclasses.asdict(self.train)}

    def hash(self, runtime: bool = True) -> str:
        """sha256 (12 hex) of the resolved config; runtime=False leaves out RUNTIME_FIELDS (resume check)."""
        d = self.to_dict()
        if not runtime:
            d["train"] = {k: v for k, v in d["train"].items() if k not in RUNTIME_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def resolve_run_config(sections: dict[str, dict[str, Any] | None], where: str = "params") -> RunConfig:
    """Raw params sections {"text_encoder", "model", "loss", "train"} (missing = defaults) -> RunConfig.

    Applies METHODS[train.method]; derives model.contrastive from loss.kind, model.text_encoder from the method
    and text_encoder.embed_dim from model.embed_dim (a section that states one of these must agree). Unknown keys,
    wrong types and bad values are ConfigErrors naming `where`, the section and the key.
    """
    unknown = set(sections) - set(TRAIN_SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)} for training; expected text_encoder, "
                          f"model, loss, train")
    raw = {k: dict(sections.get(k) or {}) for k in TRAIN_SECTIONS}
    tp = from_dict(TrainParams, raw["train"], f"{where}:train")
    spec = METHODS[tp.method]
    loss = from_dict(LossConfig, {**raw["loss"], **spec.get("loss", {})}, f"{where}:loss")
    for name in spec.get("needs", ()):
        if getattr(loss, name) <= 0:
            raise ConfigError(f"{where}:loss: method '{tp.method}' needs {name} > 0 (got {getattr(loss, name)}); "
                              f"set loss.{name} or pick a method without that term")
    model_fields = {**raw["model"], **spec.get("model", {})}
    model_fields["contrastive"] = loss.kind
    if spec["text_encoder"] is not None:
        model_fields["text_encoder"] = "multiprompt"
    _check_derived(raw, model_fields, tp.method, where)
    model = from_dict(ModelConfig, model_fields, f"{where}:model")
    text = None
    if spec["text_encoder"] is not None:
        for k, v in spec["text_encoder"].items():
            # The cache stage builds its cache from this section as written: training from a cache, the section
            # must say what the method trains (online, the method's value simply wins).
            if tp.cache_dir and k in raw["text_encoder"] and raw["text_encoder"][k] != v:
                raise ConfigError(f"{where}:text_encoder: {k} is {raw['text_encoder'][k]!r} but method "
                                  f"'{tp.method}' trains with {k}: {json.dumps(v)}; set text_encoder.{k} to that "
                                  f"(campe cache builds the cache from this section), or train online "
                                  f"(train.cache_dir: '' / --cache none)")
        tfields = {**raw["text_encoder"], **spec["text_encoder"], "embed_dim": model.embed_dim}
        text = from_dict(MultiPromptConfig, tfields, f"{where}:text_encoder (method '{tp.method}')")
    else:
        from_dict(MultiPromptConfig, raw["text_encoder"], f"{where}:text_encoder")  # still a valid section
    return RunConfig(tp.method, text, model, loss, tp)


def _check_derived(raw: dict[str, dict], model_fields: dict, method: str, where: str) -> None:
    stated = raw["model"].get("contrastive")
    if stated is not None and stated != model_fields["contrastive"]:
        raise ConfigError(f"{where}:model: contrastive '{stated}' disagrees with loss.kind "
                          f"'{model_fields['contrastive']}'; the switch is loss.kind (leave model.contrastive out)")
    stated = raw["model"].get("text_encoder")
    if stated is not None and (stated == "vanilla") != (method == "vanilla"):
        raise ConfigError(f"{where}:model: text_encoder '{stated}' disagrees with method '{method}'; the method "
                          f"picks the text tower (leave model.text_encoder out)")
    stated = raw["text_encoder"].get("embed_dim")
    want = model_fields.get("embed_dim", ModelConfig().embed_dim)
    if stated is not None and stated != want:
        raise ConfigError(f"{where}:text_encoder: embed_dim {stated} disagrees with model.embed_dim {want}; the "
                          f"joint dimension is model.embed_dim (leave text_encoder.embed_dim out)")


# ---------------------------------------------------------------------------------------------------- model

TOWER_MODES = ("plain", "cached", "online")


def build_run_model(cfg: RunConfig, tower: str = "plain") -> tuple[CLIPModel, dict[str, Any], Any]:
    """-> (model, resolved model config, text encoder). For the LM methods `tower` picks the text input:
    "plain" = the MultiPromptTextEncoder itself (captions or PromptLayouts), "cached" / "online" = campe.cache's
    CachedTextTower over it (batch["text"] = {"hidden", "layout"} from the cache, or computed on the fly)."""
    if tower not in TOWER_MODES:
        raise ValueError(f"tower '{tower}' is not one of: {', '.join(TOWER_MODES)}")
    fields = dataclasses.asdict(cfg.model)
    if cfg.text_encoder is None:
        model, resolved = build_model("default", **fields)
        return model, resolved, model.text
    from campe.multiprompt import build_text_encoder
    encoder = build_text_encoder(cfg.text_encoder)
    text_tower = encoder
    if tower != "plain":
        from campe.cache import CachedTextTower
        text_tower = CachedTextTower(encoder, online=tower == "online")
    fields.pop("text_encoder")
    model, resolved = build_model("default", text_tower=text_tower, **fields)
    resolved["text_encoder"] = "multiprompt"  # the cache wrapper is a view of the same tower
    resolved["text_tower_config"] = dataclasses.asdict(cfg.text_encoder)
    return model, resolved, encoder


def frozen_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the frozen parameters (they come back from the pretrained LM)."""
    frozen = frozen_parameter_names(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = frozen_parameter_names(model)
    bad = [k for k in missing if k not in frozen]
    if bad or unexpected:
        raise ValueError(f"{where}: checkpoint does not fit the model (missing {bad[:5]}, unexpected "
                         f"{list(unexpected)[:5]}); was it written with another config?")


NO_DECAY_NAMES = ("positional_embedding", "pos_embed", "temporal_pos", "probe", "apt")


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Trainable parameter names -> (decayed, not decayed). No decay on gains and biases (ndim < 2 or named
    *bias), embeddings (nn.Embedding, positional tables, the pooling probe, APT vectors) and the logit scale/bias."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (p.ndim < 2 or id(p) in embeddings or leaf in NO_DECAY_NAMES or leaf.endswith("bias")
                or leaf.startswith("logit_")):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": tp.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tp.lr, betas=(tp.beta1, tp.beta2), eps=tp.eps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warm-up, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------- data

class MemoryPairs:
    """All (image, caption) pairs in memory; the batch order is a function of (seed, epoch) only.

    images: uint8 [N,3,H,W] (or float in [0,1]); captions: N strings. Each epoch is a seeded permutation cut into
    global batches of batch_size (the last partial one dropped); rank r takes rows r*b:(r+1)*b of each, b =
    batch_size / world_size, so ranks together see exactly what one process would see.
    """

    def __init__(self, images: torch.Tensor, captions: Sequence[str], keys: Sequence[str] | None = None):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N,3,H,W], got {list(images.shape)}")
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        self.images, self.captions = images, list(captions)
        self.keys = list(keys) if keys is not None else [str(i) for i in range(len(self.captions))]
        self.skipped: list[SkippedSample] = []  # samples left out when loading (from_shards)
        self.total_samples = len(self.captions)  # samples of the data, those left out included

    def __len__(self) -> int:
        return len(self.captions)

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                      start: int = 0) -> Iterator[dict[str, Any]]:
        """Batches start.. of `epoch`: {"images" [b,3,H,W], "captions" [b], "keys" [b]} (b = this rank's rows)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self), generator=g)
        b = batch_size // world_size
        for i in range(start, self.batches_per_epoch(batch_size)):
            idx = perm[i * batch_size + rank * b: i * batch_size + (rank + 1) * b]
            yield {"images": self.images[idx], "captions": [self.captions[j] for j in idx.tolist()],
                   "keys": [self.keys[j] for j in idx.tolist()]}

    @classmethod
    def from_shards(cls, root: str | Path, image_size: int | None = None) -> MemoryPairs:
        """Every sample of the download stage's finished shards (campe.shards), decoded once (campe.imageprep). A
        sample whose image does not decode is left out and listed in `.skipped` (the training loop counts it)."""
        import webdataset as wds

        from campe.shards import shard_paths
        paths = shard_paths(root)
        if not paths:
            raise FileNotFoundError(f"{root}: no finished shards (run `campe download` first)")
        images, captions, keys, skipped, total = [], [], [], [], 0
        for s in wds.WebDataset(paths, shardshuffle=False, empty_check=False):  # raw bytes: decoded below
            data = s.get("jpg")
            if data is None or "txt" not in s:
                raise ValueError(f"{root}: sample {s.get('__key__')} has no jpg/txt; expected the download "
                                 f"stage's KEY.jpg / KEY.txt / KEY.json shards")
            total += 1
            caption = s["txt"].decode("utf-8")
            if not caption.strip():
                continue  # a blank caption: no data, as for the LM methods (campe.cache.sample_caption)
            try:
                img = decode_image(data)  # uint8 [3,H,W]
            except ImageDecodeError as e:
                skipped.append(SkippedSample(s["__url__"], s["__key__"], f"undecodable image ({e})"))
                continue
            if image_size is not None and tuple(img.shape[1:]) != (image_size, image_size):
                raise ValueError(f"{root}: images are {img.shape[2]}x{img.shape[1]} but model.image_size is "
                                 f"{image_size}; set model.image_size to {img.shape[1]} or download at "
                                 f"image_size {image_size}")
            images.append(img)
            captions.append(caption)
            keys.append(s["__key__"])
        if not images:
            raise ValueError(f"{root}: no sample has a decodable image ({len(skipped)} undecodable, e.g. "
                             f"{[x.id for x in skipped[:3]]})")
        pairs = cls(torch.stack(images), captions, keys)
        pairs.skipped, pairs.total_samples = skipped, total
        return pairs

    def take_skips(self) -> list[SkippedSample]:
        """The samples left out (the training loop counts them once; later calls give them again, harmlessly)."""
        return list(self.skipped)


class CachedPairs:
    """campe.cache's training data: image shards zipped with their cached frozen LM states (cache_dir), or with the
    token layouts only (cache_dir None: online). Each rank reads its own shards (campe.cache.open_training_data).
    Samples whose image does not decode are left out of the batches; take_skips() hands them to the training
    loop."""

    def __init__(self, shards_dir: str, cache_dir: str | None, encoder: Any, num_workers: int = 0):
        from campe.cache import open_training_data
        self._open = open_training_data
        self.shards_dir, self.cache_dir, self.encoder, self.num_workers = shards_dir, cache_dir, encoder, num_workers
        # Opening checks the cache against the encoder (CacheMismatchError names the differing field): fail now.
        self._all = open_training_data(shards_dir, cache_dir, encoder, rank=0, world_size=1, shuffle_seed=0, epoch=0)
        self._skipped: list[SkippedSample] = []

    @property
    def total_samples(self) -> int:
        return self._all.total_samples

    def take_skips(self) -> list[SkippedSample]:
        """The samples left out since the last call, from the batches read so far."""
        out, self._skipped = self._skipped, []
        return out

    def batches_per_epoch(self, batch_size: int) -> int:
        """Global batches in an epoch over all shards (with DDP a rank's shards can hold a few more or fewer
        samples in a given epoch; the loop stops every rank when the first runs out)."""
        return self._all.num_samples // batch_size

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                      start: int = 0) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        from campe.cache import BatchStream, identity
        ds = self._open(self.shards_dir, self.cache_dir, self.encoder, rank=rank, world_size=world_size,
                        shuffle_seed=seed, epoch=epoch)
        # Each worker collates full batches of decodable samples (what batch_size=b, drop_last=True would give),
        # so a skipped sample never leaves a batch short. The loader's own generator: worker seeds never draw from
        # (and never shift) the global RNG.
        loader = DataLoader(BatchStream(ds, batch_size // world_size), batch_size=None, collate_fn=identity,
                            num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        i = 0
        for batch in loader:
            self._skipped.extend(batch.pop("skipped"))
            if "images" not in batch:  # samples left out after a worker's last full batch
                continue
            if i >= start:  # resume: the same stream, the consumed batches skipped
                yield batch
            i += 1


def _cache_available() -> bool:
    try:
        import campe.cache  # noqa: F401
        return True
    except ImportError:
        return False


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, PromptLayout) or (hasattr(x, "to") and not isinstance(x, (str, bytes, nn.Module))):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], str):
        return type(x)(_to_device(v, device) for v in x)
    return x


# ---------------------------------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) -> process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        return DistInfo(0, 1, 0, dev)
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, here)


def _all_have(flag: bool, info: DistInfo) -> bool:
    """True when every rank has `flag` (ranks whose streams end at different lengths stop together)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


# ---------------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---------------------------------------------------------------------------------------------------- MLflow

class Tracker:
    """One MLflow run through explicit run ids (MlflowClient), never the fluent thread-local active run."""

    def __init__(self, tp: TrainParams, run_id: str | None = None, config_hash: str = "", base_dir: str = ""):
        """A new run (named train/<method>/<UTC date> unless train.run_name is set, tagged with the git commit and
        `campe.config_hash`, the resolved config's hash that is also its `params_hash` param) or, with run_id, the
        run a resumed training continues. (`campe.params_hash` is the flow's tag: the raw params sections' sha256.)"""
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=store_uri(tp.tracking_uri, base_dir or None))
        exp = self.client.get_experiment_by_name(tp.experiment)
        if exp is None:
            location = (Path(base_dir or ".", tp.artifact_root).resolve() / tp.experiment).as_uri()
            exp_id = self.client.create_experiment(tp.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            from campe.io import git_commit, utc_stamp
            tags = {"method": tp.method, "campe.stage": "train", "campe.config_hash": config_hash}
            commit = git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = commit
            run = self.client.create_run(exp_id, run_name=tp.run_name or f"train/{tp.method}/{utc_stamp()}",
                                         tags=tags)
            self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, rows: list[dict[str, float]]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(r["step"])) for r in rows for k, v in r.items()
                 if k != "step" and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------------- outputs

def _write_log(path: Path, rows: list[dict[str, float]], keep_upto: int | None = None) -> None:
    """Append rows to the CSV log (header from the first row); keep_upto: first drop rows past that step."""
    if keep_upto is not None and path.exists():
        with path.open() as f:
            old = [r for r in csv.DictReader(f) if int(float(r["step"])) <= keep_upto]
        buf = io.StringIO()
        if old:
            w = csv.DictWriter(buf, fieldnames=list(old[0]))
            w.writeheader()
            w.writerows(old)
        atomic_write_bytes(path, buf.getvalue().encode())
    if not rows:
        return
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def read_log(path: str | Path) -> list[dict[str, float]]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def plot_loss_curve(rows: list[dict[str, float]], out_png: str | Path, title: str = "") -> Path:
    """Each "*loss" column of the log against the step (log-scale y when all positive)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in rows[0] if k == "loss" or k.endswith("_loss")] if rows else []
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for k in keys:
        ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k, lw=1.8 if k == "loss" else 1.0)
    if rows and all(r.get(k, 1.0) > 0 for r in rows for k in keys):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)


def _torch_save_atomic(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_trained_model(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CLIPModel, RunConfig]:
    """The final model of a training run (model.pt + train_config.json) with the online text tower, in eval mode:
    model.encode_text takes captions (vanilla) or campe.multiprompt layouts/captions (LM methods)."""
    out_dir = Path(out_dir)
    for name in (FINAL, "train_config.json"):
        if not (out_dir / name).exists():
            raise FileNotFoundError(f"{out_dir / name}: not found; is {out_dir} the out_dir of a finished "
                                    f"`campe train`?")
    saved = json.loads((out_dir / "train_config.json").read_text())["config"]
    cfg = resolve_run_config({k: saved[k] or {} for k in TRAIN_SECTIONS},
                             str(out_dir / "train_config.json"))
    model, _, _ = build_run_model(cfg, "plain")
    state = torch.load(out_dir / FINAL, map_location="cpu", weights_only=True)["model"]
    load_trainable_state(model, _uncached_names(state, model), str(out_dir / FINAL))
    return model.to(device).eval(), cfg


def _uncached_names(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a CachedTextTower-wrapped state ("text.<attr>.x") onto the plain tower ("text.x") when needed."""
    names = set(model.state_dict())
    if all(k in names for k in state):
        return state
    out = {}
    for k, v in state.items():
        if k not in names and k.startswith("text."):
            parts = k.split(".")
            alt = ".".join(parts[:1] + parts[2:])
            if alt in names:
                k = alt
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------- the loop

def _progress_enabled(tp: TrainParams, info: DistInfo) -> bool:
    return info.main and tp.progress and os.environ.get("CAMPE_NO_PROGRESS", "") not in ("1", "true")


def train(cfg: RunConfig, *, source: Any = None, model: CLIPModel | None = None, resume: bool = False,
          stop_at: int | None = None, checkpoint_at_stop: bool = True) -> dict[str, Any]:
    """Train `cfg`; returns {"step", "steps", "samples_per_s", "final": {term: value}, "run_id", "out_dir"}.

    source: None = the shards of cfg.train.shards_dir (through campe.cache, cached or online, for LM methods when
    it is installed; else decoded into memory), or any object with batches_per_epoch(batch_size) and
    epoch_batches(epoch, batch_size, seed, rank, world_size, start) (see MemoryPairs).
    model: train this model in place (from build_run_model(cfg, ...)) instead of building one.
    resume: continue from out_dir/ckpt_last.pt when it exists (else start fresh).
    stop_at: stop after this step (with a checkpoint, or, checkpoint_at_stop=False, as if killed there).
    """
    tp = cfg.train
    info = init_distributed(tp.device)
    try:
        with _out_dir_lock(tp.out_dir, info):
            return _train(cfg, info, source, model, resume, stop_at, checkpoint_at_stop)
    finally:
        if info.initialised_here:
            dist.destroy_process_group()


@contextlib.contextmanager
def _out_dir_lock(out_dir: str, info: DistInfo) -> Iterator[None]:
    """Rank 0 holds out_dir's lock (campe.io.output_lock) for the run (only rank 0 writes there); every rank learns
    whether it got it, so on a refusal all ranks stop at once and none waits in a collective."""
    with contextlib.ExitStack() as stack:
        error = None
        if info.main:
            try:
                stack.enter_context(output_lock(out_dir, "campe train"))
            except OutputInUse as e:
                error = str(e)
        if info.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            if info.main:
                raise OutputInUse(error)
            raise SystemExit(1)  # rank 0 reports it: one line, not one per rank
        yield


def _train(cfg: RunConfig, info: DistInfo, source: Any, model: CLIPModel | None, resume: bool,
           stop_at: int | None, checkpoint_at_stop: bool) -> dict[str, Any]:
    tp = cfg.train
    out = Path(tp.out_dir)
    if tp.batch_size % info.world_size:
        raise ValueError(f"train.batch_size {tp.batch_size} is not divisible by the {info.world_size} ranks")
    if info.main:
        out.mkdir(parents=True, exist_ok=True)

    # LM methods read the shards through campe.cache (cached frozen states, or online); the vanilla tower and
    # explicit sources take captions.
    mode = "plain"
    if source is None and cfg.text_encoder is not None and _cache_available():
        mode = "cached" if tp.cache_dir else "online"
    if model is None:
        model, resolved, encoder = build_run_model(cfg, mode)
    else:
        mode = "cached" if type(model.text).__name__ == "CachedTextTower" else "plain"
        encoder = getattr(model.text, "encoder", model.text)
        resolved = {"name": "default", **dataclasses.asdict(model.cfg)}
        if cfg.text_encoder is not None:
            resolved.update(text_encoder="multiprompt", text_tower_config=dataclasses.asdict(cfg.text_encoder))
    if source is None:
        if mode != "plain":
            source = CachedPairs(tp.shards_dir, tp.cache_dir or None, encoder, tp.num_workers)
        else:
            source = MemoryPairs.from_shards(tp.shards_dir, cfg.model.image_size)
    text_input = _text_input_fn(cfg, model, mode)
    model.to(info.device)

    per_epoch = source.batches_per_epoch(tp.batch_size)
    if per_epoch < 1:
        raise ValueError(f"the training data has fewer pairs than one batch ({tp.batch_size}); lower "
                         f"train.batch_size")
    total = tp.steps or tp.epochs * per_epoch
    optimizer = make_optimizer(model, tp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tp.warmup_steps, total, tp.min_lr_ratio))

    # Seeds (the weight init has its own seeds): dropout and anything random in the loop, per rank.
    torch.manual_seed(tp.seed + info.rank)
    np.random.seed((tp.seed + info.rank) % 2**32)
    random.seed(tp.seed + info.rank)

    step, epoch, batch_in_epoch, run_id, resume_rng = 0, 0, 0, None, None
    # Samples left out because their image does not decode: id -> reason, in the order found, the same on every
    # rank (gathered at each flush). A set, so the epochs and a resume's replayed batches count each sample once.
    skipped: dict[str, str] = {}
    take_skips = getattr(source, "take_skips", lambda: [])
    total_samples = getattr(source, "total_samples", None)
    ckpt_path = out / CKPT
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["config_hash"] != cfg.hash(runtime=False):
            raise ValueError(f"{ckpt_path}: written by another config (hash {ck['config_hash']}, now "
                             f"{cfg.hash(runtime=False)}); resume with the same params, or use a new out_dir")
        load_trainable_state(model, ck["model"], str(ckpt_path))
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        step, epoch, batch_in_epoch, run_id = ck["step"], ck["epoch"], ck["batch_in_epoch"], ck["mlflow_run_id"]
        skipped.update(ck.get("skipped", {}))
        resume_rng = ck["rng"][info.rank] if len(ck["rng"]) == info.world_size else None
        if resume_rng is None and info.main:
            print(f"campe train: resuming on {info.world_size} ranks from {len(ck['rng'])}: RNG streams reseeded "
                  f"(not bit-identical)", file=sys.stderr)
        if info.main:
            _write_log(out / LOG_FILE, [], keep_upto=step)  # drop rows a killed run logged after its checkpoint
    elif info.main:
        (out / LOG_FILE).unlink(missing_ok=True)

    ddp = model
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.model.video_pool == "attn")  # the temporal pool is idle on images
    objective = CampeObjective.from_config(cfg.loss, info.rank, info.world_size)

    tracker = None
    if info.main:
        config_dict = cfg.to_dict()
        save_config(resolved, out / "model_config.json")
        atomic_write_json(out / "train_config.json", {"config": config_dict, "params_hash": cfg.hash(),
                                                      "resume_hash": cfg.hash(runtime=False)})
        if tp.tracking_uri:
            tracker = Tracker(tp, run_id, config_hash=cfg.hash(), base_dir=cfg.base_dir)
            new_run, run_id = run_id is None, tracker.run_id
            (out / RUN_ID_FILE).write_text(run_id + "\n")
            if new_run:
                tracker.log_params({**flatten_config(config_dict), "params_hash": cfg.hash(),
                                    "world_size": info.world_size, "total_steps": total,
                                    "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                if p.requires_grad)})

    global_b = tp.batch_size
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=tp.precision == "bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    pending: list[tuple[int, int, float, dict[str, torch.Tensor]]] = []  # (step, epoch, lr, terms) to flush
    bar = None
    if _progress_enabled(tp, info):
        from tqdm import tqdm
        bar = tqdm(total=total * global_b, initial=step * global_b, unit="sample", unit_scale=True,
                   dynamic_ncols=True, mininterval=1.0, desc=f"train {cfg.method}")

    def note_skips() -> None:
        """Gather the samples left out since the last call (every rank's), warn about new ones, and stop every
        rank alike once they pass train.max_skip_fraction of the data."""
        new = take_skips()
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
        if total_samples:
            check_skip_fraction(len(skipped), total_samples, tp.max_skip_fraction, "campe train", skipped,
                                "train.max_skip_fraction")

    def flush(window_start: float, window_steps: int) -> None:
        note_skips()  # on every rank at the same steps (a collective under DDP), before any checkpoint
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
        rate = window_steps * global_b / max(1e-9, time.perf_counter() - window_start)
        rows = []
        for (s, e, lr, _), v in zip(pending, vals.cpu().tolist()):
            row = {"step": s, "epoch": e, "lr": lr, **dict(zip(keys, v)), "samples_per_s": rate}
            row["loss"] = sum(x for k, x in row.items() if k.endswith("_loss"))
            rows.append(row)
        pending.clear()
        if info.main:
            _write_log(out / LOG_FILE, rows)
            if tracker is not None:
                tracker.log_metrics(rows)

    def checkpoint() -> None:
        states = [None] * info.world_size
        if info.world_size > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if info.main:
            _torch_save_atomic({"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                                "batch_in_epoch": batch_in_epoch, "rng": states, "mlflow_run_id": run_id,
                                "skipped": dict(skipped),
                                "config_hash": cfg.hash(runtime=False), "world_size": info.world_size},
                               ckpt_path)

    status = "FAILED"
    start_step = step
    if resume_rng is not None:
        set_rng_state(resume_rng)  # last thing before the loop: nothing above may shift the restored streams
    t_start = window_start = time.perf_counter()
    window_steps = 0
    try:
        batches = source.epoch_batches(epoch, tp.batch_size, tp.seed, info.rank, info.world_size, batch_in_epoch)
        empty_epochs = 0
        while step < total and (stop_at is None or step < stop_at):
            batch = next(batches, None)
            if not _all_have(batch is not None, info):
                epoch, batch_in_epoch = epoch + 1, 0
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError("an epoch of the training data gave no batch; check train.batch_size")
                batches = source.epoch_batches(epoch, tp.batch_size, tp.seed, info.rank, info.world_size, 0)
                continue
            empty_epochs = 0
            model.train()
            images = _to_device(batch["images"], info.device)
            text = _to_device(text_input(batch), info.device)
            with autocast:
                terms = objective(ddp(images=images, text=text))
            loss = total_loss(terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tp.grad_clip if tp.grad_clip > 0 else float("inf"))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale_()
            step += 1
            batch_in_epoch += 1
            window_steps += 1
            logged = {k: v.detach() for k, v in terms.items()}
            logged["grad_norm"] = grad_norm.detach()
            pending.append((step, epoch, lr, logged))
            if bar is not None:
                bar.update(global_b)
                if step % tp.log_every == 0 or step == total:
                    bar.set_postfix(step=step, loss=f"{float(loss.detach()):.4f}", refresh=False)
            if step % tp.log_every == 0:
                flush(window_start, window_steps)
                window_start, window_steps = time.perf_counter(), 0
            if tp.ckpt_every and step % tp.ckpt_every == 0 and step < total:
                flush(window_start, window_steps)
                checkpoint()
        if step < total:  # stop_at: paused (or, checkpoint_at_stop=False, as if killed); the MLflow run stays open
            status = "RUNNING"
            if checkpoint_at_stop:
                flush(window_start, window_steps)
                checkpoint()
            return {"step": step, "steps": total, "stopped": True, "run_id": run_id, "out_dir": str(out)}
        flush(window_start, window_steps)
        checkpoint()
        summary = _finish(cfg, info, model, resolved, out, tracker, step, total, start_step,
                          time.perf_counter() - t_start, run_id, skipped, total_samples)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None and status != "RUNNING":
            tracker.end(status)


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
            total_samples: int | None) -> dict[str, Any]:
    tp = cfg.train
    samples_per_s = (step - start_step) * tp.batch_size / max(elapsed, 1e-9)
    skip_fraction = round(len(skipped) / total_samples, 6) if total_samples else 0.0
    summary: dict[str, Any] = {"step": step, "steps": total, "samples_per_s": round(samples_per_s, 2),
                               "seconds": round(elapsed, 2), "run_id": run_id, "out_dir": str(out),
                               "skipped_samples": len(skipped)}
    if not info.main:
        return summary
    rows = read_log(out / LOG_FILE)  # the whole run, across resumes
    last = rows[-tp.log_every:] if rows else []
    final = {k: sum(r[k] for r in last) / len(last) for k in last[0]
             if k not in ("step", "epoch", "samples_per_s")} if last else {}
    summary["final"] = {k: round(v, 6) for k, v in final.items()}
    _torch_save_atomic({"model": trainable_state(model), "config": resolved, "step": step}, out / FINAL)
    plot_loss_curve(rows, out / "loss_curve.png", title=f"{cfg.method} ({cfg.loss.kind})")
    metrics = {"steps": step, "samples_per_s": summary["samples_per_s"], "world_size": info.world_size,
               "skipped_samples": len(skipped), "skipped_fraction": skip_fraction,
               **{f"final_{k}": v for k, v in summary["final"].items()}}
    atomic_write_json(out / "metrics.json", metrics)
    if tp.metrics_file:
        atomic_write_json(tp.metrics_file, metrics)
    if tracker is not None:
        tracker.log_metrics([{"step": step, "samples_per_s_run": samples_per_s, "skipped_samples": len(skipped),
                              "skipped_fraction": skip_fraction}])
        for name in ("train_config.json", "model_config.json", FINAL, "loss_curve.png", LOG_FILE, "metrics.json"):
            tracker.log_artifact(out / name)
    return summary
