"""The whole params file: its sections, the checks across them, and its JSON Schema.

    campe params check                       # every section + the cross-section checks (exit 1, one line, if bad)
    campe params schema                      # (re)write params.schema.json, which editors use to check params.yaml

Every stage, `campe ablate` and the Prefect flow call `check_params(path)` first, before any work: an unknown or
misspelt section or key anywhere in the file is an error naming the file, the key and a suggestion, and so is a
combination of sections that would only fail later (K prompts that do not divide model.embed_dim, a negation cache
that disagrees with the loss, shards downloaded at another size than the model takes). A section the file leaves
out takes its defaults; the checks across sections look only at what the file states.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stages.ablate import AblateParams
from campe.attriprompt.config import PromptLearnParams
from campe.core.config import ConfigError, from_dict, json_schema, read_yaml
from campe.core.io import atomic_write_bytes
from campe.core.losses import LossConfig
from campe.model import ModelConfig
from campe.text.multiprompt import MultiPromptConfig
from campe.data.synth import SynthParams
from campe.data.synth_fewshot import FewShotParams
from campe.pretrain_clip import PretrainClipParams
from campe.train.run_config import TRAIN_SECTIONS, TrainParams, resolve_run_config
from pipelines.flow_params import FlowParams
from stages.cache import CacheParams
from stages.download import DownloadParams
from stages.evaluate import EvaluateParams

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "check params.yaml (every section, across sections) or write its JSON Schema"

# section -> its dataclass, in the order of the shipped params.yaml
SECTIONS: dict[str, type] = {
    "generate": SynthParams, "download": DownloadParams, "text_encoder": MultiPromptConfig, "cache": CacheParams,
    "model": ModelConfig, "loss": LossConfig, "train": TrainParams, "evaluate": EvaluateParams,
    "ablate": AblateParams, "flow": FlowParams, "prompt_learn": PromptLearnParams,
    "fewshot_data": FewShotParams, "pretrain_clip": PretrainClipParams,
}
SCHEMA_FILE = "params.schema.json"
# Checked for keys and types everywhere, but their own semantic check only where they are used: FlowParams'
# schedule check imports Prefect (~2 s), which no stage should pay for.
_LAZY = {"flow"}


def check_params(path: str | Path) -> dict[str, Any]:
    """Validate the whole params file at `path`; returns its raw sections. Raises ConfigError (one line)."""
    data = read_yaml(path, SECTIONS)
    # Each section built once (a missing one: its defaults); the checks across sections read these objects.
    built = {name: from_dict(cls, data.get(name), f"{path}:{name}", validate=name not in _LAZY and name in data)
             for name, cls in SECTIONS.items()}
    _check_across(data, built, str(path))
    return data


def _check_across(data: dict[str, Any], built: dict[str, Any], where: str) -> None:
    if "train" in data:  # a file that trains: resolve the run as `campe train` will (method, derived fields)
        resolve_run_config({k: data.get(k) for k in TRAIN_SECTIONS}, where)
    elif "text_encoder" in data:  # the cache is made for a K that must divide embed_dim
        try:
            built["text_encoder"].check_embed_dim(joint_embed_dim(data))
        except ValueError as e:
            raise ConfigError(f"{where}:text_encoder: {e}") from None
    if "fewshot_data" in data and "pretrain_clip" in data:
        fs, clip = built["fewshot_data"], built["pretrain_clip"]
        if fs.image_size != clip.image_size:
            raise ConfigError(f"{where}: fewshot_data.image_size is {fs.image_size} but pretrain_clip.image_size is "
                              f"{clip.image_size}; the CLIP is evaluated (and used) on those images: set both to "
                              f"the same size")
    if "download" in data and "model" in data:
        down, model, shards = built["download"], built["model"], built["train"].shards_dir
        if shards == down.output_dir and down.image_size != model.image_size:
            raise ConfigError(f"{where}: download.image_size is {down.image_size} but model.image_size is "
                              f"{model.image_size} and training reads those shards ({shards}); set both to the "
                              f"same size")


def joint_embed_dim(data: dict[str, Any]) -> int:
    """D of a params file: model.embed_dim (stated or its default). A file without a `model` section (one that only
    caches) may still state the old text_encoder.embed_dim; it then sizes the multi-prompt heads."""
    if "model" not in data and "embed_dim" in (data.get("text_encoder") or {}):
        return data["text_encoder"]["embed_dim"]
    return from_dict(ModelConfig, data.get("model"), "model", validate=False).embed_dim


def write_schema(path: str | Path) -> Path:
    """Write the JSON Schema of a params file (atomically); returns the path."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(json_schema(SECTIONS), indent=2) + "\n").encode())
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check", "schema"], help="check a params file, or write its JSON Schema")
    p.add_argument("--params", default="params.yaml", help="params file to check")
    p.add_argument("--out", default=SCHEMA_FILE, help=f"schema file to write (default: {SCHEMA_FILE})")


def run(args: argparse.Namespace) -> int:
    if args.action == "schema":
        print(write_schema(args.out))
        return 0
    data = check_params(args.params)
    if "flow" in data:  # the one semantic check the stages skip (it imports Prefect)
        from_dict(FlowParams, data["flow"], f"{args.params}:flow")
    print(f"{args.params}: ok ({', '.join(data)})")
    return 0
