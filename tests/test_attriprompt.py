"""AttriPrompt's library: the frozen CLIP with deep text prompts against transformers' own forward, k-means,
retrieval, the methods' gradients and losses, shared text passes against the naive ones, a frozen backbone."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from campe.attriprompt.backbone import load_backbone, pooling_index
from campe.attriprompt.config import PromptLearnParams
from campe.attriprompt.kmeans import kmeans
from campe.attriprompt.methods import METHODS, build_method, class_text, vision_pass
from campe.attriprompt.pool import PromptPool
from campe.attriprompt.trainer import gpa_weights, lr_at, train_method
from tests.attri_tiny import class_names, make_dataset, save_tiny_clip

TEXTS = ["red square.", "a photo of a blue circle.", "x", "the small green stripe thing."]


@pytest.fixture(scope="module", params=[False, True], ids=["eos-first", "eos-legacy-argmax"])
def bb(request, tmp_path_factory):
    return load_backbone(save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", legacy_eos=request.param))


@pytest.fixture(scope="module")
def bb1(tmp_path_factory):
    return load_backbone(save_tiny_clip(tmp_path_factory.mktemp("clip1") / "clip"))


def test_pooling_index_follows_both_transformers_rules():
    ids = torch.tensor([[5, 9, 7, 3, 0], [5, 3, 0, 0, 0]])
    assert pooling_index(ids, 2).tolist() == [1, 0]  # legacy: the highest id
    assert pooling_index(ids, 3).tolist() == [3, 1]  # the first occurrence of eos_token_id
    with pytest.raises(ValueError, match="no end-of-text token"):
        pooling_index(ids, 4)


def test_no_prompt_tokens_equal_get_text_features(bb):
    ids, eos = bb.tokenize(TEXTS)
    ref = bb.model.get_text_features(input_ids=ids).pooler_output
    assert torch.allclose(bb.encode_text(ids, eos)[0], ref, atol=1e-6, rtol=0)


def test_image_side_equals_get_image_features_and_hidden_states(bb):
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feat, layers = bb.encode_image(px)
    assert torch.allclose(feat, bb.model.get_image_features(pixel_values=px).pooler_output, atol=1e-6, rtol=0)
    hs = bb.model.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
    assert len(layers) == bb.vision_layers
    for ours, ref in zip(layers, hs[1:]):
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def _words_prompt(bb, words: str) -> tuple[torch.Tensor, int]:
    ids, eos = bb.tokenize([words])
    n = int(eos[0]) - 1
    return bb.token_embedding(ids[0, 1:1 + n])[None].detach(), n


def test_inserted_prompts_pool_at_the_end_token_and_match_the_written_text(bb):
    """Layer-0 prompts = the embeddings of 'a photo of a' == the text with those words written out (CoOp's
    identity), so positions, mask and the end-of-text index are all right after the insertion."""
    ctx, n = _words_prompt(bb, "a photo of a")
    names = ["red square", "blue circle", "x"]
    ids, eos = bb.tokenize([f"{c}." for c in names])
    ours = bb.encode_text(ids, eos, {0: ctx})[0]
    ref_ids, _ = bb.tokenize([f"a photo of a {c}." for c in names])
    ref = bb.model.get_text_features(input_ids=ref_ids).pooler_output
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_deep_prompts_match_forward_pre_hooks_on_transformers_layers(bb):
    """Prompts before blocks 1..L-1 replace positions 1..n (IVLP): the same as hooks that overwrite them inside
    transformers' own text forward."""
    g = torch.Generator().manual_seed(1)
    ctx0, n = _words_prompt(bb, "a photo of a")
    deep = {i: torch.randn(1, n, bb.text_width, generator=g) for i in range(1, bb.text_layers)}
    names = ["red square", "green dot"]
    ids, eos = bb.tokenize([f"{c}." for c in names])
    ours = bb.encode_text(ids, eos, {0: ctx0, **deep})[0]
    hooks = []
    for i, layer in enumerate(bb.model.text_model.encoder.layers):
        if i in deep:
            def pre(mod, args, kwargs, p=deep[i]):
                h = args[0].clone()
                h[:, 1:1 + n] = p
                return (h, *args[1:]), kwargs
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        ref_ids, _ = bb.tokenize([f"a photo of a {c}." for c in names])
        ref = bb.model.get_text_features(input_ids=ref_ids).pooler_output
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, bb.encode_text(ids, eos, {0: ctx0})[0], atol=1e-3)  # the deep prompts act


