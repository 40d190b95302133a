"""Model towers: shapes, normalisation, gradient flow, the video path vs per-frame reference, factory, text pooling."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from campe.core.losses import CampeObjective, total_loss
from campe.model import CLIPModel, CONFIGS, ModelConfig, build_model, build_model_from_config, load_config, save_config
from campe.towers import VanillaTextTransformer, VisionTransformer

CAPTIONS = ["a red circle on a blue background", "two green squares", "a small yellow triangle near a large square"]


@pytest.fixture(scope="module")
def tiny():
    model, cfg = build_model("tiny")
    return model.eval(), cfg


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _unit(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5)


def test_shapes_and_normalisation(tiny):
    model, cfg = tiny
    s, D, P = cfg["image_size"], cfg["embed_dim"], (cfg["image_size"] // cfg["patch_size"]) ** 2
    x = _images(3, s)
    with torch.no_grad():
        img, vid = model.encode_image(x), model.encode_video(torch.rand(3, 4, 3, s, s))
        tokens, patches = model.visual.forward_tokens(x), model.encode_patches(x)
        text = model.encode_text(CAPTIONS)
    assert img.shape == (3, D) and _unit(img)
    assert vid.shape == (3, D) and _unit(vid)
    assert tokens.shape == (3, P, cfg["width"])
    assert patches.shape == (3, P, D) and _unit(patches)
    assert text["text"].shape == (3, D) and _unit(text["text"])
    assert not torch.allclose(img[0], img[1])  # different images, different embeddings


def test_gradients_reach_patch_embedding_pool_projection_and_temperature(tiny):
    model, _ = tiny
    model.zero_grad()
    model.train()
    try:
        out = model(images=_images(3, 32, seed=1), text=CAPTIONS)
        total_loss(CampeObjective("softmax")(out)).backward()
    finally:
        model.eval()
    for name in ("visual.conv.weight", "visual.pos_embed", "visual.pool.probe", "visual.pool.kv.weight",
                 "visual.pool.mlp.0.weight", "visual.proj.weight", "logit_scale", "text.token_embedding.weight",
                 "text.positional_embedding", "text.proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()


def test_video_equals_mean_of_frame_features_then_projection(tiny):
    model, _ = tiny
    frames = torch.rand(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.encode_video(frames)
        # reference: each frame of each video alone through the tower, averaged over time, projected, normalised
        want = torch.stack([
            model.visual.proj(torch.stack([model.visual.forward_features(frames[b, t:t + 1])[0]
                                           for t in range(frames.shape[1])]).mean(0))
            for b in range(frames.shape[0])])
        # the projection is linear, so it is also the mean of the per-frame image embeddings, renormalised
        per_frame = torch.stack([model.encode_image(frames[:, t], normalize=False) for t in range(4)], 1)
    assert torch.allclose(got, F.normalize(want, dim=-1), atol=1e-5)
    assert torch.allclose(got, F.normalize(per_frame.mean(1), dim=-1), atol=1e-5)
    assert not torch.allclose(got, model.encode_image(frames[:, 0]), atol=1e-3)  # time is really pooled


def test_temporal_attention_pool_option():
    model, cfg = build_model("tiny", video_pool="attn", frames=4)
    frames = torch.rand(2, 4, 3, 32, 32)
    out = model.encode_video(frames)
    assert out.shape == (2, cfg["embed_dim"]) and _unit(out.detach())
    out.sum().backward()
    assert model.visual.temporal_pool.probe.grad.abs().sum() > 0 and model.visual.temporal_pos.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="frames"):
        model.encode_video(torch.rand(1, 5, 3, 32, 32))


def test_patch_embeddings_use_the_same_head():
    # one patch per image: the attention pool over the single token is exactly the per-patch head
    model, _ = build_model("tiny", image_size=8, patch_size=8)
    x = _images(4, 8, seed=3)
    with torch.no_grad():
        assert torch.allclose(model.encode_patches(x)[:, 0], model.encode_image(x), atol=1e-5)


def test_image_input_uint8_equals_unit_float_and_size_is_checked(tiny):
    model, _ = tiny
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(u8), model.encode_image(u8.float() / 255), atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        model.encode_image(torch.rand(2, 3, 64, 64))


def test_generated_benchmark_image_goes_through(tiny_generated):
    params, root = tiny_generated
    path = next(p for p in sorted(root.rglob("*.jpg")))
    model, _ = build_model("tiny", image_size=params.image_size)
    arr = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
    with torch.no_grad():
        assert _unit(model.encode_image(arr))


def test_vanilla_text_pools_at_last_real_token(tiny):
    model, _ = tiny
    tower: VanillaTextTransformer = model.text
    batch = tower.tokenize(CAPTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded
    scrambled = ids.clone()
    scrambled[mask == 0] = torch.randint(1000, 2000, (int((mask == 0).sum()),))
    with torch.no_grad():
        ref = tower(batch)["text"]
        assert torch.allclose(tower({"input_ids": scrambled, "attention_mask": mask})["text"], ref, atol=1e-6)
        # each caption alone (no padding) gives the same embedding as inside the padded batch
        for i, c in enumerate(CAPTIONS):
            assert torch.allclose(tower([c])["text"][0], ref[i], atol=1e-5)
        # a real token does matter
        changed = ids.clone()
        changed[0, 1] = 2000
        assert not torch.allclose(tower({"input_ids": changed, "attention_mask": mask})["text"][0], ref[0])


def test_vanilla_text_vocab_and_context_from_tokenizer(tiny):
    model, cfg = tiny
    assert cfg["vocab_size"] == len(model.text.tokenizer) == model.text.token_embedding.num_embeddings
    long = " ".join(["word"] * 200)
    batch = model.text.tokenize([long])
    assert batch["input_ids"].shape[1] == cfg["context_length"]
    assert batch["input_ids"][0, -1] == model.text.tokenizer.sep_token_id  # truncation keeps the end-of-text
    with pytest.raises(ValueError, match="context_length"):
        model.text.encode(torch.ones(1, cfg["context_length"] + 1, dtype=torch.long))


def test_factory_refuses_unknown_override_and_bad_values():
    with pytest.raises(ValueError, match="imge_size.*image_size"):
        build_model("tiny", imge_size=48)
    with pytest.raises(ValueError, match="patch_size"):
        build_model("tiny", patch_size=7)
    with pytest.raises(ValueError, match="video_pool"):
        build_model("tiny", video_pool="max")
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        build_model("huge")
    with pytest.raises(ValueError, match="text_tower_kind 'multiprompt' is built elsewhere"):
        build_model("tiny", text_tower_kind="multiprompt")  # that tower is passed in, not built here
    with pytest.raises(ValueError, match="text_tower_kind 'multiprompt' is built elsewhere"):
        build_model("tiny", text_encoder="multiprompt")  # the field's old name is still read
    with pytest.raises(ValueError, match="nn.Module"):
        build_model("tiny", text_tower="multiprompt")
    assert set(CONFIGS) >= {"tiny", "default"}


def test_default_config_is_the_cpu_budget_one():
    cfg = ModelConfig()
    cfg.validate()
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.embed_dim) == (64, 8, 192, 4, 3,
                                                                                                   384)


def test_config_round_trip_rebuilds_the_same_model(tmp_path):
    model, cfg = build_model("tiny", layers=1, contrastive="sigmoid", init_seed=5)
    save_config(cfg, tmp_path / "model_config.json")
    loaded = load_config(tmp_path / "model_config.json")
    assert loaded == json.loads(json.dumps(cfg))
    again, cfg2 = build_model_from_config(loaded)
    assert cfg2 == cfg
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model.logit_bias.item() == -10.0
    other, _ = build_model("tiny", layers=1, contrastive="sigmoid", init_seed=6)
    assert not torch.equal(other.visual.conv.weight, model.visual.conv.weight)


def test_logit_scale_clamped_at_100(tiny):
    model, _ = tiny
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        assert model.scale().item() == pytest.approx(100.0)
        model.clamp_logit_scale_()
        assert model.logit_scale.item() == pytest.approx(np.log(100.0))
        model.logit_scale.fill_(float(np.log(1 / 0.07)))
    assert model(images=None)["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


class BagOfWordsPrompts(nn.Module):
    """A small real tower with the multi-prompt tower's output names (embedding / segments / neg_embedding)."""

    def __init__(self, embed_dim: int = 64, k: int = 4, vocab: int = 50):
        super().__init__()
        self.embed_dim, self.k = embed_dim, k
        self.bag = nn.EmbeddingBag(vocab, embed_dim)
        self.neg_bag = nn.EmbeddingBag(vocab, embed_dim)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        seg = self.bag(ids).view(ids.shape[0], self.k, -1)
        emb = F.normalize(seg.flatten(1), dim=-1)
        return {"embedding": emb, "segments": emb.view_as(seg), "neg_embedding": F.normalize(self.neg_bag(ids), dim=-1)}


