"""The text model folder: a folder that cannot serve as `text_encoder.model_path`, or a language model family the
multi-prompt encoder does not drive, is refused in one line before any weights load, and the cache on disk stays
as it was (no `--on-mismatch rebuild` deletes it first)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.bad_inputs._util import run_cli, tree_hash, write_shards
from tests.tiny_config import write_tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")
MUST_HOLD = "must hold config.json, the weights (model.safetensors or pytorch_model.bin) and the tokenizer files"


@pytest.fixture(scope="module")
def project(tiny_lm, tmp_path_factory):
    """A tiny project whose cache was made with the tiny BERT: (root, params file)."""
    root = tmp_path_factory.mktemp("models")
    params = write_tiny_params(root / "params.yaml", root=root, text_model=tiny_lm)
    write_shards(root / "data" / "shards" / "train")
    from campe.cli import main
    assert main(["cache", "--params", str(params)]) == 0
    return root, params


def _with_model(params: Path, model_path: Path) -> Path:
    """A copy of the params file with text_encoder.model_path = model_path."""
    cfg = yaml.safe_load(params.read_text())
    cfg["text_encoder"]["model_path"] = str(model_path)
    out = params.with_name(f"params-{model_path.name}.yaml")
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _without(tiny_lm: str, dst: Path, names: set[str]) -> Path:
    shutil.copytree(tiny_lm, dst, ignore=lambda _d, files: [f for f in files if f in names])
    return dst


def _refused(capsys, root: Path, params: Path, *expected: str) -> str:
    cache = root / "data" / "cache" / "train"
    before = tree_hash(cache)
    code, err = run_cli(capsys, "cache", "--params", str(params), "--on-mismatch", "rebuild")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("campe cache: error: text_encoder.model_path "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert tree_hash(cache) == before and before  # the existing cache is untouched
    return lines[0]


def test_model_folder_without_config_json_names_the_key_folder_and_contents(project, tiny_lm, tmp_path, capsys):
    """A model folder without config.json: the error names text_encoder.model_path, the folder and what a model
    folder must hold (not transformers' message about the Hugging Face hub)."""
    root, params = project
    folder = _without(tiny_lm, tmp_path / "no-config", {"config.json"})
    line = _refused(capsys, root, _with_model(params, folder), str(folder), "has no config.json", MUST_HOLD)
    assert "huggingface.co" not in line and "hub" not in line


def test_model_folder_without_tokenizer_names_the_tokenizer_files(project, tiny_lm, tmp_path, capsys):
    """A model folder without any tokenizer file: the same one line, saying the tokenizer files are missing."""
    root, params = project
    folder = _without(tiny_lm, tmp_path / "no-tokenizer",
                      {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"})
    _refused(capsys, root, _with_model(params, folder), str(folder), "has no tokenizer files", MUST_HOLD)


def test_model_folder_without_weights_names_the_weights(project, tiny_lm, tmp_path, capsys):
    """A model folder with config and tokenizer but no weights file: the error says the weights are missing."""
    root, params = project
    folder = _without(tiny_lm, tmp_path / "no-weights", {"model.safetensors", "pytorch_model.bin"})
    _refused(capsys, root, _with_model(params, folder), str(folder), "has no weights", MUST_HOLD)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> Path:
    """A 2-layer Gemma3 text model (random weights) with the MiniLM tokenizer, saved as a local model folder."""
    import torch
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    from campe.text.model_folder import resolve_model_path
    path = tmp_path_factory.mktemp("gemma3") / "tiny-gemma3"
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"), local_files_only=True)
    torch.manual_seed(0)
    Gemma3TextModel(Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=16, intermediate_size=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_unsupported_lm_family_is_refused_before_loading_listing_the_supported(project, tiny_gemma3, capsys):
    """A Gemma3 checkpoint (loads in transformers, but its rotary embedding differs per layer type) gets the
    project's 'unsupported language model class' line listing the supported families, not a TypeError from
    inside transformers; `campe cache` keeps the existing cache and `campe train` writes no checkpoint."""
    from campe.text.model_folder import DECODER_TYPES, ENCODER_TYPES
    root, params = project
    gemma_params = _with_model(params, tiny_gemma3)
    line = _refused(capsys, root, gemma_params, "unsupported language model class Gemma3TextModel",
                    "model_type 'gemma3_text'", str(tiny_gemma3))
    assert all(name in line for name in ENCODER_TYPES + DECODER_TYPES)
    code, err = run_cli(capsys, "train", "--params", str(gemma_params), "--cache", "none")
    assert code == 1 and "unsupported language model class Gemma3TextModel" in err and len(err.splitlines()) == 1
    assert not list((root / "data" / "models" / "campe").glob("*"))  # no checkpoint, no MLflow run id