def test_per_image_prompt_groups_equal_one_pass_each(bb1):
    g = torch.Generator().manual_seed(2)
    ids, eos = bb1.tokenize(TEXTS)
    p = {i: torch.randn(3, 2, bb1.text_width, generator=g) for i in range(bb1.text_layers)}
    together = bb1.encode_text(ids, eos, p)
    for k in range(3):
        alone = bb1.encode_text(ids, eos, {i: v[k:k + 1] for i, v in p.items()})[0]
        assert torch.allclose(together[k], alone, atol=1e-5, rtol=0)


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    B, per, k, d = 4, 20, 3, 16
    centres = torch.randn(B, k, d, generator=g) * 10
    truth = torch.arange(k).repeat_interleave(per)
    x = centres[:, truth] + 0.1 * torch.randn(B, k * per, d, generator=g)
    perm = torch.randperm(k * per, generator=g)
    found, counts, assign = kmeans(x[:, perm], k, iters=5)
    for b in range(B):
        a, t = assign[b], truth[perm]
        # the same partition (up to the cluster numbering) and the planted centres
        assert all(len(set(a[t == c].tolist())) == 1 for c in range(k)) and len(set(a.tolist())) == k
        dist = torch.cdist(found[b], centres[b]).min(1).values
        assert dist.max() < 0.2
    assert counts.sum(1).eq(k * per).all() and sorted(counts[0].tolist()) == [per] * k
    again = kmeans(x[:, perm], k, iters=5)[0]
    assert torch.equal(found, again)  # deterministic


def test_retrieval_picks_the_planted_key_and_composes_in_index_order():
    torch.manual_seed(0)
    pool = PromptPool(size=6, tokens=2, width=8, key_dim=4)
    keys = torch.nn.functional.normalize(pool.keys.detach(), dim=-1)
    q = torch.stack([keys[4], keys[1]])
    r = pool.retrieve(q, top_n=1, mode="hard")
    assert r.index[:, 0].tolist() == [4, 1]
    assert torch.equal(r.prompt[0], pool.values[4]) and torch.allclose(r.pull, torch.ones(2))
    r2 = pool.retrieve(q, top_n=3, mode="hard")
    assert (r2.index[:, :-1] <= r2.index[:, 1:]).all() and 4 in r2.index[0].tolist()
    assert torch.equal(r2.prompt[0], pool.values[r2.index[0]].reshape(6, 8))
    soft = pool.retrieve(q, top_n=2, mode="soft", temperature=1e-4)  # near one-hot on the planted key
    assert soft.prompt.shape == (2, 2, 8) and torch.allclose(soft.prompt[0], pool.values[4], atol=1e-4)


@pytest.fixture(scope="module")
def batch(bb1):
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])


def _params(**kw) -> PromptLearnParams:
    return dataclasses.replace(PromptLearnParams(), **kw)


@pytest.mark.parametrize("name", ["coop", "cocoop", "ivlp", "promptsrc", "attriprompt", "attri-soft"])
def test_gradients_reach_only_the_prompt_learner(bb1, batch, name):
    p = _params(selection="soft") if name == "attri-soft" else _params()
    m = build_method("attriprompt" if name == "attri-soft" else name, bb1, p, seed=1)
    ct = class_text(bb1, class_names(5), p.templates)
    vis = vision_pass(bb1, batch[0], m.vision_layers(), p)
    terms = m.losses(vis, ct, batch[1])
    assert torch.isfinite(terms["loss"]) and abs(float(terms["loss"].detach()) - sum(
        float(v.detach()) for k, v in terms.items() if k != "loss")) < 1e-4
    terms["loss"].backward()
    assert all(q.grad is None and not q.requires_grad for q in bb1.parameters())
    learnable = dict(m.named_parameters())
    assert learnable and not any(k.startswith("bb") for k in learnable)
    for k, q in learnable.items():
        if name == "attriprompt" and k.startswith("pools") and k.endswith("values"):
            continue  # hard retrieval: unselected entries get no gradient (checked below on the selected ones)
        assert q.grad is not None and q.grad.abs().sum() > 0, k
    if name == "attriprompt":
        rs = m.retrieve(vis)
        for i, r in enumerate(rs):
            sel = r.index.unique()
            assert m.pools[i].values.grad[sel].abs().sum() > 0


