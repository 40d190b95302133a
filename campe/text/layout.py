"""The token layout of captions packed with their K prompts, and its attention mask.

    from campe.text.layout import PromptLayout, build_layout, prompt_attention_mask
    layout = encoder.layout(captions)               # (campe.text.multiprompt) -> PromptLayout
    mask = prompt_attention_mask(layout, causal)    # the additive [B,1,S,S] mask of the one masked pass
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------- token layout
@dataclass
class PromptLayout:
    """Where everything is in the packed sequences of a batch; plain tensors, so it saves with torch.save.

    input_ids [B, S], segment_ids [B, S] (caption 0, prompt i = i, negated prompt i = K+i, pad -1),
    position_ids [B, S], apt_positions [B, K] (index of prompt i's APT placeholder), pooled_positions [B, K]
    (index of prompt i's last token; [B, 1] = the caption's last token when there are no prompts),
    neg_apt_positions / neg_pooled_positions [B, K] or None, caption_lengths [B], truncated [B] bool.
    """

    input_ids: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor
    apt_positions: torch.Tensor
    pooled_positions: torch.Tensor
    caption_lengths: torch.Tensor
    truncated: torch.Tensor
    neg_apt_positions: torch.Tensor | None = None
    neg_pooled_positions: torch.Tensor | None = None

    @property
    def n_prompts(self) -> int:
        """Prompt segments (= APT vectors) per caption: MultiPromptConfig.n_prompts (K for multi_prompt)."""
        return self.apt_positions.shape[1]

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def lengths(self) -> torch.Tensor:
        """[B] real tokens per row (the rest is padding)."""
        return (self.segment_ids >= 0).sum(1)

    def to(self, device: torch.device | str) -> PromptLayout:
        return dataclasses.replace(self, **{f: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                            for f, v in self.to_dict().items()})

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        """Plain dict of tensors (loads back with torch.load(weights_only=True))."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptLayout:
        return cls(**d)

    def select(self, rows: Sequence[int] | torch.Tensor) -> PromptLayout:
        """The layout of a subset of rows, trimmed to their longest row (rows are left-aligned)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        s = int(self.lengths[rows].max())
        out = {}
        for f, v in self.to_dict().items():
            if v is not None:
                v = v[rows]
                if f in ("input_ids", "segment_ids", "position_ids"):
                    v = v[:, :s]
            out[f] = v
        return PromptLayout(**out)

    @staticmethod
    def collate(layouts: Sequence[PromptLayout], pad_id: int = 0) -> PromptLayout:
        """Stack layouts (e.g. cached one caption at a time) into one batch, padding on the right."""
        s = max(l.input_ids.shape[1] for l in layouts)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(t, (0, s - t.shape[1]), value=value)

        out = {"input_ids": torch.cat([pad(l.input_ids, pad_id) for l in layouts]),
               "segment_ids": torch.cat([pad(l.segment_ids, -1) for l in layouts]),
               "position_ids": torch.cat([pad(l.position_ids, 0) for l in layouts])}
        for f in ("apt_positions", "pooled_positions", "caption_lengths", "truncated",
                  "neg_apt_positions", "neg_pooled_positions"):
            vs = [getattr(l, f) for l in layouts]
            out[f] = None if vs[0] is None else torch.cat(vs)
        return PromptLayout(**out)


def build_layout(caption_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]],
                 apt_offsets: Sequence[int], *, pad_id: int, negation: bool = False,
                 truncated: Sequence[bool] | None = None) -> PromptLayout:
    """Pack captions and prompts into one right-padded batch.

    caption_ids: B token lists (already truncated). prompt_ids: the prompts' token lists, the K positive ones first
    and, with negation, then their K negated forms; apt_offsets[j]: where prompt j's APT placeholder is within it.
    With no prompts (last_token / mean pooling) the pooled position is the caption's last token.
    """
    n = len(prompt_ids)
    if negation and n % 2:
        raise ValueError("with negation, prompt_ids must hold K positive then K negated prompts")
    rows = []
    for cap in caption_ids:
        ids, seg, pos, apt, last = list(cap), [0] * len(cap), list(range(len(cap))), [], []
        for j, p in enumerate(prompt_ids):
            start = len(ids)
            ids += p
            seg += [j + 1] * len(p)
            pos += range(len(cap), len(cap) + len(p))  # restart at the caption's end
            apt.append(start + apt_offsets[j])
            last.append(start + len(p) - 1)
        rows.append((ids, seg, pos, apt, last))
    b, s = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    segment_ids = torch.full((b, s), -1, dtype=torch.long)
    position_ids = torch.zeros((b, s), dtype=torch.long)
    for i, (ids, seg, pos, _, _) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        segment_ids[i, :len(ids)] = torch.tensor(seg)
        position_ids[i, :len(ids)] = torch.tensor(pos)
    apt = torch.tensor([r[3] for r in rows], dtype=torch.long).view(b, n)
    last = torch.tensor([r[4] for r in rows], dtype=torch.long).view(b, n)
    cap_len = torch.tensor([len(c) for c in caption_ids], dtype=torch.long)
    kp = n // 2 if negation else n
    return PromptLayout(
        input_ids=input_ids, segment_ids=segment_ids, position_ids=position_ids,
        apt_positions=apt[:, :kp], pooled_positions=last[:, :kp] if n else (cap_len - 1)[:, None],
        caption_lengths=cap_len,
        truncated=torch.tensor(list(truncated) if truncated is not None else [False] * b, dtype=torch.bool),
        neg_apt_positions=apt[:, kp:] if negation else None,
        neg_pooled_positions=last[:, kp:] if negation else None)


def prompt_attention_mask(layout: PromptLayout, *, causal: bool, dtype: torch.dtype = torch.float32,
                          sliding_window: int | None = None) -> torch.Tensor:
    """Additive mask [B, 1, S, S]: 0 where query attends key, finfo(dtype).min where blocked.

    Float, not bool: transformers 5 adds a float mask as is under eager and sdpa, while a 4-D bool mask is silently
    misread by eager attention. A padding query attends only to itself: a fully blocked row would be a softmax
    over nothing (uniform or NaN depending on the kernel) and could leak NaN through 0 * NaN.
    """
    seg, pos = layout.segment_ids, layout.position_ids
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)  # everyone sees the caption; a prompt also sees itself
    idx = torch.arange(seg.shape[1], device=seg.device)
    if causal:
        allowed &= idx[None, None, :] <= idx[None, :, None]
    if sliding_window is not None:
        # The window is over positions: a prompt sees caption token t at the distance it would see it alone.
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    allowed |= (q < 0) & (idx[:, None] == idx[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
