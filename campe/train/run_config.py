"""What a training run is: the methods table (the paper's method and its baselines), the `train` params section,
and the resolved run config.

    from campe.train.run_config import resolve_run_config, METHODS, TRAIN_SECTIONS
    cfg = resolve_run_config({"text_encoder": {...}, "model": {...}, "loss": {...}, "train": {...}})  # params.yaml

`train.method` picks the paper's method or a baseline; METHODS below is the one table of what each switch changes
(text tower pooling/negation, loss weights). The contrastive switch is `loss.kind` (softmax | sigmoid); the model's
`contrastive` follows it. TRAIN_SECTIONS: the params sections one training run reads. `cfg.hash()` is the resolved
config's hash (`runtime=False`: without the fields that may change between a run and its resume).

The joint dimension is model.embed_dim alone (the text encoder gets it when it is built); model.text_tower_kind
(vanilla | multiprompt) follows train.method. The old keys text_encoder.embed_dim and model.text_encoder are still
read (params files, saved runs) and must agree.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import Any

from campe.core.config import ConfigError, from_dict
from campe.core.io import json_sha256
from campe.core.losses import LossConfig
from campe.data.imageprep import DEFAULT_MAX_SKIP_FRACTION, validate_max_skip_fraction
from campe.model import IMAGE_TOWERS, ModelConfig
from campe.text.multiprompt import MultiPromptConfig


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
    "vanilla": {"text_encoder": None, "model": {"text_tower_kind": "vanilla"}, "loss": _NO_AUX},
    "mean": {"text_encoder": {"pooling": "mean", "negation": False}, "loss": _NO_AUX},  # LM + mean pool
    # mean pooling with LoRA adapters on the frozen LM (peft), the paper's strongest baseline: online only
    "mean_lora": {"text_encoder": {"pooling": "mean", "negation": False, "lora": True}, "loss": _NO_AUX},
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
DERIVED = {("model", "contrastive"): "loss.kind", ("model", "text_tower_kind"): "train.method"}


@dataclass
class TrainParams:
    """params.yaml section `train`."""
    method: str = "multi_prompt_div_neg"  # one of METHODS
    shards_dir: str = "data/shards/train"  # the download stage's webdataset shards
    cache_dir: str = "data/cache/train"  # frozen LM states from the cache stage; "" = compute them online
    out_dir: str = "data/models/campe"
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
    keep_in_memory: bool = False  # keep the samples (decoded images, cached states) after the first epoch: later
    # epochs read no tar, parquet or JPEG (same batches; needs num_workers 0 and the RAM: ~0.4 GB for the default)
    log_every: int = 10  # steps between metric flushes (every step is logged; this sets how often)
    ckpt_every: int = 200  # steps between checkpoints (and one at the end); 0 = only at the end
    progress: bool = True  # tqdm bar (samples/s, ETA) on rank 0; CAMPE_NO_PROGRESS=1 also turns it off
    tracking_uri: str = "sqlite:///mlflow.db"  # MLflow store (a relative one: beside the params file); "" = none
    experiment: str = "campe"
    artifact_root: str = "mlartifacts"  # a new experiment stores its artifacts in <artifact_root>/<experiment>
    run_name: str = ""  # MLflow run name; "" = train/<method>/<UTC date>
    register_model: str = ""  # also register the run's MLflow Model under this name in the store's Model Registry
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION  # undecodable images: stop once more than this fraction
    apt_lr_mult: float = 1.0  # the APT vectors' lr = lr x this (campe/train/optim.py)
    image_tower: str = "scratch"  # scratch (ViT from scratch) | locked (frozen EfficientNet-Lite0 features, cached)
    image_features_dir: str = "data/cache/image_features"  # locked: the feature cache (built when missing)
    patience: int = 0  # early stopping: stop once the val loss has not improved for this many evaluations; 0 = off
    val_every: int = 0  # steps between val-loss evaluations (patience > 0); 0 = once per epoch
    val_set: str = "data/generated/dataset_karpathy.json"  # patience > 0: its "val" split gives the val loss
    schedule_epochs: int = 0  # the cosine decay spans this many epochs, then the lr stays at lr * min_lr_ratio;
    # 0 = the whole run (steps / epochs). With early stopping: a max epochs above it runs on at the final lr.

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
        if self.apt_lr_mult <= 0:
            raise ValueError(f"apt_lr_mult must be > 0, got {self.apt_lr_mult}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0 and self.eps > 0):
            raise ValueError("beta1 and beta2 must be in [0, 1) and eps > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision '{self.precision}' is not one of: {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device '{self.device}' is not one of: auto, cpu, cuda")
        validate_max_skip_fraction(self.max_skip_fraction)
        if self.image_tower not in IMAGE_TOWERS:
            raise ValueError(f"image_tower '{self.image_tower}' is not one of: {', '.join(IMAGE_TOWERS)}")
        if self.schedule_epochs < 0:
            raise ValueError(f"schedule_epochs must be >= 0 (0 = the whole run), got {self.schedule_epochs}")
        if self.patience < 0 or self.val_every < 0:
            raise ValueError(f"patience and val_every must be >= 0, got {self.patience}, {self.val_every}")
        if self.keep_in_memory and self.num_workers:
            raise ValueError("keep_in_memory needs num_workers 0 (each epoch's loader workers would read the "
                             "samples again)")
        if self.patience and not self.val_set:
            raise ValueError("patience > 0 needs val_set (a Karpathy-split JSON with a 'val' split)")


# Fields that may change between a run and its resume (they do not change the numbers).
RUNTIME_FIELDS = ("shards_dir", "cache_dir", "out_dir", "metrics_file", "num_workers", "log_every", "ckpt_every",
                  "keep_in_memory", "progress", "tracking_uri", "experiment", "artifact_root", "run_name", "device",
                  "max_skip_fraction", "image_features_dir", "val_set", "register_model")
# Fields added after runs existed, hashed only when set to another value than this one: the hash of a config that
# leaves them at their defaults (and the resume and finished-cell checks built on it) stays what it was.
HASHED_IF_NOT = {("text_encoder", "apt_placeholder"): "shared", ("text_encoder", "apt_entry"): "first_trainable",
                 ("text_encoder", "apt_init_noise"): 0.02, ("loss", "div_space"): "heads",
                 ("train", "apt_lr_mult"): 1.0, ("train", "image_tower"): "scratch", ("train", "patience"): 0,
                 ("train", "val_every"): 0, ("text_encoder", "lora"): False, ("text_encoder", "lora_r"): 8,
                 ("text_encoder", "lora_alpha"): 16, ("text_encoder", "lora_dropout"): 0.0,
                 ("text_encoder", "lora_targets"): [], ("train", "schedule_epochs"): 0}


@dataclass
class RunConfig:
    """Everything a training run needs, with the method's overrides applied.

    text_encoder None = the vanilla text tower, else the multi-prompt encoder's section (its D is model.embed_dim);
    model = ModelConfig fields (with text_tower_kind / contrastive derived), validated.
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
        """sha256 (12 hex) of the resolved config; runtime=False leaves out RUNTIME_FIELDS (resume check).

        Hashed in the layout of the config before D and the tower kind got one name each (text_encoder.embed_dim =
        model.embed_dim, model.text_encoder = text_tower_kind): the same config keeps its hash, so checkpoints and
        finished ablation cells written before still resume and are reused."""
        d = self.to_dict()
        d["model"]["text_encoder"] = d["model"].pop("text_tower_kind")
        if d["text_encoder"] is not None:
            d["text_encoder"]["embed_dim"] = self.model.embed_dim
        for (section, key), default in HASHED_IF_NOT.items():
            if d[section] is not None and d[section].get(key) == default:
                del d[section][key]
        if not runtime:
            d["train"] = {k: v for k, v in d["train"].items() if k not in RUNTIME_FIELDS}
        return json_sha256(d)[:12]