def test_attriprompt_terms_follow_the_switches(bb1, batch):
    ct = class_text(bb1, class_names(5), PromptLearnParams().templates)

    def terms(**kw):
        p = _params(**kw)
        m = build_method("attriprompt", bb1, p, seed=1)
        return set(m.losses(vision_pass(bb1, batch[0], m.vision_layers(), p), ct, batch[1]))

    assert terms() == {"ce", "ce_fine", "sr_l1", "key", "loss"}
    assert terms(dcl="none", sr=False, retrieval=False) == {"ce", "loss"}
    assert terms(dcl="prompted_static", sr_kl=True) == {"ce", "ce_static", "sr_l1", "sr_kl", "key", "loss"}


def test_shared_text_passes_equal_the_naive_ones(bb1, batch):
    """Hard retrieval: images with the same composition share one pass; the loss and every gradient are the same
    as with one pass per image (and there are fewer groups when compositions repeat)."""
    p_naive, p_shared = _params(shared_passes=False, pool_size=2, top_n=1), _params(pool_size=2, top_n=1)
    ct = class_text(bb1, class_names(5), p_naive.templates)
    out = []
    for p in (p_naive, p_shared):
        m = build_method("attriprompt", bb1, p, seed=1)
        vis = vision_pass(bb1, torch.cat([batch[0], batch[0][:2]]), m.vision_layers(), p)
        labels = torch.cat([batch[1], batch[1][:2]])
        loss = m.losses(vis, ct, labels)["loss"]
        loss.backward()
        text, group, _ = m.text_features(vis, ct)
        out.append((loss.detach(), {k: q.grad.clone() for k, q in m.named_parameters()}, text.shape[0]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    for k in out[0][1]:
        assert torch.allclose(out[0][1][k], out[1][1][k], atol=1e-5), k
    assert out[0][2] == 8 and out[1][2] < 8  # the two repeated images (at least) share a composition


def test_backbone_stays_bit_identical_through_training(tmp_path, bb1):
    folder = make_dataset(tmp_path, "Toy", n_classes=4, per_class=3)
    from campe.attriprompt.fewshot import read_split
    items = read_split(tmp_path, "Toy").train
    before = {k: v.clone() for k, v in bb1.model.state_dict().items()}
    for name in ("coop", "attriprompt"):
        for augment in (False, True):
            p = _params(epochs=2, batch_size=4, augment=augment, lr=0.5)
            m = build_method(name, bb1, p, seed=0)
            start = {k: v.clone() for k, v in m.state_dict().items()}
            rows = train_method(m, bb1, items, class_text(bb1, class_names(4), p.templates), p, seed=0)
            assert len(rows) == 2 and all("loss" in r for r in rows)
            assert any(not torch.equal(start[k], v) for k, v in m.state_dict().items())  # it learned something
    after = bb1.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert folder.is_dir()


def test_training_is_deterministic_under_a_seed(tmp_path, bb1):
    make_dataset(tmp_path, "Toy", n_classes=4, per_class=3)
    from campe.attriprompt.fewshot import read_split
    items = read_split(tmp_path, "Toy").train
    p = _params(epochs=2, batch_size=4, augment=True)
    states = []
    for _ in range(2):
        m = build_method("attriprompt", bb1, p, seed=3)
        train_method(m, bb1, items, class_text(bb1, class_names(4), p.templates), p, seed=3)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_schedule_and_gpa_weights():
    p = _params(epochs=20, lr=0.01, warmup_epochs=1, warmup_lr=1e-5)
    assert lr_at(0, p) == 1e-5 and lr_at(1, p) == pytest.approx(0.005 * (1 + math.cos(math.pi / 20)))
    assert lr_at(19, p) < lr_at(10, p) < lr_at(1, p)
    w = gpa_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1) and max(range(20), key=w.__getitem__) == 14  # epoch 15 (1-based)


def test_registry_has_every_method():
    import campe.attriprompt.attri  # noqa: F401  (build_method imports it; registers "attriprompt")
    assert set(METHODS) == {"zsclip", "coop", "cocoop", "ivlp", "promptsrc", "attriprompt"}
