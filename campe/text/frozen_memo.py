"""Reuse the frozen LM layers' output for captions seen before (evaluation and the val loss; never training steps).

    from campe.text.frozen_memo import FrozenStateMemo, memoize_frozen_states, frozen_states
    with memoize_frozen_states(max_bytes=4 << 30) as memo:   # campe ablate: one memo for the whole grid
        ...                          # every CachedTextTower in eval mode inside reuses the states entering its entry
        memo.hits, memo.misses       # layer for a batch it has seen (same frozen weights, same layout)

Why: with the text cache a training step never runs the frozen layers, but evaluation and the per-epoch val loss
run them live on captions (2500 test + 1250 val captions per evaluation, 250 val captions per epoch). Those states
are a pure function of the frozen weights and the layout, and a grid evaluates the same captions with the same
frozen LM in every cell of a text configuration, so they are computed once and looked up after: the same tensors,
not an approximation (tests/test_frozen_memo.py checks bit-equality).

Key: a fingerprint of everything the states depend on -- the LM config, the encoder's entry layer and dtype, and
the bytes of every frozen parameter and buffer of the LM plus the distinct placeholders' embeddings (computed once
per encoder) -- and the bytes of the batch's layout tensors. Only states below `entry_layer` are memoised, so a
trainable layer is never frozen into the memo; with entry_layer 0 (all layers train, apt_entry input, LoRA) there
is nothing worth keeping and the memo is bypassed. Least recently used entries go past `max_bytes`. Callers must
not write into the returned tensor (`inject` copies before writing the APTs).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch

from campe.text.layout import PromptLayout

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_ACTIVE: contextvars.ContextVar[FrozenStateMemo | None] = contextvars.ContextVar("campe_frozen_memo", default=None)


def _digest_tensor(h: Any, t: torch.Tensor | None) -> None:
    if t is None:
        h.update(b"none;")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def frozen_fingerprint(encoder: Any) -> str:
    """sha256 of what the states below encoder.entry_layer depend on (once per encoder object: frozen weights do
    not change; a copy of an encoder is fingerprinted anew)."""
    cached = _FINGERPRINTS.get(encoder)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    h.update(f"{encoder.lm.config.to_json_string()}|entry={encoder.entry_layer}|{encoder._dtype}|".encode())
    for name, t in list(encoder.lm.named_parameters()) + list(encoder.lm.named_buffers()):
        if isinstance(t, torch.nn.Parameter) and t.requires_grad:
            continue  # trainable layers (above the entry layer) are not part of the frozen states
        h.update(name.encode())
        _digest_tensor(h, t)
    _digest_tensor(h, getattr(encoder, "placeholder_embeds", None))
    _FINGERPRINTS[encoder] = h.hexdigest()
    return _FINGERPRINTS[encoder]


def layout_key(layout: PromptLayout) -> str:
    """sha256 of every tensor of the layout (ids, segments, positions: all the frozen pass reads)."""
    h = hashlib.sha256()
    for f in dataclasses.fields(layout):
        h.update(f.name.encode())
        _digest_tensor(h, getattr(layout, f.name))
    return h.hexdigest()


class FrozenStateMemo:
    """(frozen fingerprint, layout) -> the state entering the entry layer [B,S,H], least recently used out past
    max_bytes."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, encoder: Any, layout: PromptLayout, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (frozen_fingerprint(encoder), layout_key(layout))
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        value = compute()
        size = value.element_size() * value.numel()
        if size <= self.max_bytes:
            self.entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.element_size() * old.numel()
        return value


@contextlib.contextmanager
def memoize_frozen_states(memo: FrozenStateMemo | None = None, max_bytes: int = 1 << 30
                          ) -> Iterator[FrozenStateMemo]:
    """Inside, towers in eval mode look their frozen states up in `memo` (a new one of max_bytes if None). Nested
    inside another, the outer memo stays in use (the grid's memo serves each cell's val loss too)."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    memo = memo if memo is not None else FrozenStateMemo(max_bytes)
    token = _ACTIVE.set(memo)
    try:
        yield memo
    finally:
        _ACTIVE.reset(token)


def frozen_states(encoder: Any, layout: PromptLayout, masks: dict[int | None, torch.Tensor]) -> torch.Tensor:
    """encoder.entry_hidden(layout, masks), from the active memo when there is one, the encoder is in eval mode and
    frozen layers lie below its entry layer."""
    memo = _ACTIVE.get()
    if memo is None or encoder.training or encoder.entry_layer == 0:
        return encoder.entry_hidden(layout, masks)
    return memo.get(encoder, layout, lambda: encoder.entry_hidden(layout, masks))
