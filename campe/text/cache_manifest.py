"""Frozen-LM hidden-state cache: what a cache depends on (its manifest and hashes) and its errors.

Only the LM's last `trainable_layers` are trained, so the hidden state entering the first trainable layer
(`encoder.frozen_hidden(layout)`, APT placeholders not yet replaced) is fixed for a caption: `campe cache` stores it
once per caption (campe.text.cache_shards), and training runs only inject -> trainable layer(s) -> final norm ->
heads on it (campe.text.cached_tower, campe.train.data).

    from campe.text.cache_manifest import cache_manifest, check_manifest, CacheError

- `cache_manifest(encoder, ...)`: what a cache made with this encoder depends on (see MANIFEST_COMPARED) + run info;
  `<cache>/manifest.json` holds it.
- `check_manifest(cache_dir, encoder)`: raises CacheMismatchError naming each differing field (training calls it
  through campe.train.data.open_training_data; call it yourself to fail before building a DataLoader).
- Errors: CacheError (a ValueError: the CLI prints it as one line) and its subclasses CacheMismatchError,
  CacheCorruptError (names the shard, suggests `campe cache --repair`), CacheMissingError.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from campe.core.io import json_sha256
from campe.text.model_folder import DEFAULT_MODEL, resolve_model_path
from campe.text.multiprompt import MultiPromptTextEncoder


CACHE_FORMAT = 1
MANIFEST = "manifest.json"
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Fields of the manifest that must match for a cache to be used; the others are informational.
MANIFEST_COMPARED = ("format", "model_class", "model_hash", "model_revision", "tokenizer_hash", "pooling",
                     "template", "negated_template", "k", "negation", "max_length", "trainable_layers",
                     "hidden_size", "model_dtype", "apt_placeholder")
# Compared fields written only when they differ from these values (added after caches existed: a cache made with
# the default carries no such key, so its manifest and its DVC hash stay the same).
MANIFEST_DEFAULTS = {"apt_placeholder": "shared"}


class CacheError(ValueError):
    """The cache cannot be used or written as it is; the message says why and what to run."""


class CacheMismatchError(CacheError):
    """The cache was made for another text encoder (model, template, K, ...)."""


class CacheCorruptError(CacheError):
    """A cache shard is truncated, corrupt or does not belong to its image shard."""


class CacheMissingError(CacheError):
    """The cache (or one of its shards) does not exist yet."""


# ---------------------------------------------------------------------------------------------------- manifest

_VOLATILE_CONFIG_KEYS = {"_attn_implementation", "_attn_implementation_internal", "_name_or_path", "name_or_path",
                         "transformers_version", "dtype", "torch_dtype", "_commit_hash", "architectures",
                         "use_cache", "output_hidden_states", "output_attentions", "return_dict"}


def frozen_model_hash(encoder: MultiPromptTextEncoder) -> str:
    """sha256 of what the cached states depend on: the model config and the weights below start_layer.

    The trainable layers and the final norm are left out, so the hash does not change while training. Costs one
    pass over the frozen weights (MiniLM: ~0.1 s; a 7B model: seconds).
    """
    lm = encoder.lm
    h = hashlib.sha256()
    cfg = {k: v for k, v in lm.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    prefix = "encoder.layer." if encoder.family == "encoder" else "layers."
    trainable = {f"{prefix}{i}." for i in range(encoder.start_layer, encoder.num_layers)}
    for name, t in sorted(lm.state_dict().items()):
        if any(name.startswith(p) for p in trainable) or (encoder.family == "decoder" and name.startswith("norm.")):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        t = t.detach().to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_hash(encoder: MultiPromptTextEncoder) -> str:
    """sha256 of the vocabulary, special tokens and the token ids the prompts became."""
    tok = encoder.tokenizer
    return json_sha256({"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items()),
                        "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
                        "pad_id": encoder.pad_id, "placeholder_id": encoder.placeholder_id,
                        "prompt_ids": encoder.prompt_ids, "apt_offsets": encoder.apt_offsets}, default=str)


def _tokenizer_source(encoder: MultiPromptTextEncoder) -> str | None:
    """Where the tokenizer came from, as the config names it: the packaged model ("minilm") resolves to a folder
    inside the venv, whose path is no property of the cache (and would make the manifest differ per checkout)."""
    name = getattr(encoder.tokenizer, "name_or_path", None)
    if encoder.cfg.model_path == DEFAULT_MODEL and name == resolve_model_path(DEFAULT_MODEL):
        return DEFAULT_MODEL
    return name


def cache_manifest(encoder: MultiPromptTextEncoder, dtype: str = "float16") -> dict[str, Any]:
    """The manifest a cache of `encoder` in storage `dtype` must carry (compared fields + informational ones)."""
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"cache dtype '{dtype}' is not one of: {', '.join(CACHE_DTYPES)}")
    cfg, lm = encoder.cfg, encoder.lm
    return {
        "format": CACHE_FORMAT,
        "model_path": cfg.model_path,  # informational: the same weights may sit at another path
        "model_class": type(lm).__name__,
        "model_hash": frozen_model_hash(encoder),
        "model_revision": getattr(lm.config, "_commit_hash", None),
        "tokenizer": _tokenizer_source(encoder),
        "tokenizer_hash": tokenizer_hash(encoder),
        "pooling": cfg.pooling,
        "template": cfg.template,
        "negated_template": cfg.negated_template if cfg.negation else None,
        "k": cfg.n_prompts,
        "negation": cfg.negation,
        "max_length": cfg.max_length,
        "trainable_layers": cfg.trainable_layers,
        "start_layer": encoder.start_layer,
        "num_layers": encoder.num_layers,
        "hidden_size": lm.config.hidden_size,
        "model_dtype": cfg.dtype,
        "dtype": dtype,  # storage dtype; compared by the cache stage (one dtype per cache), not by training
        **{k: getattr(cfg, k) for k, v in MANIFEST_DEFAULTS.items() if getattr(cfg, k) != v},
    }


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise CacheMissingError(f"{cache_dir}: no {MANIFEST}, so this is not a finished `campe cache` output; run "
                                f"`campe cache --out {cache_dir}` first (or set text_cache: false to train online)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"{path}: unreadable manifest ({e}); re-run `campe cache --overwrite`") from None


def manifest_differences(found: dict[str, Any], expected: dict[str, Any],
                         fields: Sequence[str] = MANIFEST_COMPARED) -> list[str]:
    """'field (cache: x, params: y)' for each compared field that differs."""
    out = []
    for f in fields:
        a, b = found.get(f, MANIFEST_DEFAULTS.get(f)), expected.get(f, MANIFEST_DEFAULTS.get(f))
        if f == "model_revision" and (a is None or b is None):
            continue  # local folders have no revision; the weights hash still decides
        if a != b:
            short = lambda v: (v[:12] + "...") if isinstance(v, str) and f.endswith("hash") else v  # noqa: E731
            out.append(f"{f} (cache: {short(a)!r}, params: {short(b)!r})")
    return out


def check_manifest(cache_dir: str | Path, encoder: MultiPromptTextEncoder, dtype: str | None = None
                   ) -> dict[str, Any]:
    """Refuse a cache made for another encoder: CacheMismatchError naming every differing field. Returns it.

    `dtype`: also require this storage dtype (the cache stage does; training reads either).
    """
    found = read_manifest(cache_dir)
    expected = cache_manifest(encoder, dtype or found.get("dtype", "float16"))
    diff = manifest_differences(found, expected, MANIFEST_COMPARED + (("dtype",) if dtype else ()))
    if diff:
        raise CacheMismatchError(
            f"cache {cache_dir} was made for a different text encoder: {'; '.join(diff)}. Rebuild it with the "
            f"same `text_encoder` params as training (`campe cache --out {cache_dir} --on-mismatch rebuild`), "
            f"or point training at a cache made with them")
    return found
