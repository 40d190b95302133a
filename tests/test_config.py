"""Configuration: params.yaml validates, dvc.yaml only names params and paths that exist, the CLI is wired."""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from campe import cli
from campe.core.config import ConfigError, from_dict, load_params, read_yaml
from campe.data.synth import SynthParams
from campe.text.multiprompt import MultiPromptConfig
from pipelines.campe_flow import FlowParams
from stages.ablate import AblateParams
from campe.core.losses import LossConfig
from campe.model import ModelConfig
from campe.train.run_config import DERIVED, TrainParams
from stages.cache import CacheParams
from stages.evaluate import EvaluateParams
from stages.download import DownloadParams
from campe.attriprompt.config import PromptLearnParams

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"generate": SynthParams, "download": DownloadParams, "flow": FlowParams,
            "text_encoder": MultiPromptConfig, "cache": CacheParams,
            "model": ModelConfig, "loss": LossConfig, "train": TrainParams, "evaluate": EvaluateParams,
            "ablate": AblateParams, "prompt_learn": PromptLearnParams}


def test_shipped_params_load_into_their_dataclasses():
    params = read_yaml(ROOT / "params.yaml")
    for section, cls in SECTIONS.items():
        obj = load_params(ROOT / "params.yaml", section, cls)
        # Every field is written out in params.yaml, so a user sees every knob (except those derived from
        # another section, e.g. model.contrastive <- loss.kind).
        derived = {field for (sec, field) in DERIVED if sec == section}
        assert set(params[section]) == {f.name for f in dataclasses.fields(cls)} - derived, section
        assert {k: v for k, v in dataclasses.asdict(obj).items() if k not in derived} == params[section]


def test_unknown_key_is_an_error_naming_it_with_a_suggestion(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("download:\n  image_sise: 64\n")
    with pytest.raises(ConfigError, match=r"params.yaml:download: unknown key 'image_sise' \(did you mean 'image_size'"):
        load_params(f, "download", DownloadParams)


def test_wrong_types_and_invalid_values_are_errors():
    with pytest.raises(ConfigError, match=r"x.image_size: expected an integer"):
        from_dict(DownloadParams, {"image_size": "64"}, "x")
    with pytest.raises(ConfigError, match=r"x.extra_columns: expected a list"):
        from_dict(DownloadParams, {"extra_columns": "image_id"}, "x")
    with pytest.raises(ConfigError, match=r"resize_mode must be one of"):
        from_dict(DownloadParams, {"resize_mode": "stretch"}, "x")
    with pytest.raises(ConfigError, match=r"x.image_size: expected an integer, got True"):
        from_dict(DownloadParams, {"image_size": True}, "x")
    with pytest.raises(ConfigError, match=r"x.flag: expected true/false"):
        from_dict(_WithBool, {"flag": "yes"}, "x")
    assert from_dict(DownloadParams, {"min_success_rate": 1}, "x").min_success_rate == 1.0  # int -> float is fine


@dataclasses.dataclass
class _WithBool:
    flag: bool = False


def test_missing_section_and_missing_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("generate: {}\n")
    with pytest.raises(ConfigError, match=r"missing section 'download:'"):
        load_params(f, "download", DownloadParams)
    with pytest.raises(ConfigError, match=r"params file not found"):
        load_params(tmp_path / "nope.yaml", "download", DownloadParams)


def _expand_foreach(dvc: dict, params: dict) -> dict[str, dict]:
    """dvc.yaml's stages with each `foreach: ${dict}` stage expanded into <name>@<key> (${key}, ${item} filled)."""
    out = {}
    for name, stage in dvc["stages"].items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        ref = re.fullmatch(r"\$\{([a-zA-Z0-9_.]+)\}", stage["foreach"]).group(1)
        for key, item in _lookup(params, ref).items():
            body = yaml.safe_dump(stage["do"]).replace("${key}", str(key)).replace("${item}", str(item))
            out[f"{name}@{key}"] = yaml.safe_load(body)
    return out


def _dvc_params_refs(stages: dict[str, dict]) -> tuple[set[str], list[str]]:
    """Params keys named by the stages (params lists and ${...} templates) and their dep paths."""
    keys, deps = set(), []
    text = yaml.safe_dump(stages)
    keys |= set(re.findall(r"\$\{([a-zA-Z0-9_.]+)\}", text))
    for stage in stages.values():
        for entry in stage.get("params", []):
            keys |= {entry} if isinstance(entry, str) else set()
        deps += stage.get("deps", [])
    return keys, deps


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def test_dvc_yaml_names_only_existing_params_and_deps():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = read_yaml(ROOT / "params.yaml")
    stages = _expand_foreach(dvc, params)
    assert {"evaluate_image@generated", "evaluate_video@generated_msrvtt", "evaluate_zero_shot"} <= set(stages)
    keys, deps = _dvc_params_refs(stages)
    assert keys, "dvc.yaml names no params"
    for key in keys:
        _lookup(params, key)  # KeyError names a key that params.yaml lacks
    outs = [o if isinstance(o, str) else next(iter(o)) for s in stages.values() for o in s.get("outs", [])]
    resolve = lambda s: re.sub(r"\$\{([a-zA-Z0-9_.]+)\}", lambda m: str(_lookup(params, m.group(1))), s)  # noqa: E731
    for dep in map(resolve, deps):
        produced = any(dep == resolve(o) or dep.startswith(resolve(o).rstrip("/") + "/") for o in outs)
        assert produced or (ROOT / dep).exists(), f"dvc.yaml dep {dep} neither exists nor is a stage output"
    for name, stage in stages.items():
        # its one command script; helpers the scripts share (stages/_*.py) are listed besides
        scripts = [d for d in stage["deps"] if d.startswith("stages/") and not d.startswith("stages/_")]
        assert len(scripts) == 1, f"stage {name} does not list its script"
        assert stage["cmd"].startswith(f"campe {Path(scripts[0]).stem} "), name  # the subcommand of that script


def test_cli_commands_resolve_and_unknown_command_fails(capsys):
    table = cli.commands()  # a registered module that is missing fails here (find_spec finds no file)
    assert {"generate", "download", "cache", "train", "evaluate", "ablate", "flow", "prompts", "params", "prompt-learn"} <= set(table)
    for module, help_line in table.values():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run)
        assert help_line and mod.HELP == help_line  # what `campe --help` reads with ast is what the module says
    assert cli.main(["--help"]) == 0 and "download" in capsys.readouterr().out
    assert cli.main(["nonsense"]) == 2
    assert cli.main(["download", "--params", "/nonexistent/params.yaml"]) == 1
    assert "params file not found" in capsys.readouterr().err
