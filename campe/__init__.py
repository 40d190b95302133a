"""campe: Context-Adaptive Multi-Prompt Embedding. `campe.load(path)` opens a trained model (campe/api.py); the
import stays cheap: campe.api (torch, the model code) is imported on first use of campe.load."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name in ("load", "CampeModel", "NotACampeModel"):
        return getattr(importlib.import_module("campe.api"), name)
    raise AttributeError(f"module 'campe' has no attribute {name!r}")