def resolve_run_config(sections: dict[str, dict[str, Any] | None], where: str = "params") -> RunConfig:
    """Raw params sections {"text_encoder", "model", "loss", "train"} (missing = defaults) -> RunConfig.

    Applies METHODS[train.method]; derives model.contrastive from loss.kind and model.text_tower_kind from the
    method (a section that states one of these, or the old text_encoder.embed_dim, must agree). Unknown keys,
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
        model_fields["text_tower_kind"] = "multiprompt"
    _check_derived(raw, model_fields, tp.method, where)
    model = from_dict(ModelConfig, model_fields, f"{where}:model")
    text = None
    if spec["text_encoder"] is not None:
        te_spec = {"lora": False, **spec["text_encoder"]}  # lora belongs to the method (mean_lora), like pooling
        _lora_online(te_spec["lora"], tp, where)
        for k, v in te_spec.items():
            # The cache stage builds its cache from this section as written: training from a cache, the section
            # must say what the method trains (online, the method's value simply wins).
            if tp.cache_dir and k in raw["text_encoder"] and raw["text_encoder"][k] != v:
                raise ConfigError(f"{where}:text_encoder: {k} is {raw['text_encoder'][k]!r} but method "
                                  f"'{tp.method}' trains with {k}: {json.dumps(v)}; set text_encoder.{k} to that "
                                  f"(campe cache builds the cache from this section), or train online "
                                  f"(train.cache_dir: '' / --cache none)")
        where_text = f"{where}:text_encoder (method '{tp.method}')"
        text = from_dict(MultiPromptConfig, {**raw["text_encoder"], **te_spec}, where_text)
        try:
            text.check_embed_dim(model.embed_dim)
        except ValueError as e:
            raise ConfigError(f"{where_text}: {e}") from None
        if text.apt_entry == "input" and tp.cache_dir:
            raise ConfigError(f"{where}:text_encoder: apt_entry 'input' sends the gradient through the frozen layers, "
                              f"so their states cannot be cached; train online (train.cache_dir: '' / --cache none) "
                              f"or use apt_entry: first_trainable")
    else:
        from_dict(MultiPromptConfig, raw["text_encoder"], f"{where}:text_encoder")  # still a valid section
    return RunConfig(tp.method, text, model, loss, tp)


def _lora_online(lora: bool, tp: TrainParams, where: str) -> None:
    """LoRA (method mean_lora) trains online: it changes every layer of the LM, so there are no frozen states to
    cache; a cache_dir (the params default) is ignored with a warning, and the resolved config says cache_dir ''."""
    if lora and tp.cache_dir:
        warnings.warn(f"{where}:train: method '{tp.method}' puts LoRA adapters into every layer of the LM, so it "
                      f"trains online: cache_dir '{tp.cache_dir}' is ignored (set train.cache_dir: '' or "
                      f"`campe train --cache none` to silence this)", stacklevel=3)
        tp.cache_dir = ""


def _check_derived(raw: dict[str, dict], model_fields: dict, method: str, where: str) -> None:
    stated = raw["model"].get("contrastive")
    if stated is not None and stated != model_fields["contrastive"]:
        raise ConfigError(f"{where}:model: contrastive '{stated}' disagrees with loss.kind "
                          f"'{model_fields['contrastive']}'; the switch is loss.kind (leave model.contrastive out)")
    for key in ("text_tower_kind", "text_encoder"):  # text_encoder: its old name
        stated = raw["model"].get(key)
        if stated is not None and (stated == "vanilla") != (method == "vanilla"):
            raise ConfigError(f"{where}:model: {key} '{stated}' disagrees with method '{method}'; the method "
                              f"picks the text tower (leave model.{key} out)")
    stated = raw["text_encoder"].get("embed_dim")
    want = model_fields.get("embed_dim", ModelConfig().embed_dim)
    if stated is not None and stated != want:
        raise ConfigError(f"{where}:text_encoder: embed_dim {stated} disagrees with model.embed_dim {want}; the "
                          f"joint dimension is model.embed_dim (leave text_encoder.embed_dim out)")
