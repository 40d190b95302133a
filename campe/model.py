"""CAMPE model: a ViT image/video tower with attention pooling, a vanilla CLIP text tower, and the CLIP wrapper.

    from campe.model import build_model, build_model_from_config, save_config
    model, cfg = build_model("default")                       # vanilla CLIP text tower (the paper's "Vanilla CLIP")
    model, cfg = build_model("default", text_tower=encoder)   # any tower that follows the contract below, e.g.
                                                              # campe.text.multiprompt.build_text_encoder(...)
    model, cfg = build_model("tiny", layers=1)                # named config + explicit overrides (unknown key: error)
    img = model.encode_image(images)      # [B,3,H,W] float in [0,1] (or uint8) -> [B,D] L2-normalised
    vid = model.encode_video(frames)      # [B,T,3,H,W]                          -> [B,D] L2-normalised
    pat = model.encode_patches(images)    # [B,3,H,W] -> [B,P,D] per-patch embeddings (each patch through the head)
    txt = model.encode_text(batch)        # {"text": [B,D], optionally "segments": [B,K,D/K], "negated": [B,D]}
    out = model(images=images, text=batch)  # what campe.core.losses.CampeObjective takes
    save_config(cfg, ckpt_dir / "model_config.json")          # resolved config next to the checkpoint
    model, cfg = build_model_from_config(load_config(ckpt_dir / "model_config.json"))   # same architecture and init

Images: the towers take RGB in [0,1] (float) or [0,255] (uint8) and normalise inside with (x - image_mean) /
image_std (0.5 / 0.5 by default, SigLIP style, so [-1,1]); do not normalise before calling.

Text-tower contract (the vanilla tower here and the multi-prompt LM tower both follow it):
    text_tower(batch) -> dict
        "text"     [B,D]     L2-normalised text embedding (required)
        "segments" [B,K,D/K] the K per-prompt parts (optional; for the diversity loss and aspect re-weighting).
                             The losses re-normalise each part, so per-prompt normalised vectors or the slices of
                             the normalised "text" are both fine.
        "negated"  [B,D]     L2-normalised embedding from the negated prompts (optional; negation-aware loss)
    `batch` is opaque to the wrapper (token ids, a prompt layout, cached hidden states, ...). Other keys are passed
    through. campe.text.multiprompt's names "embedding" / "neg_embedding" / "neg_segments" are accepted as aliases of
    "text" / "negated" / "negated_segments". A tower may expose `embed_dim` or `cfg.embed_dim` (checked at build).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from campe.core.config import from_dict
from campe.core.io import atomic_write_json
from campe.towers import TextConfig, VanillaTextTransformer, VisionConfig, VisionTransformer, load_tokenizer


VIDEO_POOLS = ("mean", "attn")
IMAGE_TOWERS = ("scratch", "locked")  # the ViT trained from scratch | LiT: frozen pretrained backbone (campe.locked)
CONTRASTIVE = ("softmax", "sigmoid")
TEXT_TOWERS = ("vanilla", "multiprompt", "external")
TEXT_ALIASES = {"embedding": "text", "neg_embedding": "negated", "neg_segments": "negated_segments"}


@dataclass
class ModelConfig:
    """Flat model config (one params.yaml section); vision_config() / text_config() give the towers' views.

    embed_dim is the one joint dimension: the towers (and the multi-prompt encoder) get it as a build argument.
    """
    # Saved configs and params files from before the rename: model.text_encoder is text_tower_kind.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"text_encoder": "text_tower_kind"}
    # vision tower
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    layers: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    image_mean: float = 0.5  # inputs in [0,1] are normalised inside: (x - mean) / std
    image_std: float = 0.5
    # video: the same tower on each frame, then pooled over time
    frames: int = 8
    video_pool: str = "mean"  # mean (frame features averaged) | attn (learned temporal attention pool)
    # joint embedding space
    embed_dim: int = 384  # D (the multi-prompt tower splits it into K parts of D/K)
    # text tower
    text_tower_kind: str = "vanilla"  # vanilla (built here) | multiprompt / external (passed as build_model's text_tower)
    text_tokenizer: str = "minilm"  # vanilla: "minilm" (packaged all-MiniLM-L6-v2 tokenizer) or a local folder
    vocab_size: int = 0  # vanilla: 0 = the tokenizer's size
    context_length: int = 64
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_mlp_ratio: float = 4.0
    # temperature (and bias) of the contrastive logits
    contrastive: str = "softmax"  # softmax (InfoNCE) | sigmoid (SigLIP: adds the learnable logit_bias)
    init_logit_scale: float = math.log(1 / 0.07)  # logits = exp(logit_scale) * cos (+ logit_bias)
    init_logit_bias: float = -10.0  # sigmoid only
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to this (open_clip)
    init_seed: int = 0  # seeds the weight initialisation

    def validate(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "embed_dim", "frames",
                     "context_length", "text_width", "text_layers", "text_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width ({self.text_width}) must be divisible by text_heads ({self.text_heads})")
        if self.mlp_ratio <= 0 or self.text_mlp_ratio <= 0:
            raise ValueError("mlp_ratio and text_mlp_ratio must be > 0")
        if self.image_std <= 0:
            raise ValueError(f"image_std must be > 0, got {self.image_std}")
        if self.video_pool not in VIDEO_POOLS:
            raise ValueError(f"video_pool '{self.video_pool}' is not one of: {', '.join(VIDEO_POOLS)}")
        if self.contrastive not in CONTRASTIVE:
            raise ValueError(f"contrastive '{self.contrastive}' is not one of: {', '.join(CONTRASTIVE)}")
        if self.text_tower_kind not in TEXT_TOWERS:
            raise ValueError(f"text_tower_kind '{self.text_tower_kind}' is not one of: {', '.join(TEXT_TOWERS)}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0 (0 = from the tokenizer), got {self.vocab_size}")
        if self.max_logit_scale <= 0 or self.init_logit_scale > math.log(self.max_logit_scale):
            raise ValueError(f"init_logit_scale ({self.init_logit_scale}) must be <= log(max_logit_scale) = "
                             f"{math.log(max(self.max_logit_scale, 1e-12)):.4f}")

    def vision_config(self) -> VisionConfig:
        names = {f.name for f in dataclasses.fields(VisionConfig)}
        return VisionConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def text_config(self, vocab_size: int, pad_id: int) -> TextConfig:
        return TextConfig(vocab_size=vocab_size, context_length=self.context_length, width=self.text_width,
                          layers=self.text_layers, heads=self.text_heads, mlp_ratio=self.text_mlp_ratio,
                          pad_id=pad_id)


# Named configs: overrides of the ModelConfig defaults.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},  # 64 px, patch 8 (64 patches), width 192, 4 layers: the 2-core CPU budget
    "tiny": dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=64, frames=4,
                 context_length=32, text_width=64, text_layers=2, text_heads=2),  # tests
}


# ---------------------------------------------------------------------------------------------------- CLIP

def _tower_embed_dim(tower: nn.Module) -> int | None:
    dim = getattr(tower, "embed_dim", None)
    if dim is None:
        dim = getattr(getattr(tower, "cfg", None), "embed_dim", None)
    return int(dim) if isinstance(dim, int) else None


class CLIPModel(nn.Module):
    """Image/video tower + text tower + learnable temperature (and SigLIP bias).

    logit_scale is stored as log(scale); `scale()` = exp(logit_scale) with the log clamped at log(max_logit_scale)
    (open_clip clamps to 100); call `clamp_logit_scale_()` after each optimizer step to keep the parameter itself in
    range. logit_bias exists only for contrastive="sigmoid" (an unused parameter would break DDP).
    """

    def __init__(self, vision: VisionTransformer, text_tower: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = vision
        self.text = text_tower
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.contrastive == "sigmoid" else None
        self.register_parameter("logit_bias", bias)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), at most max_logit_scale (scalar tensor, differentiable)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B,3,H,W] -> [B,D]."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_video(self, frames: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B,T,3,H,W] -> [B,D]."""
        x = self.visual.forward_video(frames)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_patches(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B,3,H,W] -> [B,P,D] per-patch embeddings (for patch-text similarity maps)."""
        x = self.visual.forward_patches(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, batch: Any) -> dict[str, torch.Tensor]:
        """-> {"text": [B,D] L2-normalised, optionally "segments" [B,K,D/K], "negated" [B,D], ...}."""
        out = self.text(batch)
        if not isinstance(out, dict):
            raise ValueError(f"text tower {type(self.text).__name__} returned {type(out).__name__}; it must return "
                             f"a dict with 'text' [B,D] (see the contract atop campe/model.py)")
        out = {TEXT_ALIASES.get(k, k): v for k, v in out.items()}
        text = out.get("text")
        D = self.cfg.embed_dim
        if text is None or text.ndim != 2 or text.shape[1] != D:
            got = "no 'text' entry" if text is None else f"'text' of shape {list(text.shape)}"
            raise ValueError(f"text tower {type(self.text).__name__} gave {got}; expected [B,{D}] "
                             f"(embed_dim={D}): build the tower with the same embed_dim")
        for key in ("segments", "negated"):
            v = out.get(key)
            if v is not None and (v.shape[0] != text.shape[0] or v.shape[-1] * (v.shape[1] if key == "segments"
                                                                               else 1) != D):
                raise ValueError(f"text tower {type(self.text).__name__}: '{key}' has shape {list(v.shape)}, "
                                 f"expected {'[B,K,D/K]' if key == 'segments' else '[B,D]'} with D={D}")
        return out

    def forward(self, images: torch.Tensor | None = None, text: Any = None,
                videos: torch.Tensor | None = None) -> dict[str, Any]:
        """-> {"image_features" [B,D] (from images, or videos [B,T,3,H,W]), "text_features" [B,D], "segments",
        "negated" (when the tower gives them), "logit_scale" (exp'd, clamped), "logit_bias" (sigmoid)}."""
        out: dict[str, Any] = {"logit_scale": self.scale()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if images is not None and videos is not None:
            raise ValueError("pass images or videos, not both")
        if images is not None:
            out["image_features"] = self.encode_image(images)
        elif videos is not None:
            out["image_features"] = self.encode_video(videos)
        if text is not None:
            t = self.encode_text(text)
            out["text_features"] = t.pop("text")
            out.update(t)
        return out


# ---------------------------------------------------------------------------------------------------- factory

def resolve_config(name: str, **overrides: Any) -> ModelConfig:
    """Named config + overrides -> validated ModelConfig (unknown keys and bad values: ValueError naming them)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config '{name}'; known: {', '.join(CONFIGS)}")
    return from_dict(ModelConfig, {**CONFIGS[name], **overrides}, f"model config '{name}' + overrides")


def build_model(name: str = "default", text_tower: nn.Module | None = None, tokenizer: Any = None,
                image_tower: str = "scratch", **overrides: Any) -> tuple[CLIPModel, dict[str, Any]]:
    """Build a CLIPModel from named config `name` plus `overrides` (ModelConfig fields).

    text_tower=None builds the vanilla CLIP text tower (tokenizer: `tokenizer` or cfg.text_tokenizer); otherwise
    the given tower (the multi-prompt LM tower) is used as is. image_tower: "scratch" (the ViT) or "locked"
    (campe.locked.LockedImageTower: frozen pretrained backbone + trainable head). Returns (model, resolved config
    dict): ModelConfig fields plus "name", "image_tower" (and "text_tower_config" for a passed tower with a
    dataclass cfg). Save it with save_config.
    """
    if image_tower not in IMAGE_TOWERS:
        raise ValueError(f"image_tower '{image_tower}' is not one of: {', '.join(IMAGE_TOWERS)}")
    if text_tower is not None and not isinstance(text_tower, nn.Module):
        raise ValueError(f"text_tower must be an nn.Module (the tower itself), got {text_tower!r}; the config field "
                         f"naming the kind of text tower is text_tower_kind")
    cfg = resolve_config(name, **overrides)
    extra: dict[str, Any] = {}
    if text_tower is not None:
        kind = "multiprompt" if type(text_tower).__name__ == "MultiPromptTextEncoder" else "external"
        cfg = dataclasses.replace(cfg, text_tower_kind=kind)
        dim = _tower_embed_dim(text_tower)
        if dim is not None and dim != cfg.embed_dim:
            raise ValueError(f"text tower {type(text_tower).__name__} has embed_dim {dim} but the model config has "
                             f"embed_dim {cfg.embed_dim}; pass embed_dim={dim} or rebuild the tower")
        tower_cfg = getattr(text_tower, "cfg", None)
        if dataclasses.is_dataclass(tower_cfg):
            extra["text_tower_config"] = dataclasses.asdict(tower_cfg)
    elif cfg.text_tower_kind != "vanilla":
        raise ValueError(f"text_tower_kind '{cfg.text_tower_kind}' is built elsewhere: pass the tower, e.g. "
                         f"build_model({name!r}, text_tower=campe.text.multiprompt.build_text_encoder(...))")
    else:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.text_tokenizer)
        vocab = cfg.vocab_size or len(tokenizer)
        if vocab < len(tokenizer):
            raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens; "
                             f"set vocab_size: 0 to take it from the tokenizer")
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
    # Initialise from the config's seed without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        vision = VisionTransformer(cfg.vision_config(), cfg.embed_dim)
        if text_tower is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            text_tower = VanillaTextTransformer(cfg.text_config(cfg.vocab_size, pad), cfg.embed_dim, tokenizer)
        model = CLIPModel(vision, text_tower, cfg)
    if image_tower == "locked":  # built after the ViT, so the text tower's initialisation is the same either way
        from campe.locked import LockedImageTower
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model.visual = LockedImageTower(cfg.vision_config(), embed_dim=cfg.embed_dim)
    return model, {"name": name, "image_tower": image_tower, **dataclasses.asdict(cfg), **extra}


def config_from_dict(resolved: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A resolved config dict (build_model / load_config) -> (name, build_model keyword arguments: ModelConfig
    fields and image_tower). A config saved before the rename names the text tower's kind `text_encoder`: it is read
    as text_tower_kind (the two must agree); one saved before image_tower was recorded is a scratch ViT."""
    d = dict(resolved)
    name = d.pop("name", "default")
    d.pop("text_tower_config", None)  # the passed tower's own config (its embed_dim, if an old one has it, is D)
    d.setdefault("image_tower", "scratch")
    for old, new in ModelConfig.RENAMED_KEYS.items():
        if old in d:
            value = d.pop(old)
            if d.setdefault(new, value) != value:
                raise ValueError(f"model config: {old} (the old name of {new}) is {value!r} but {new} is {d[new]!r}")
    return name, d


def build_model_from_config(resolved: dict[str, Any], text_tower: nn.Module | None = None,
                            tokenizer: Any = None) -> tuple[CLIPModel, dict[str, Any]]:
    """Rebuild the model a resolved config describes (same architecture, same initialisation)."""
    name, fields = config_from_dict(resolved)
    if text_tower is not None:
        fields.pop("text_tower_kind", None)
    return build_model(name, text_tower=text_tower, tokenizer=tokenizer, **fields)


def save_config(cfg: dict[str, Any] | ModelConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically), e.g. next to a checkpoint."""
    atomic_write_json(path, dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model config not found (save_config writes it next to each checkpoint)")
    return json.loads(path.read_text())
