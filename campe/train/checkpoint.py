"""Building a run's model and reading/writing its weights: what evaluation needs, without the training loop.

    from campe.train.checkpoint import build_run_model, load_trained_model, FINAL
    model, resolved, encoder = build_run_model(cfg, "cached")    # "plain" | "cached" | "online" (TOWER_MODES)
    model, cfg = load_trained_model("data/models/campe")           # model.pt + train_config.json, eval mode

Only the trainable parameters are saved (trainable_state): the frozen LM weights come from the model path.
Files of a run's out_dir: CKPT (resume checkpoint), FINAL (final weights), RUN_ID_FILE (the MLflow run).
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from campe.core.io import atomic_write_bytes
from campe.model import CLIPModel, build_model
from campe.train.run_config import RunConfig, TRAIN_SECTIONS, resolve_run_config


CKPT = "ckpt_last.pt"
FINAL = "model.pt"
RUN_ID_FILE = "mlflow_run_id.txt"


# ---------------------------------------------------------------------------------------------------- model

TOWER_MODES = ("plain", "cached", "online")


def build_run_model(cfg: RunConfig, tower: str = "plain") -> tuple[CLIPModel, dict[str, Any], Any]:
    """-> (model, resolved model config, text encoder). For the LM methods `tower` picks the text input:
    "plain" = the MultiPromptTextEncoder itself (captions or PromptLayouts), "cached" / "online" =
    campe.text.cached_tower's CachedTextTower over it (batch["text"] = {"hidden", "layout"} from the cache, or
    computed on the fly)."""
    if tower not in TOWER_MODES:
        raise ValueError(f"tower '{tower}' is not one of: {', '.join(TOWER_MODES)}")
    fields = {**dataclasses.asdict(cfg.model), "image_tower": cfg.train.image_tower}
    if cfg.text_encoder is None:
        model, resolved = build_model("default", **fields)
        return model, resolved, model.text
    from campe.text.multiprompt import build_text_encoder
    encoder = build_text_encoder(cfg.text_encoder, embed_dim=cfg.model.embed_dim)
    text_tower = encoder
    if tower != "plain":
        from campe.text.cached_tower import CachedTextTower
        text_tower = CachedTextTower(encoder, online=tower == "online")
    fields.pop("text_tower_kind")
    model, resolved = build_model("default", text_tower=text_tower, **fields)
    resolved["text_tower_kind"] = "multiprompt"  # the cache wrapper is a view of the same tower
    resolved["text_tower_config"] = dataclasses.asdict(cfg.text_encoder)
    return model, resolved, encoder


def frozen_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the frozen parameters (they come back from the pretrained LM)."""
    frozen = frozen_parameter_names(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = frozen_parameter_names(model)
    bad = [k for k in missing if k not in frozen]
    if bad or unexpected:
        raise ValueError(f"{where}: checkpoint does not fit the model (missing {bad[:5]}, unexpected "
                         f"{list(unexpected)[:5]}); was it written with another config?")


def torch_save_atomic(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_trained_model(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CLIPModel, RunConfig]:
    """The final model of a training run (model.pt + train_config.json) with the online text tower, in eval mode:
    model.encode_text takes captions (vanilla) or campe.text.multiprompt layouts/captions (LM methods)."""
    out_dir = Path(out_dir)
    for name in (FINAL, "train_config.json"):
        if not (out_dir / name).exists():
            raise FileNotFoundError(f"{out_dir / name}: not found; is {out_dir} the out_dir of a finished "
                                    f"`campe train`?")
    saved = json.loads((out_dir / "train_config.json").read_text())["config"]
    cfg = resolve_run_config({k: saved[k] or {} for k in TRAIN_SECTIONS},
                             str(out_dir / "train_config.json"))
    model, _, _ = build_run_model(cfg, "plain")
    state = torch.load(out_dir / FINAL, map_location="cpu", weights_only=True)["model"]
    load_trainable_state(model, _uncached_names(state, model), str(out_dir / FINAL))
    if cfg.train.image_tower == "locked":  # features of images the run cached come from there, others run live
        from campe.data.feature_cache import MANIFEST, FeatureStore
        from campe.locked import feature_manifest
        folder = Path(cfg.train.image_features_dir)
        if (folder / MANIFEST).exists():
            model.visual.attach(FeatureStore.open(folder, feature_manifest(cfg.model.image_size)), strict=False)
    return model.to(device).eval(), cfg


def _uncached_names(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a CachedTextTower-wrapped state ("text.<attr>.x") onto the plain tower ("text.x") when needed."""
    names = set(model.state_dict())
    if all(k in names for k in state):
        return state
    out = {}
    for k, v in state.items():
        if k not in names and k.startswith("text."):
            parts = k.split(".")
            alt = ".".join(parts[:1] + parts[2:])
            if alt in names:
                k = alt
        out[k] = v
    return out
