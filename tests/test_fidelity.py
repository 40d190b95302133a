"""Can the K prompts differ? The text-side fidelity switches (issue 15 §1), each against today's behaviour:

- text_encoder.apt_placeholder distinct: K different tokens under the APTs (the vocabulary's [unused i], else K fixed
  seeded embeddings); the frozen states of the prompts differ; the one masked pass still equals K separate passes.
- text_encoder.apt_entry input: the APTs replace the input embedding, gradients flow through the frozen layers
  (which stay bit-identical), online only.
- apt_init_noise / distinct inits, and train.apt_lr_mult: the APTs start apart and move relative to their norm.
- loss.div_space pooled: the diversity loss on the pooled LM states before the heads.
- campe.text.diagnostics: pooled-state cosine and APT movement against hand computations; in a run's metrics.json.

Tiny models from configs (random weights) and the packaged MiniLM; nothing is downloaded.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from campe.core.config import ConfigError  # noqa: E402
from campe.core.losses import CampeObjective, diversity_loss, pairwise_cosines  # noqa: E402
from campe.text.cache_manifest import CacheMismatchError, cache_manifest, check_manifest  # noqa: E402
from campe.text.cached_tower import CachedTextTower  # noqa: E402
from campe.text.diagnostics import apt_movement, fidelity_captions, mean_pairwise_cosine, text_diagnostics  # noqa
from campe.text.multiprompt import PLACEHOLDER_SEED, build_text_encoder, reserved_tokens  # noqa: E402
from campe.train.run_config import resolve_run_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a dog", "a red circle on a blue background next to a small green square", "two cats on a mat"]


def tiny_decoder(family: str, vocab_size: int, layers: int = 3) -> torch.nn.Module:
    from transformers import AutoModel, Gemma2Config, LlamaConfig
    cls, extra = {"llama": (LlamaConfig, {}), "gemma2": (Gemma2Config, {"sliding_window": 6})}[family]
    torch.manual_seed(0)
    cfg = cls(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, head_dim=16, vocab_size=vocab_size, **extra)
    return AutoModel.from_config(cfg).eval()


def tiny_bert(vocab_size: int, layers: int = 3) -> torch.nn.Module:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)).eval()


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """A WordPiece tokenizer whose vocabulary has no reserved/unused entries (the seeded fallback's case)."""
    from transformers import BertTokenizerFast
    words = sorted({w for c in CAPTIONS + ["the of image means does not mean : ."] for w in c.replace(":", " : ")
                    .split()} | {"a", "photo", "."})
    path = tmp_path_factory.mktemp("plain_tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


def alone(enc, lm, caption_ids: list[int], j: int) -> torch.Tensor:
    """Reference: the unmodified LM on `caption + prompt_j` alone (for an encoder with the caption kept from seeing
    the prompt, its only mask), with prompt j's placeholder
    (a reserved token, or its seeded embedding via inputs_embeds) and APT j % K put into the hidden state entering
    the entry layer by a forward pre-hook. -> the prompt's last hidden state [H]."""
    k = enc.apt.shape[0]
    prompt, i = enc.prompt_ids[j], j % k
    ids = torch.tensor([caption_ids + prompt])
    apt_at = len(caption_ids) + enc.apt_offsets[j]
    words = lm.get_input_embeddings()(ids).clone()
    if enc.placeholder_embeds is not None:
        words[0, apt_at] = enc.placeholder_embeds[i]
    kw = {"inputs_embeds": words}
    if enc.family == "encoder":
        c, n = len(caption_ids), len(caption_ids) + len(prompt)
        kw["token_type_ids"] = torch.tensor([[0] * c + [1] * len(prompt)])
        # Bidirectional: the caption must not see the prompt (as in the masked pass, where it sees only itself).
        mask = torch.zeros(1, 1, n, n)
        mask[..., :c, c:] = torch.finfo(torch.float32).min
        kw["attention_mask"] = mask
    layers = lm.encoder.layer if enc.family == "encoder" else lm.layers

    def put_apt(module, args, kwargs):
        if args:
            h = args[0].clone()
            h[0, apt_at] = enc.apt[i]
            return (h, *args[1:]), kwargs
        h = kwargs["hidden_states"].clone()
        h[0, apt_at] = enc.apt[i]
        return args, {**kwargs, "hidden_states": h}

    handle = layers[enc.entry_layer].register_forward_pre_hook(put_apt, with_kwargs=True)
    try:
        return lm(**kw).last_hidden_state[0, -1]
    finally:
        handle.remove()


def worst_vs_alone(enc, lm, tok) -> float:
    with torch.no_grad():
        enc.apt.normal_()  # far from the placeholder's state, so a wrong injection cannot pass
        out = enc(enc.layout(CAPTIONS))
        k, worst = enc.apt.shape[0], 0.0
        for b, caption in enumerate(CAPTIONS):
            cap = tok(caption)["input_ids"]
            for j in range(len(enc.prompt_ids)):
                got = (out["pooled_hidden"] if j < k else out["neg_pooled_hidden"])[b, j % k]
                worst = max(worst, (got - alone(enc, lm, cap, j)).abs().max().item())
    return worst


# ------------------------------------------------------------------------------------------------ apt_placeholder

@pytest.mark.parametrize("family", ["bert", "llama", "gemma2"])
@pytest.mark.parametrize("entry", ["first_trainable", "input"])
def test_distinct_reserved_placeholders_keep_the_single_pass_exact(family, entry, tok):
    """[unused0..K-1] under the K APTs (MiniLM's vocabulary); prompt i's state from the one masked pass equals the
    unmodified model on caption + prompt i alone, for the APT entering at the last layer or at the input."""
    lm = tiny_bert(tok.vocab_size) if family == "bert" else tiny_decoder(family, tok.vocab_size)
    enc = build_text_encoder(model=lm, tokenizer=tok, k=3, embed_dim=48, negation=True, trainable_layers=1,
                             apt_placeholder="distinct", apt_entry=entry)
    unused = tok.convert_tokens_to_ids(["[unused0]", "[unused1]", "[unused2]"])
    assert enc.placeholder_ids == unused == reserved_tokens(tok, 3) and enc.placeholder_embeds is None
    for j, prompt in enumerate(enc.prompt_ids):  # positive and negated prompt i carry token i
        assert prompt[enc.apt_offsets[j]] == unused[j % 3]
    assert enc.entry_layer == (0 if entry == "input" else enc.num_layers - 1)
    assert worst_vs_alone(enc, lm, tok) < 1e-4


@pytest.mark.parametrize("family", ["bert", "gemma2"])
def test_distinct_without_reserved_tokens_uses_fixed_seeded_embeddings_and_stays_exact(family, plain_tok):
    assert reserved_tokens(plain_tok, 2) is None
    make = (lambda: tiny_bert(len(plain_tok))) if family == "bert" else (lambda: tiny_decoder(family, len(plain_tok)))
    lm = make()
    enc = build_text_encoder(model=lm, tokenizer=plain_tok, k=2, embed_dim=32, negation=True,
                             apt_placeholder="distinct")
    assert enc.placeholder_embeds.shape == (2, lm.config.hidden_size)
    assert enc.placeholder_ids == [plain_tok.mask_token_id] * 2  # the token stays; its input embedding is replaced
    # Fixed: the same vectors in another build with another init seed (they are part of the cached states).
    again = build_text_encoder(model=make(), tokenizer=plain_tok, k=2, embed_dim=32, apt_placeholder="distinct",
                               init_seed=5)
    assert torch.equal(again.placeholder_embeds, enc.placeholder_embeds) and PLACEHOLDER_SEED != 5
    assert worst_vs_alone(enc, lm, plain_tok) < 1e-4
    with torch.no_grad():  # the placeholders below the entry layer now differ between the prompts
        lay = enc.layout(CAPTIONS)
        h = enc.frozen_hidden(lay)
        rows = torch.arange(3)[:, None]
        at = h[rows, lay.apt_positions]
    assert (at[:, 0] - at[:, 1]).abs().max() > 0.1


def test_distinct_placeholders_make_the_cached_prompt_states_differ(minilm_lm, tok):
    """MiniLM, last layer trainable: with one shared [MASK] the K prompts' cached states (what enters the trainable
    layer) are identical token for token; with [unused i] they differ, at the APT and at the pooled token."""
    def states(placeholder):
        enc = build_text_encoder(model=copy.deepcopy(minilm_lm), tokenizer=tok, k=4, embed_dim=64,
                                 apt_placeholder=placeholder)
        lay = enc.layout(CAPTIONS)
        with torch.no_grad():
            h = enc.frozen_hidden(lay)
        rows = torch.arange(len(CAPTIONS))[:, None]
        return h[rows, lay.apt_positions], h[rows, lay.pooled_positions]  # [B, K, H] each

    for at, pooled in [states("shared")]:
        assert (at - at[:, :1]).abs().max() < 1e-5 and (pooled - pooled[:, :1]).abs().max() < 1e-5
    at, pooled = states("distinct")
    for x in (at, pooled):
        gaps = (x[:, :, None] - x[:, None]).norm(dim=-1)  # [B, K, K]
        off = ~torch.eye(4, dtype=torch.bool)
        assert gaps[:, off].min() > 0.02 * x.norm(dim=-1).mean()  # MiniLM's [unused i] rows were never trained


def test_a_cache_with_another_placeholder_is_refused_and_the_default_manifest_is_unchanged(plain_tok, tmp_path):
    """With the seeded fallback the token ids are the same, so only the manifest's apt_placeholder tells the two
    caches apart; the default's manifest has no new key (its file, and DVC's hash of it, stay as they were)."""
    import json
    shared = build_text_encoder(model=tiny_bert(len(plain_tok)), tokenizer=plain_tok, k=2, embed_dim=32)
    distinct = build_text_encoder(model=tiny_bert(len(plain_tok)), tokenizer=plain_tok, k=2, embed_dim=32,
                                  apt_placeholder="distinct")
    m_shared, m_distinct = cache_manifest(shared), cache_manifest(distinct)
    assert "apt_placeholder" not in m_shared and m_distinct["apt_placeholder"] == "distinct"
    assert m_shared["tokenizer_hash"] == m_distinct["tokenizer_hash"]
    for made, used in ((m_shared, distinct), (m_distinct, shared)):
        (tmp_path / "manifest.json").write_text(json.dumps(made))
        with pytest.raises(CacheMismatchError, match="apt_placeholder"):
            check_manifest(tmp_path, used)
    (tmp_path / "manifest.json").write_text(json.dumps(m_distinct))
    check_manifest(tmp_path, distinct)


def test_new_switches_change_the_run_hash_and_cache_key_only_when_set():
    from stages.ablate import layout_key
    base = resolve_run_config({"train": {"method": "multi_prompt"}})
    assert not {"apt_placeholder", "apt_entry", "apt_init_noise"} & set(json_keys(base, "text_encoder"))
    for section, key, value in (("text_encoder", "apt_placeholder", "distinct"),
                                ("text_encoder", "apt_init_noise", 1.0), ("loss", "div_space", "pooled"),
                                ("train", "apt_lr_mult", 10.0)):
        cfg = resolve_run_config({section: {key: value}, "train": {"method": "multi_prompt",
                                                                   **({key: value} if section == "train" else {})}})
        assert cfg.hash() != base.hash() and cfg.hash(runtime=False) != base.hash(runtime=False), key
    online = {"method": "multi_prompt", "cache_dir": ""}
    assert resolve_run_config({"text_encoder": {"apt_entry": "input"}, "train": online}).hash() != \
        resolve_run_config({"train": online}).hash()
    te = base.text_encoder
    assert layout_key(dataclasses.replace(te, apt_placeholder="distinct")) != layout_key(te)
    assert layout_key(dataclasses.replace(te, apt_init_noise=1.0, init_seed=3)) == layout_key(te)  # not cached


def json_keys(cfg, section: str) -> list[str]:
    """The keys of a section as the run hash sees them (HASHED_IF_NOT applied)."""
    from campe.train.run_config import HASHED_IF_NOT
    d = cfg.to_dict()[section]
    return [k for k, v in d.items() if HASHED_IF_NOT.get((section, k), object()) != v]


# ------------------------------------------------------------------------------------------------ apt_entry

def test_apt_entry_input_sends_gradients_through_frozen_layers_and_trains_online_only(tok, tmp_path):
    lm = tiny_bert(tok.vocab_size)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    enc = build_text_encoder(model=lm, tokenizer=tok, k=2, embed_dim=32, apt_entry="input")
    last = enc.num_layers - 1
    tower = CachedTextTower(enc, online=True)
    lay = enc.layout(CAPTIONS)
    with torch.no_grad():  # eval mode (no dropout): the tower's query-only path = the full forward
        assert torch.allclose(tower({"layout": lay})["embedding"], enc(lay)["embedding"], atol=1e-5)
    tower.train()
    tower({"layout": lay})["embedding"].pow(3).sum().backward()
    assert (enc.apt.grad.abs().sum(1) > 0).all()
    for name, p in lm.named_parameters():
        trainable = name.startswith(f"encoder.layer.{last}.")
        assert p.requires_grad == trainable and (p.grad is not None) == trainable, name
        if not trainable:
            assert torch.equal(p, before[name]), name
    # The init: each APT starts at its placeholder's input embedding (plus 2 % noise), not the last layer's input.
    with torch.no_grad():
        emb = enc.embed(enc.layout(["a photo."]))[0, enc.layout(["a photo."]).apt_positions[0]]
    assert ((enc.apt_init - emb).norm(dim=-1) < 0.1 * emb.norm(dim=-1)).all()
    # Not cacheable: cached states are refused by the tower and by the run config.
    with pytest.raises(ValueError, match="apt_entry 'input'"):
        CachedTextTower(enc, online=False)({"hidden": enc.frozen_hidden(lay), "layout": lay})
    with pytest.raises(ConfigError, match="apt_entry 'input'.*cache_dir"):
        resolve_run_config({"text_encoder": {"apt_entry": "input"}, "train": {"method": "multi_prompt"}})
    resolve_run_config({"text_encoder": {"apt_entry": "input"}, "train": {"method": "multi_prompt", "cache_dir": ""}})


# ------------------------------------------------------------------------------------------------ init and movement

def test_distinct_initialisations(minilm_lm, tok):
    """Today: one start + 2 % noise (APTs nearly parallel). Distinct placeholders start each APT at its own token's
    state; apt_init_noise 1 spreads them as far as their own scale."""
    def cos(**kw):
        enc = build_text_encoder(model=copy.deepcopy(minilm_lm), tokenizer=tok, k=6, embed_dim=384, **kw)
        return mean_pairwise_cosine(enc.apt.detach()[None]), enc

    today, enc = cos()
    assert today > 0.999
    assert torch.equal(enc.apt_init, enc.apt.detach())
    distinct, _ = cos(apt_placeholder="distinct")
    noisy, _ = cos(apt_init_noise=1.0)
    exact, enc0 = cos(apt_placeholder="distinct", apt_init_noise=0.0)
    assert distinct < 0.99 and noisy < 0.9
    lay = enc0.layout(["a photo."])  # noise 0: exactly each placeholder's state entering the trainable layer
    with torch.no_grad():
        assert torch.equal(enc0.apt.detach(), enc0.frozen_hidden(lay)[0, lay.apt_positions[0]])


def test_apt_lr_mult_makes_the_apts_move_relative_to_their_norm(tiny_lm):
    """Same 20 steps on the same batches; apt_lr_mult 30 puts the APTs in their own group at 30 x lr and they move
    ~30 x farther (Adam: about lr per coordinate per step), everything else at the base lr."""
    from campe.train.checkpoint import build_run_model
    from campe.train.optim import make_optimizer
    moved = {}
    for mult in (1.0, 30.0):
        cfg = resolve_run_config({"text_encoder": {"model_path": tiny_lm, "k": 2, "max_length": 24},
                                  "model": {"embed_dim": 32}, "loss": {"lambda_neg": 0.0, "lambda_div": 0.0},
                                  "train": {"method": "multi_prompt", "lr": 1e-3, "apt_lr_mult": mult}})
        model, _, enc = build_run_model(cfg)
        opt = make_optimizer(model, cfg.train)
        lrs = sorted(g["lr"] for g in opt.param_groups)
        assert lrs == ([1e-3, 1e-3] if mult == 1 else [1e-3, 1e-3, 1e-3 * mult])
        g = torch.Generator().manual_seed(0)
        target = torch.randn(len(CAPTIONS), 32, generator=g)
        lay = enc.layout(CAPTIONS)
        for _ in range(20):
            loss = -(model.encode_text(lay)["text"] * target).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        moved[mult] = text_diagnostics(model.text, CAPTIONS)["apt_movement"]
        assert moved[mult] == pytest.approx(apt_movement(enc.apt, enc.apt_init))
    assert moved[30.0] > 10 * moved[1.0] and moved[30.0] > 0.1


# ------------------------------------------------------------------------------------------------ diversity space

def test_diversity_on_pooled_states_sees_what_the_heads_hide(minilm_lm, tok):
    """Fresh MiniLM tower, shared placeholder: the head outputs of the K prompts are near-orthogonal (each head is
    its own random frame) while their pooled states are identical; div_space pooled measures the latter, and its
    gradient reaches the APTs."""
    enc = build_text_encoder(model=copy.deepcopy(minilm_lm), tokenizer=tok, k=4, embed_dim=64)  # eval: no dropout
    out = enc(CAPTIONS)
    model_out = {"image_features": torch.nn.functional.normalize(torch.randn(3, 64), dim=-1),
                 "text_features": out["embedding"], "logit_scale": torch.tensor(10.0),
                 "segments": out["segments"], "pooled_hidden": out["pooled_hidden"]}
    heads = CampeObjective(lambda_div=1.0, div_margin=None)(model_out)
    pooled = CampeObjective(lambda_div=1.0, div_margin=None, div_space="pooled")(model_out)
    assert abs(float(heads["prompt_cosine"])) < 0.2 and float(pooled["prompt_cosine"]) > 0.99
    assert torch.allclose(pooled["diversity_loss"], pairwise_cosines(out["pooled_hidden"]).mean())
    assert torch.allclose(pooled["diversity_loss"], diversity_loss(out["pooled_hidden"], None))
    pooled["diversity_loss"].backward()
    assert (enc.apt.grad.abs().sum(1) > 0).all() and enc.head_weight.grad is None  # before the heads


# ------------------------------------------------------------------------------------------------ diagnostics

def test_diagnostics_match_hand_computation(tiny_lm):
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # cosines 0, 1/sqrt2, 1/sqrt2
    assert mean_pairwise_cosine(a) == pytest.approx((0 + 2 ** -0.5 * 2) / 3)
    apt0 = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert apt_movement(apt0 + torch.tensor([[0.0, 1.0], [1.0, 0.0]]), apt0) == pytest.approx((1 / 5 + 1 / 2) / 2)
    caps = fidelity_captions(4)
    assert len(set(caps)) == 4 and caps == fidelity_captions(4)  # fixed
    from transformers import AutoTokenizer, BertModel
    enc = build_text_encoder(model=BertModel.from_pretrained(tiny_lm), tokenizer=AutoTokenizer.from_pretrained(
        tiny_lm), k=3, embed_dim=48)
    d = text_diagnostics(enc, CAPTIONS)
    with torch.no_grad():
        pooled = enc(CAPTIONS)["pooled_hidden"]
    assert d["prompt_state_cosine"] == pytest.approx(float(pairwise_cosines(pooled).mean()), abs=1e-6)
    centred = pooled - pooled.mean(0, keepdim=True)
    assert d["prompt_state_cosine_centred"] == pytest.approx(float(pairwise_cosines(centred).mean()), abs=1e-6)
    assert d["apt_movement"] == 0.0
    with torch.no_grad():
        enc.apt[0].mul_(1.5)
    assert text_diagnostics(enc, CAPTIONS)["apt_movement"] == pytest.approx(0.5 / 3, rel=1e-5)
    assert text_diagnostics(build_text_encoder(model=BertModel.from_pretrained(tiny_lm), tokenizer=enc.tokenizer,
                                               pooling="mean", embed_dim=48)) == {}


def test_every_prompt_run_records_the_diagnostics(tiny_lm, tmp_path):
    import json

    from campe.train.loop import train
    from campe.train.sources import MemoryPairs
    g = torch.Generator().manual_seed(0)
    pairs = MemoryPairs((torch.rand(16, 3, 32, 32, generator=g) * 255).to(torch.uint8),
                        [f"a red circle number {i}" for i in range(16)])
    for method, has in (("multi_prompt_div", True), ("mean", False)):
        out = tmp_path / method
        cfg = resolve_run_config({
            "text_encoder": {"model_path": tiny_lm, "k": 2, "max_length": 24},
            "model": dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, embed_dim=32, frames=4),
            "loss": {"lambda_div": 0.1, "div_space": "pooled"},
            "train": {"method": method, "out_dir": str(out), "steps": 2, "batch_size": 8, "progress": False,
                      "tracking_uri": "", "metrics_file": str(tmp_path / f"{method}.json"), "apt_lr_mult": 10.0}})
        train(cfg, source=pairs)
        metrics = json.loads((out / "metrics.json").read_text())
        assert json.loads(Path(tmp_path / f"{method}.json").read_text()) == metrics
        keys = {"prompt_state_cosine", "prompt_state_cosine_centred", "apt_movement", "apt_pairwise_cosine"}
        assert (keys <= set(metrics)) == has and not (keys & set(metrics) and not has)
        if has:
            assert 0 < metrics["apt_movement"] and -1 <= metrics["prompt_state_cosine"] <= 1
