"""mean_lora: LM mean pooling with peft's LoRA adapters on the frozen LM (the paper's strongest baseline).

- At init (B = 0) the embeddings equal plain `mean` pooling's on the same weights (BERT and a Llama-style decoder,
  each with its architecture's query/value targets in every layer).
- A training step leaves every base weight of the LM bit-identical; the LoRA A/B matrices and the heads get
  gradients and move.
- save -> load (campe.train.checkpoint, campe.load) gives identical embeddings; LoRA weights are in model.pt.
- Online only: the run config ignores a cache_dir with a warning, the cached tower and the cache stage refuse.
- `campe train --method mean_lora` on the tiny config runs online (the ablation's cell: tests/test_ablate.py).

Tiny models from configs (random weights) and the packaged MiniLM tokenizer; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from campe.core.config import ConfigError  # noqa: E402
from campe.text.cache_manifest import CacheError  # noqa: E402
from campe.text.cached_tower import CachedTextTower  # noqa: E402
from campe.text.multiprompt import build_text_encoder  # noqa: E402
from campe.train.checkpoint import FINAL, build_run_model, load_trained_model  # noqa: E402
from campe.train.loop import train  # noqa: E402
from campe.train.run_config import HASHED_IF_NOT, resolve_run_config  # noqa: E402
from tests.test_fidelity import tiny_bert, tiny_decoder  # noqa: E402
from tests.test_train import TINY_MODEL, _pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a dog", "a red circle on a blue background next to a small green square", "two cats on a mat"]


def _run_cfg(lm_path: str, out, **train_kw):
    return resolve_run_config({"model": dict(TINY_MODEL), "text_encoder": {"model_path": lm_path, "max_length": 24},
                               "train": {"method": "mean_lora", "out_dir": str(out), "batch_size": 8, "lr": 1e-2,
                                         "warmup_steps": 1, "cache_dir": "", "tracking_uri": "", "metrics_file": "",
                                         "progress": False, **train_kw}})


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_at_init_lora_embeddings_equal_mean_pooling_on_the_same_weights(family, tok):
    lm = tiny_bert(tok.vocab_size) if family == "bert" else tiny_decoder("llama", tok.vocab_size)
    plain = build_text_encoder(model=copy.deepcopy(lm), tokenizer=tok, pooling="mean", embed_dim=32)
    lora = build_text_encoder(model=copy.deepcopy(lm), tokenizer=tok, pooling="mean", embed_dim=32, lora=True,
                              lora_r=4, lora_alpha=8)
    want = ["query", "value"] if family == "bert" else ["q_proj", "v_proj"]
    assert lora.lora_targets == want
    # An adapter on the query and value projection of every layer, and nothing else trains in the LM.
    names = {n for n, _ in lora._lora_parameters()}
    assert len(names) == 2 * 2 * lora.num_layers and all(any(f".{t}.lora_" in n for t in want) for n in names)
    assert {n for n, p in lora.lm.named_parameters() if p.requires_grad} == names
    assert all(p.abs().sum() > 0 for n, p in lora._lora_parameters() if ".lora_A." in n)
    assert all(not p.any() for n, p in lora._lora_parameters() if ".lora_B." in n)  # B = 0: the LM is unchanged
    with torch.no_grad():
        a, b = plain(CAPTIONS), lora(CAPTIONS)
    assert torch.allclose(a["pooled_hidden"], b["pooled_hidden"], atol=1e-6)
    assert torch.allclose(a["embedding"], b["embedding"], atol=1e-6)  # the same heads: same init_seed
    # ... and a non-zero B changes them (the adapters are in the forward at all)
    with torch.no_grad():
        for n, p in lora._lora_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)
        assert not torch.allclose(lora(CAPTIONS)["embedding"], a["embedding"], atol=1e-3)


def test_lora_init_is_seeded_and_bad_targets_name_the_layers(tok):
    lm = tiny_bert(tok.vocab_size)
    one, two = (build_text_encoder(model=copy.deepcopy(lm), tokenizer=tok, pooling="mean", embed_dim=32, lora=True,
                                   init_seed=s) for s in (3, 3))
    other = build_text_encoder(model=copy.deepcopy(lm), tokenizer=tok, pooling="mean", embed_dim=32, lora=True,
                               init_seed=4)
    a, b, c = (dict(e._lora_parameters()) for e in (one, two, other))
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    with pytest.raises(ValueError, match=r"lora_targets \['q_proj'\].*query"):
        build_text_encoder(model=copy.deepcopy(lm), tokenizer=tok, pooling="mean", embed_dim=32, lora=True,
                           lora_targets=["q_proj"])
    for bad in ({"lora_r": 0}, {"lora_dropout": 1.0}, {"lora_alpha": 0}):
        with pytest.raises(ValueError, match="lora_r must be"):
            build_text_encoder(model=copy.deepcopy(lm), tokenizer=tok, pooling="mean", embed_dim=32, lora=True, **bad)


def test_a_training_step_changes_lora_and_heads_and_leaves_the_lm_bit_identical(tiny_lm, tmp_path):
    cfg = _run_cfg(tiny_lm, tmp_path / "run", steps=2)
    model, _, _ = build_run_model(cfg)
    base = {n: p.detach().clone() for n, p in model.text.lm.named_parameters() if ".lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.text._lora_parameters()}
    heads_before = model.text.head_weight.detach().clone()
    assert base and lora_before and not any(p.requires_grad for n, p in model.text.lm.named_parameters()
                                            if n in base)
    train(cfg, source=_pairs(16), model=model)  # 2 steps: B moves on the first, then A gets a gradient too
    for n, p in model.text.lm.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n  # bit-identical
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, lora_before[n]), n
    assert model.text.head_weight.grad.abs().sum() > 0 and not torch.equal(model.text.head_weight, heads_before)


def test_save_load_gives_identical_embeddings(tiny_lm, tmp_path):
    import campe
    out = tmp_path / "run"
    cfg = _run_cfg(tiny_lm, out, steps=3)
    model, _, _ = build_run_model(cfg)
    train(cfg, source=_pairs(16), model=model)
    state = torch.load(out / FINAL, weights_only=True)["model"]
    saved = [k for k in state if ".lora_B." in k]
    assert saved and all(state[k].abs().sum() > 0 for k in saved)  # trained adapters are in model.pt
    assert not any(".base_layer." in k for k in state)  # the frozen LM is not
    model.eval()
    with torch.no_grad():
        want = model.encode_text(CAPTIONS)["text"]
    loaded, loaded_cfg = load_trained_model(out)
    assert loaded_cfg.text_encoder.lora and loaded_cfg.train.cache_dir == ""
    with torch.no_grad():
        got = loaded.encode_text(CAPTIONS)["text"]
    assert torch.allclose(got, want, atol=1e-6)
    api = campe.load(out)
    assert torch.allclose(api.encode_text(CAPTIONS), want, atol=1e-5)


def test_lora_trains_online_only(tiny_lm, tmp_path):
    sections = {"text_encoder": {"model_path": tiny_lm}, "train": {"method": "mean_lora"}}
    with pytest.warns(UserWarning, match="mean_lora.*trains online: cache_dir 'data/cache/train' is ignored"):
        cfg = resolve_run_config(sections)
    assert cfg.train.cache_dir == "" and cfg.text_encoder.lora and cfg.text_encoder.pooling == "mean"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_run_config({**sections, "train": {"method": "mean_lora", "cache_dir": ""}})
    # lora is the method's (like pooling): online its value wins over the section's; from a cache, the section (the
    # cache stage builds from it) must agree
    assert not resolve_run_config({"text_encoder": {"lora": True}, "train": {"method": "mean", "cache_dir": ""}
                                   }).text_encoder.lora
    assert resolve_run_config({"text_encoder": {"lora": False}, "train": {"method": "mean_lora", "cache_dir": ""}
                               }).text_encoder.lora
    with pytest.raises(ConfigError, match="lora is True but method 'mean' trains with lora: false"):
        resolve_run_config({"text_encoder": {"lora": True}, "train": {"method": "mean"}})
    enc = build_text_encoder(cfg.text_encoder, embed_dim=cfg.model.embed_dim)
    lay = enc.layout(CAPTIONS)
    with pytest.raises(ValueError, match="lora.*cached states cannot be used"):
        CachedTextTower(enc, online=False)({"hidden": enc.frozen_hidden(lay), "layout": lay})
    with torch.no_grad():  # online, the tower is the encoder's forward
        assert torch.allclose(CachedTextTower(enc, online=True)({"layout": lay})["embedding"], enc(lay)["embedding"],
                              atol=1e-6)
    from stages.cache import CacheParams, run_stage as cache_stage
    with pytest.raises(CacheError, match="lora"):
        cache_stage(CacheParams(shards_dir=str(tmp_path), output_dir=str(tmp_path / "c")), cfg.text_encoder)
    assert not (tmp_path / "c").exists()


def test_lora_fields_leave_other_runs_hashes_alone():
    """The new fields are hashed only when set (HASHED_IF_NOT): runs and ablation cells of the other methods keep
    their hashes, and mean_lora's differs from mean's."""
    cfg = resolve_run_config({"train": {"method": "mean", "cache_dir": ""}})
    keys = {k for k, v in cfg.to_dict()["text_encoder"].items() if HASHED_IF_NOT.get(("text_encoder", k),
                                                                                       object()) != v}
    assert not {k for k in keys if k.startswith("lora")}
    lora = resolve_run_config({"train": {"method": "mean_lora", "cache_dir": ""}})
    assert lora.hash() != cfg.hash()
    r16 = resolve_run_config({"text_encoder": {"lora_r": 16}, "train": {"method": "mean_lora", "cache_dir": ""}})
    assert r16.hash() != lora.hash() and r16.text_encoder.lora_r == 16


def test_campe_train_runs_mean_lora_online_on_the_tiny_config(tiny_generated, tiny_lm, tmp_path):
    """`campe train --method mean_lora` with the tiny params file (whose cache_dir is set and never built): it
    warns, trains online and writes a model that loads."""
    from stages.download import DownloadParams, run_stage as download_stage
    from stages.train import add_arguments, run
    from tests.tiny_config import tiny_params
    import yaml
    _, root = tiny_generated
    params = tiny_params(tmp_path, text_model=tiny_lm)
    d = params["download"]
    download_stage(DownloadParams(**{**d, "url_list": str(root / "urls" / "train.parquet")}))
    params["train"].update(tracking_uri="", metrics_file=str(tmp_path / "metrics" / "train.json"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--params", str(tmp_path / "params.yaml"), "--method", "mean_lora", "--steps", "2",
                              "--out", str(tmp_path / "run")])
    with pytest.warns(UserWarning, match="trains online"):
        assert run(args) == 0
    assert not (tmp_path / "data" / "cache").exists()  # no text cache was built or read
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]
    assert saved["method"] == "mean_lora" and saved["train"]["cache_dir"] == "" and saved["text_encoder"]["lora"]
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["steps"] == 2
    model, _ = load_trained_model(tmp_path / "run")
    with torch.no_grad():
        assert model.encode_text(CAPTIONS)["text"].shape == (3, params["model"]["embed_dim"])
