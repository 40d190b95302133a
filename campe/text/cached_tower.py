"""The cached text tower: the CAMPE text encoder's trainable part run on cached frozen-LM states.

    from campe.text.cached_tower import CachedTextTower, LayoutMaker
    encoder = campe.text.multiprompt.build_text_encoder(text_encoder_cfg)      # params.yaml section `text_encoder`
    tower = CachedTextTower(encoder, online=False)      # online=True (`text_cache: false`): no cache, the frozen
                                                        # layers run under no_grad inside the tower; same numbers
    model, _ = campe.model.build_model("default", text_tower=tower)

- `CachedTextTower(encoder, online=False, query_only=True)`: forward(batch["text"]) (or a list of captions, for
  evaluation: the frozen layers then run on the fly) -> the encoder's pool dict
  ("embedding" [B,D], "segments" [B,n,D/n], "pooled_hidden" [B,n,H], "neg_*" with negation), which
  campe.model.CLIPModel maps to "text" / "negated". Parameters: the encoder's (APT, heads, trainable layers).
  The last layer is "query-only" (`query_only_layer`): its queries, attention output and MLP run at the pooled
  positions only (keys/values from every position), the same numbers as the full layer at those positions.
  In eval mode inside `campe.text.frozen_memo.memoize_frozen_states` the frozen layers' output for a batch seen
  before is looked up, not recomputed (the grid's evaluations and val losses).
- `LayoutMaker(encoder)`: captions -> PromptLayout on the CPU without the model (DataLoader workers, the cache
  stage).
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from campe.text.frozen_memo import frozen_states
from campe.text.layout import PromptLayout
from campe.text.multiprompt import MultiPromptTextEncoder


# Layer classes whose last layer runs query-only (checked against the full layer in tests/test_cache.py).
QUERY_ONLY_ENCODER_LAYERS = ("BertLayer",)
QUERY_ONLY_DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                             "GemmaDecoderLayer", "Gemma2DecoderLayer")


# ---------------------------------------------------------------------------------------------------- layouts

class _NoParams:
    def parameters(self):
        return iter([torch.empty(0)])


class LayoutMaker:
    """Captions -> PromptLayout (on the CPU) exactly as `encoder.layout` does, without holding the model: small and
    picklable, for DataLoader workers in online mode and for the cache stage."""

    def __init__(self, encoder: MultiPromptTextEncoder):
        self.cfg, self.tokenizer = encoder.cfg, encoder.tokenizer
        self.prompt_ids, self.apt_offsets, self.pad_id = encoder.prompt_ids, encoder.apt_offsets, encoder.pad_id
        self.lm = _NoParams()  # encoder.layout moves the layout to the model's device: here the CPU

    def __call__(self, captions: str | Sequence[str]) -> PromptLayout:
        return MultiPromptTextEncoder.layout(self, captions)  # the encoder's own code, on this duck-typed self

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "lm"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lm = _NoParams()


# ---------------------------------------------------------------------------------------------------- the tower

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B,S,...], positions [B,Q] -> [B,Q,...]."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, positions]


def _attention_fn(attn: nn.Module):
    """The attention kernel the model itself uses (eager / sdpa), as the modeling file resolves it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)


def query_only_supported(layer: nn.Module) -> bool:
    name = type(layer).__name__
    if name in QUERY_ONLY_ENCODER_LAYERS:
        return not getattr(layer, "add_cross_attention", False)
    return name in QUERY_ONLY_DECODER_LAYERS