def test_external_text_tower_contract_and_full_objective():
    torch.manual_seed(0)
    tower = BagOfWordsPrompts()
    model, cfg = build_model("tiny", text_tower=tower)
    assert cfg["text_tower_kind"] == "external" and model.text is tower
    ids = torch.randint(0, 50, (3, 7))
    out = model(images=_images(3, 32), text=ids)
    assert out["text_features"].shape == (3, 64) and out["segments"].shape == (3, 4, 16)
    assert out["negated"].shape == (3, 64)
    terms = CampeObjective("softmax", lambda_div=0.5, lambda_neg=0.5)(out)
    assert {"contrastive_loss", "diversity_loss", "negation_loss"} <= set(terms)
    total_loss(terms).backward()
    assert tower.bag.weight.grad.abs().sum() > 0 and tower.neg_bag.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embed_dim"):
        build_model("tiny", text_tower=BagOfWordsPrompts(embed_dim=32))


def test_text_tower_with_wrong_output_is_refused():
    class Wrong(nn.Module):
        def forward(self, ids):
            return {"text": F.normalize(torch.randn(ids.shape[0], 10), dim=-1)}

    model, _ = build_model("tiny", text_tower=Wrong())
    with pytest.raises(ValueError, match=r"\[B,64\]"):
        model.encode_text(torch.zeros(2, 3, dtype=torch.long))


