"""What the pipeline promises about params.yaml: a misspelt or unknown section or key, a wrong type, or sections that
disagree with each other stop every command at once, with one line naming the file, the key and a fix, before any
work, so nothing is written. The real CLI (`campe.cli.main`) runs on a tiny params file in a temporary folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from campe import cli
from tests.tiny_config import tiny_params

ROOT = Path(__file__).resolve().parents[2]
# Every command that reads params.yaml, with the arguments it needs (none of them may start work).
COMMANDS = {
    "generate": ["generate", "--out", "{root}/gen"],
    "download": ["download"],
    "cache": ["cache"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "ablate": ["ablate"],
    "params": ["params", "check"],
}


def _write(tmp_path: Path, mutate=None) -> Path:
    data = tiny_params(tmp_path / "work")
    if mutate:
        mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(capsys, tmp_path: Path, params: Path, command: str) -> tuple[int, str]:
    argv = [a.format(root=tmp_path) for a in COMMANDS[command]] + ["--params", str(params)]
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def _rename(section: str, to: str):
    def mutate(data):
        data[to] = data.pop(section)
    return mutate


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_misspelt_section_stops_every_command_naming_it(capsys, tmp_path, command):
    """`mdoel:` for `model:` is an error naming the file, the section and the suggestion, in every command; nothing
    is written (the commands would write under work/)."""
    params = _write(tmp_path, _rename("model", "mdoel"))
    code, err = _run(capsys, tmp_path, params, command)
    assert code == 1
    assert err.count("\n") == 0, err
    assert f"{params}: unknown section 'mdoel:' (did you mean 'model'?)" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "gen").exists()


def test_an_unknown_top_level_key_is_an_error(capsys, tmp_path):
    """A top-level key that is no section at all is refused, listing the known sections."""
    params = _write(tmp_path, lambda d: d.update(experiment_notes={"a": 1}))
    code, err = _run(capsys, tmp_path, params, "download")
    assert code == 1 and "unknown section 'experiment_notes:'" in err and "Known sections: generate" in err


@pytest.mark.parametrize("command", ["cache", "train", "evaluate"])
def test_a_misspelt_key_in_another_section_stops_the_stage(capsys, tmp_path, command):
    """A stage refuses a file whose other sections are wrong too: one params file, checked whole."""
    params = _write(tmp_path, lambda d: d["flow"].update(crn="0 4 * * *"))
    code, err = _run(capsys, tmp_path, params, command)
    assert code == 1 and f"{params}:flow: unknown key 'crn' (did you mean 'cron'?)" in err


@pytest.mark.parametrize("section, key, value, expected", [
    ("download", "image_size", "64", "expected an integer, got '64'"),
    ("train", "progress", 1, "expected true/false, got 1"),
    ("evaluate", "ks", [1, "5"], "evaluate.ks[1]: expected an integer, got '5'"),
    ("evaluate", "image_sets", ["a.json"], "evaluate.image_sets: expected a mapping"),
    ("loss", "lambda_div", "0.1", "expected float, got '0.1'"),
])
def test_a_wrong_type_names_the_key_and_the_type(capsys, tmp_path, section, key, value, expected):
    """Types are strict: "64" is not 64 and 1 is not true; the message names the key (and list index)."""
    params = _write(tmp_path, lambda d: d[section].update({key: value}))
    code, err = _run(capsys, tmp_path, params, "params")
    assert code == 1 and expected in err, err


def test_k_that_does_not_divide_embed_dim_stops_the_cache_before_any_work(capsys, tmp_path):
    """K prompts must split model.embed_dim into equal parts: the cache stage refuses, not training hours later."""
    params = _write(tmp_path, lambda d: d["text_encoder"].update(k=3))  # tiny embed_dim is 64
    code, err = _run(capsys, tmp_path, params, "cache")
    assert code == 1 and "embed_dim (64) must be a positive multiple of the number of prompts (3" in err
    assert not (tmp_path / "work").exists()


def test_k_vs_embed_dim_is_checked_without_a_train_section(capsys, tmp_path):
    """A file for caching only (no train section) still gets the K / embed_dim check."""
    params = _write(tmp_path, lambda d: (d["text_encoder"].update(k=3), d.pop("train"), d.pop("loss")))
    code, err = _run(capsys, tmp_path, params, "params")
    assert code == 1 and "must be a positive multiple of the number of prompts (3" in err


def test_a_cache_without_negation_for_a_method_with_the_negation_loss_is_refused(capsys, tmp_path):
    """The negation term needs the negated prompts in the cache: text_encoder.negation false with the method
    multi_prompt_div_neg stops `campe cache` (which would build a cache training cannot use)."""
    params = _write(tmp_path, lambda d: d["text_encoder"].update(negation=False))
    code, err = _run(capsys, tmp_path, params, "cache")
    assert code == 1 and "text_encoder: negation is False but method 'multi_prompt_div_neg' trains with negation" in err


def test_shards_at_another_size_than_the_model_are_refused_before_downloading(capsys, tmp_path):
    """download.image_size must be the model's image_size when training reads those shards."""
    params = _write(tmp_path, lambda d: d["download"].update(image_size=48))
    code, err = _run(capsys, tmp_path, params, "download")
    assert code == 1 and "download.image_size is 48 but model.image_size is 32" in err
    assert not (tmp_path / "work").exists()


def test_the_flow_checks_the_whole_file_before_any_run(tmp_path):
    """The Prefect flow refuses a misspelt section before it starts an MLflow run or a stage."""
    from campe.core.config import ConfigError
    from pipelines.campe_flow import campe_pipeline

    params = _write(tmp_path, _rename("train", "trian"))
    with pytest.raises(ConfigError, match=r"unknown section 'trian:' \(did you mean 'train'\?\)"):
        campe_pipeline.fn(params_file=str(params), generated_dir=str(tmp_path / "gen"), generate=False)
    assert not (tmp_path / "work").exists() and not (tmp_path / "gen").exists()


def test_the_json_schema_is_current_and_checks_params_files(tmp_path):
    """params.schema.json (for editors) is what `campe params schema` writes today, accepts the shipped
    params.yaml and rejects a misspelt section, a misspelt key and a wrong type."""
    import jsonschema

    assert cli.main(["params", "schema", "--out", str(tmp_path / "schema.json")]) == 0
    fresh = json.loads((tmp_path / "schema.json").read_text())
    shipped = json.loads((ROOT / "params.schema.json").read_text())
    assert fresh == shipped, "params.schema.json is stale: run `campe params schema`"
    good = yaml.safe_load((ROOT / "params.yaml").read_text())
    jsonschema.validate(good, shipped)
    for bad in ({**good, "mdoel": good["model"]}, {**good, "train": {**good["train"], "lr_": 1.0}},
                {**good, "train": {**good["train"], "steps": "10"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, shipped)