def query_only_layer(encoder: MultiPromptTextEncoder, index: int, hidden: torch.Tensor, layout: PromptLayout,
                     positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Layer `index` evaluated at `positions` only: hidden [B,S,H] (its input), positions [B,Q] -> [B,Q,H].

    Keys and values come from all S positions; queries, the attention output, the residuals and the MLP only
    from the Q positions, by calling the layer's own submodules (projections, norms, rotary, MLP, attention
    kernel). mask: the layer's [B,1,S,S] prompt-wise mask.
    """
    layer = encoder._layers[index]
    B, S, _ = hidden.shape
    Q = positions.shape[1]
    mask_q = _gather_rows(mask[:, 0], positions)[:, None]  # [B,1,Q,S]
    h_q = _gather_rows(hidden, positions)  # [B,Q,H]
    if encoder.family == "encoder":
        sa = layer.attention.self
        d = sa.attention_head_size
        q = sa.query(h_q).view(B, Q, -1, d).transpose(1, 2)
        k = sa.key(hidden).view(B, S, -1, d).transpose(1, 2)
        v = sa.value(hidden).view(B, S, -1, d).transpose(1, 2)
        out, _ = _attention_fn(sa)(sa, q, k, v, mask_q, dropout=sa.dropout.p if sa.training else 0.0,
                                   scaling=sa.scaling)
        a = layer.attention.output(out.reshape(B, Q, -1), h_q)  # dense, dropout, LayerNorm(x + residual)
        return layer.output(layer.intermediate(a), a)
    attn = layer.self_attn
    d = attn.head_dim
    x = layer.input_layernorm(hidden)
    x_q = _gather_rows(x, positions)
    q = attn.q_proj(x_q).view(B, Q, -1, d)
    k = attn.k_proj(x).view(B, S, -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norm before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(x).view(B, S, -1, d).transpose(1, 2)
    cos, sin = encoder.lm.rotary_emb(hidden, layout.position_ids)  # [B,S,d]
    cq, sq = _gather_rows(cos, positions)[:, None], _gather_rows(sin, positions)[:, None]
    q = q * cq + _rotate_half(q) * sq
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    kw = {"dropout": attn.attention_dropout if attn.training else 0.0, "scaling": attn.scaling}
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        kw["softcap"] = attn.attn_logit_softcapping
    if getattr(attn, "sliding_window", None) is not None:
        kw["sliding_window"] = attn.sliding_window  # the mask already has the window; passed as the model does
    out, _ = _attention_fn(attn)(attn, q, k, v, mask_q, **kw)
    a = attn.o_proj(out.reshape(B, Q, -1))
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma2: norms around both sub-blocks' outputs
        h_q = h_q + layer.post_attention_layernorm(a)
        return h_q + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h_q)))
    h_q = h_q + a
    return h_q + layer.mlp(layer.post_attention_layernorm(h_q))


class CachedTextTower(nn.Module):
    """The multi-prompt text tower on cached frozen states (campe/model.py's text-tower contract).

    forward({"hidden": [B,S,H] cached states (float16/bfloat16/float32; cast to the model's dtype), "layout":
    PromptLayout}) -> encoder.pool's dict ("embedding" [B,D], "segments" [B,n,D/n], "pooled_hidden" [B,n,H], and
    "neg_*" with negation). online=True: the batch needs only "layout", and the frozen layers run here under
    no_grad. In either mode a list of captions or a PromptLayout is also accepted (evaluation: model.encode_text(
    captions)); the frozen layers then run on the fly. query_only=False runs the last layer at every position.
    """

    def __init__(self, encoder: MultiPromptTextEncoder, online: bool = False, query_only: bool = True):
        super().__init__()
        self.encoder = encoder
        self.online = online
        self.cfg = encoder.cfg  # build_model records it as text_tower_config
        self.embed_dim = encoder.embed_dim
        last = encoder._layers[encoder.num_layers - 1]
        self.query_only = query_only and encoder.cfg.pooling != "mean"  # mean pooling needs every caption token
        self.note = ""
        if self.query_only and not query_only_supported(last):
            self.query_only = False
            self.note = (f"query-only last layer not implemented for {type(last).__name__}: running the full layer "
                         f"(same numbers, more FLOPs); supported: "
                         f"{', '.join(QUERY_ONLY_ENCODER_LAYERS + QUERY_ONLY_DECODER_LAYERS)}")
            warnings.warn(self.note, stacklevel=2)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        enc = self.encoder
        live = self.online
        if isinstance(batch, (str, list, tuple)):  # captions (evaluation): the frozen layers run here
            batch, live = {"layout": enc.layout(batch)}, True
        elif isinstance(batch, PromptLayout):
            batch, live = {"layout": batch}, True
        layout = batch["layout"]
        if isinstance(layout, dict):
            layout = PromptLayout.from_dict(layout)
        device = next(enc.lm.parameters()).device
        layout = layout.to(device)
        masks: dict[int | None, torch.Tensor] = {}
        hidden = batch.get("hidden")
        if hidden is None:
            if not live:
                raise ValueError("CachedTextTower(online=False) needs batch['hidden'] (cached states from "
                                 "open_training_data with a cache_dir); build it with online=True to run the frozen "
                                 "layers itself")
            hidden = frozen_states(enc, layout, masks)  # no_grad; looked up when a memo is active (evaluation)
        elif enc.cfg.lora:
            raise ValueError("text_encoder.lora puts trainable adapters into every layer of the LM, so cached states "
                             "cannot be used: train online (train.cache_dir: '' / --cache none)")
        elif enc.entry_layer != enc.start_layer:
            raise ValueError("text_encoder.apt_entry 'input' sends gradients through the frozen layers, so cached "
                             "states cannot be used: train online (train.cache_dir: '' / --cache none)")
        else:
            if hidden.shape[:2] != layout.input_ids.shape:
                raise ValueError(f"batch['hidden'] is {list(hidden.shape)} but the layout is "
                                 f"{list(layout.input_ids.shape)} tokens: collate both with collate_samples")
            hidden = hidden.to(device=device, dtype=enc._dtype)
        h = enc.inject(hidden, layout)
        last = enc.num_layers - 1
        if not self.query_only:
            return enc.pool(enc.run_layers(h, layout, enc.entry_layer, enc.num_layers, masks), layout)
        h = enc.run_layers(h, layout, enc.entry_layer, last, masks)
        k = layout.pooled_positions.shape[1]
        positions = layout.pooled_positions
        if layout.neg_pooled_positions is not None:
            positions = torch.cat([positions, layout.neg_pooled_positions], 1)
        w = enc._windows[last]
        if w not in masks:
            masks[w] = enc.attention_mask(layout, w)
        y = query_only_layer(enc, last, h, layout, positions, masks[w])  # [B,Q,H]
        # Pool from the Q computed positions: the same heads and final norm on a compact layout.
        ar = torch.arange(positions.shape[1], device=device).expand(positions.shape[0], -1)
        compact = dataclasses.replace(layout, pooled_positions=ar[:, :k],
                                      neg_pooled_positions=ar[:, k:] if layout.neg_pooled_positions is not None
                                      else None)
        return enc.pool(y, compact)