def test_model_classes_compose_by_hand():
    cfg = dataclasses.replace(ModelConfig(**CONFIGS["tiny"]), vocab_size=100)
    vision = VisionTransformer(cfg.vision_config(), cfg.embed_dim)  # D: the model's one field, a build argument
    text = VanillaTextTransformer(cfg.text_config(vocab_size=100, pad_id=0), cfg.embed_dim)
    model = CLIPModel(vision, text, cfg)
    out = model(images=_images(2, 32), text={"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
                                             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    assert out["image_features"].shape == out["text_features"].shape == (2, cfg.embed_dim)


def test_model_config_records_the_image_tower_and_old_configs_load_as_scratch(tmp_path):
    """model_config.json names the image tower (scratch | locked): the round trip rebuilds the same kind with the
    same weights; a config saved before the field existed builds the scratch ViT."""
    from campe.locked import LockedImageTower
    from campe.towers import VisionTransformer
    model, cfg = build_model("tiny", layers=1, image_tower="locked", init_seed=3)
    assert cfg["image_tower"] == "locked" and isinstance(model.visual, LockedImageTower)
    save_config(cfg, tmp_path / "model_config.json")
    again, cfg2 = build_model_from_config(load_config(tmp_path / "model_config.json"))
    assert cfg2 == cfg and isinstance(again.visual, LockedImageTower)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scratch, cfg_s = build_model("tiny", layers=1, init_seed=3)
    assert cfg_s["image_tower"] == "scratch"
    ta, tb = scratch.text.state_dict(), model.text.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the text tower's initialisation does not depend on it
    old = {k: v for k, v in cfg_s.items() if k != "image_tower"}  # written before image_tower was recorded
    save_config(old, tmp_path / "old.json")
    again, cfg3 = build_model_from_config(load_config(tmp_path / "old.json"))
    assert cfg3 == cfg_s and isinstance(again.visual, VisionTransformer)
    a, b = scratch.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="image_tower 'frozen' is not one of: scratch, locked"):
        build_model_from_config({**cfg_s, "image_tower": "frozen"})


def test_model_config_saved_before_the_renames_still_builds_the_same_model(tmp_path):
    """model_config.json written before D and the tower kind got one name each: `text_encoder` (the tower kind) and
    a text_tower_config holding embed_dim. It loads, maps text_encoder -> text_tower_kind, and builds the same
    weights; a kind that disagrees with text_tower_kind is an error."""
    from campe.model import config_from_dict
    model, cfg = build_model("tiny", layers=1)
    old = {k: v for k, v in cfg.items() if k != "text_tower_kind"} | {"text_encoder": "vanilla"}
    save_config(old, tmp_path / "model_config.json")
    again, cfg2 = build_model_from_config(load_config(tmp_path / "model_config.json"))
    assert cfg2 == cfg
    for (n, a), (m, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    with pytest.raises(ValueError, match="text_encoder \\(the old name of text_tower_kind\\)"):
        config_from_dict({**cfg, "text_encoder": "external"})
