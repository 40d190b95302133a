"""Can the K prompts differ at all? Diagnostics of a multi-prompt text tower, logged for every training run.

    from campe.text.diagnostics import text_diagnostics, fidelity_captions
    d = text_diagnostics(model.text)    # {} for a tower without prompts (vanilla, mean, last_token)
    # {"prompt_state_cosine": 0.9999, "prompt_state_cosine_centred": 0.998, "apt_movement": 0.004, ...}

- prompt_state_cosine: mean over captions and over the K(K-1)/2 prompt pairs of the cosine between two prompts'
  pooled LM states (the vectors entering the heads), on a fixed batch of captions (`fidelity_captions`). 1.0 means
  the K prompts give one vector, whatever their heads then do with it.
- prompt_state_cosine_centred: the same after subtracting each prompt's mean state over the captions (what varies
  with the caption; a large shared offset cannot hide differences there).
- apt_movement: mean over the APT vectors of ||apt_k - apt0_k|| / ||apt0_k|| (apt0 = where reset_parameters
  started it), so "no gain" can be told from "the prompts never moved".
- apt_pairwise_cosine: mean pairwise cosine between the K APT vectors themselves.

The captions are the first `n` of the generated benchmark's val split (campe.data.synth_scenes with the generate
defaults: seed 0, max_objects 3, first paraphrase of each scene), so every run is measured on the same text.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

FIDELITY_CAPTIONS = 64
DIAGNOSTICS = ("prompt_state_cosine", "prompt_state_cosine_centred", "apt_movement", "apt_pairwise_cosine")


def fidelity_captions(n: int = FIDELITY_CAPTIONS, seed: int = 0, max_objects: int = 3) -> list[str]:
    """The first n captions of the generated val split (one per scene), without rendering any image."""
    from campe.data.synth_scenes import item_rng, make_captions, sample_scene
    out = []
    for i in range(n):
        rng = item_rng(seed, "val", i)
        scene = sample_scene(rng, max_objects)
        out.append(make_captions(scene, 1, rng)[0]["caption"])
    return out


def mean_pairwise_cosine(states: torch.Tensor) -> float:
    """[B, K, H] -> mean over b and the pairs k < l of cos(states[b, k], states[b, l]) (K >= 2)."""
    s = F.normalize(states.float(), dim=-1)
    cos = s @ s.transpose(1, 2)
    i, j = torch.triu_indices(s.shape[1], s.shape[1], offset=1, device=s.device)
    return float(cos[:, i, j].mean())


def apt_movement(apt: torch.Tensor, apt0: torch.Tensor) -> float:
    """Mean over k of ||apt_k - apt0_k|| / ||apt0_k||; apt, apt0 [K, H]."""
    apt, apt0 = apt.detach().float(), apt0.detach().float()
    return float(((apt - apt0).norm(dim=-1) / apt0.norm(dim=-1).clamp_min(1e-12)).mean())


@torch.no_grad()
def text_diagnostics(tower: Any, captions: list[str] | None = None) -> dict[str, float]:
    """The diagnostics above for a multi-prompt text tower (a MultiPromptTextEncoder or a CachedTextTower around
    one); {} for a tower with no APT vectors. Runs in eval mode and restores the tower's mode."""
    enc = getattr(tower, "encoder", tower)
    apt = getattr(enc, "apt", None)
    if apt is None:
        return {}
    out = {"apt_movement": apt_movement(apt, enc.apt_init)}
    if apt.shape[0] < 2:
        return out
    out["apt_pairwise_cosine"] = mean_pairwise_cosine(apt[None])
    was_training = tower.training
    tower.eval()
    try:
        pooled = tower(captions or fidelity_captions())["pooled_hidden"]  # [B, K, H]
    finally:
        tower.train(was_training)
    out["prompt_state_cosine"] = mean_pairwise_cosine(pooled)
    out["prompt_state_cosine_centred"] = mean_pairwise_cosine(pooled - pooled.mean(0, keepdim=True))
    return out
