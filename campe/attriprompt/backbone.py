"""The frozen dual encoder behind one small interface, and its transformers-CLIPModel implementation.

    bb = load_backbone("path/to/clip-folder")               # any folder CLIPModel.from_pretrained loads
    ids, eos = bb.tokenize(["a photo of a cat."])            # (C, L), (C,)
    t = bb.encode_text(ids, eos, prompts={0: p0, 1: p1})     # prompts[i]: (G, n, d_t) -> features (G, C, D)
    f, layers = bb.encode_image(pixels)                      # (B, D), [(B, 1+N, d_v)] * vision layers

Deep text prompting, IVLP/PromptSRC "replace" style: n prompt slots sit right after the start token; before text
block i (i in `prompts`) those n positions are overwritten with prompts[i]; prompts[0] replaces the slots' token
embeddings (positions are then added, as for any token). The causal mask is CLIP's own (create_causal_mask), the
pooling index is taken from the unprompted token ids by the same rule as transformers' CLIPTextTransformer
(eos_token_id == 2: the legacy argmax of the ids; otherwise the first occurrence of config eos_token_id) and shifted
by n. The backbone is frozen: no parameter of it requires grad, and it stays in eval mode.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Backbone(nn.Module):
    """What the methods use of a frozen CLIP. Sizes: embed_dim D, text_width d_t, vision_width d_v,
    text_layers, vision_layers. logit_scale: the temperature tau (already exp'ed, a float)."""

    embed_dim: int
    text_width: int
    vision_width: int
    text_layers: int
    vision_layers: int
    logit_scale: float

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor, eos: torch.Tensor,
                    prompts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def vision_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        raise NotImplementedError


def pooling_index(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(C, L) ids -> (C,) end-of-text positions, exactly as transformers' CLIPTextTransformer picks them."""
    if eos_token_id == 2:  # legacy configs (before transformers PR #24773): the highest id is the end token
        return ids.to(torch.int).argmax(dim=-1).long()
    hit = ids.to(torch.int) == eos_token_id
    if not bool(hit.any(dim=-1).all()):
        raise ValueError(f"a tokenized text has no end-of-text token (config eos_token_id {eos_token_id})")
    return hit.int().argmax(dim=-1).long()


class HFCLIPBackbone(Backbone):
    """transformers.CLIPModel (+ its tokenizer and image processor), frozen, with deep text prompting."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any, folder: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.processor, self.folder = tokenizer, processor, folder
        tc, vc = model.config.text_config, model.config.vision_config
        self.embed_dim = model.config.projection_dim
        self.text_width, self.vision_width = tc.hidden_size, vc.hidden_size
        self.text_layers, self.vision_layers = tc.num_hidden_layers, vc.num_hidden_layers
        self.max_length = tc.max_position_embeddings
        self.eos_token_id = model.text_model.eos_token_id
        self.logit_scale = float(model.logit_scale.detach().exp())

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def train(self, mode: bool = True) -> "HFCLIPBackbone":
        return super().train(False)  # frozen: dropout etc. stay off whatever the caller asks

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> ids (C, L) padded to the longest, and the pooling index (C,)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        try:
            return ids, pooling_index(ids, self.eos_token_id)
        except ValueError as e:
            raise ValueError(f"{self.folder}: {e}; the tokenizer must end each text with the token whose id the "
                             f"config.json text_config.eos_token_id names") from None

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings.token_embedding(ids)

    def _insert(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """x (G, C, L, d), p (G, n, d): overwrite positions 1..n (after the start token) with p."""
        G, C, _, d = x.shape
        n = p.shape[1]
        return torch.cat([x[:, :, :1], p[:, None].expand(G, C, n, d), x[:, :, 1 + n:]], dim=2)

    def encode_text(self, ids: torch.Tensor, eos: torch.Tensor,
                    prompts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """ids (C, L) and eos (C,) of the unprompted texts; prompts {text block: (G, n, d_t)} (block 0 = the input
        embeddings, required when any is given; blocks left out keep what the block before produced). Returns the
        projected, unnormalised features (G, C, D); G = 1 without prompts."""
        from transformers.masking_utils import create_causal_mask

        tm = self.model.text_model
        prompts = prompts or {}
        n = prompts[0].shape[1] if prompts else 0
        if prompts and any(p.shape[1] != n or p.shape[0] != prompts[0].shape[0] for p in prompts.values()):
            raise ValueError("every prompted layer takes the same number of prompts and tokens")
        if set(prompts) - set(range(self.text_layers)):
            raise ValueError(f"prompted text blocks {sorted(prompts)} outside 0..{self.text_layers - 1}")
        C = ids.shape[0]
        if n:
            ids = torch.cat([ids[:, :1], ids[:, :1].expand(C, n), ids[:, 1:]], dim=1)  # slots (ids unused)
            eos = eos + n
        L = ids.shape[1]
        if L > self.max_length:
            raise ValueError(f"{L} tokens with the prompts exceed the text tower's {self.max_length} positions")
        x = tm.embeddings.token_embedding(ids)[None]  # (1, C, L, d)
        if n:
            x = self._insert(x.expand(prompts[0].shape[0], -1, -1, -1), prompts[0].to(x.dtype))
        G = x.shape[0]
        x = (x + tm.embeddings.position_embedding(tm.embeddings.position_ids[:, :L])).reshape(G * C, L, -1)
        mask = create_causal_mask(config=tm.config, inputs_embeds=x, attention_mask=None, cache=None)
        for i, layer in enumerate(tm.encoder.layers):
            if i > 0 and i in prompts:
                x = self._insert(x.view(G, C, L, -1), prompts[i].to(x.dtype)).reshape(G * C, L, -1)
            x = layer(x, mask, is_causal=True)
        x = tm.final_layer_norm(x).view(G, C, L, -1)
        pooled = x[:, torch.arange(C, device=x.device), eos]  # (G, C, d_t)
        return self.model.text_projection(pooled)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels (B, 3, H, W) -> projected, unnormalised image features (B, D) and every block's output
        [(B, 1+N, d_v)] (CLS first), blocks 1..vision_layers."""
        vm = self.model.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        outs = []
        for layer in vm.encoder.layers:
            h = layer(h, None)
            outs.append(h)
        return self.model.visual_projection(vm.post_layernorm(h[:, 0])), outs

    def vision_head(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_v) tokens -> (..., D): the CLS head (post-layernorm, projection) applied to other tokens."""
        return self.model.visual_projection(self.model.vision_model.post_layernorm(x))

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        """PIL images -> pixels (B, 3, H, W), with the folder's image processor."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]


_FIX = ("point prompt_learn.clip_path at a folder written by CLIPModel.save_pretrained together with its tokenizer "
        "and image processor (config.json, model.safetensors, tokenizer files, preprocessor_config.json), e.g. a "
        "local copy of openai/clip-vit-base-patch16")


def load_backbone(folder: str | Path) -> HFCLIPBackbone:
    """A local CLIP folder -> the frozen backbone (no download: local files only). Errors name the folder and the
    fix."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    folder = Path(folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder}: no config.json, so not a CLIP model folder; {_FIX}")
    try:
        kind = json.loads(cfg.read_text()).get("model_type")
    except ValueError:
        raise ValueError(f"{cfg}: not valid JSON; {_FIX}") from None
    if kind != "clip":
        raise ValueError(f"{folder}: config.json has model_type {kind!r}, not 'clip'; {_FIX}")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
    except OSError as e:
        raise ValueError(f"{folder}: the CLIP weights do not load ({str(e).splitlines()[0]}); {_FIX}") from None
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: no tokenizer loads from it ({str(e).splitlines()[0]}); {_FIX}") from None
    try:
        proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no image processor loads from it ({str(e).splitlines()[0]}); {_FIX}") from None
    return HFCLIPBackbone(model, tok, proc, str(folder))
