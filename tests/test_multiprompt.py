"""Multi-prompt text encoder: exactness against the unmodified LM, the prompt-wise mask, gradients, pooling, errors.

Tiny decoders (Llama, Gemma, Gemma2, Qwen2, Qwen3, Mistral, OLMo2) are built from configs with random weights; the encoder tests
use the packaged MiniLM-L6. Nothing is downloaded.
"""
from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

transformers = pytest.importorskip("transformers")
from transformers import AutoModel  # noqa: E402

from campe.core.config import ConfigError, from_dict  # noqa: E402
from campe.text.layout import PromptLayout, build_layout, prompt_attention_mask
from campe.text.model_folder import DECODER_TYPES, resolve_model_path
from campe.text.multiprompt import MultiPromptConfig, POOLINGS, build_text_encoder

CAPTIONS = ["a dog", "a red circle on a blue background next to a small green square", "two cats on a mat"]


@pytest.fixture
def minilm(minilm_lm, tok):
    """A fresh encoder factory around a private copy of MiniLM (the wrapper sets requires_grad on its model)."""
    return lambda **kw: build_text_encoder(model=copy.deepcopy(minilm_lm), tokenizer=tok, **kw)


def tiny_decoder(family: str, vocab_size: int, layers: int = 3) -> torch.nn.Module:
    from transformers import (Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Olmo2Config, Qwen2Config,
                              Qwen3Config)
    cls, extra = {"llama": (LlamaConfig, {}), "gemma": (GemmaConfig, {}),
                  # small windows so the sliding-window layers really cut the caption off for later prompt tokens
                  "gemma2": (Gemma2Config, {"sliding_window": 6}), "qwen2": (Qwen2Config, {}),
                  "qwen3": (Qwen3Config, {}), "mistral": (MistralConfig, {"sliding_window": 5}),
                  "olmo2": (Olmo2Config, {"eos_token_id": None, "pad_token_id": 0})}[family]
    torch.manual_seed(0)
    cfg = cls(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, head_dim=16, vocab_size=vocab_size, **extra)
    return AutoModel.from_config(cfg).eval()


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("family", DECODER_TYPES)  # every decoder family the encoder accepts
@pytest.mark.parametrize("trainable", ["all", "last"])
@pytest.mark.parametrize("attn", ["auto", "eager"])
def test_decoder_prompt_equals_running_caption_plus_prompt_alone(family, trainable, attn, tok):
    """The central claim: prompt i's last hidden state from the single masked pass (batch of different caption
    lengths, right padding, negated prompts in the same sequence) equals the unmodified model on
    `caption + prompt_i` alone, with the same APT vector at the same layer. The honest reference for the APT: all
    layers trainable -> it replaces the input embedding (pass inputs_embeds); last layer trainable -> it replaces
    the hidden state entering the last layer (a forward pre-hook on that layer of the unmodified model)."""
    lm = tiny_decoder(family, tok.vocab_size)
    n = lm.config.num_hidden_layers
    enc = build_text_encoder(model=lm, tokenizer=tok, k=3, embed_dim=48, negation=True, attn_implementation=attn,
                             trainable_layers=n if trainable == "all" else 1)
    with torch.no_grad():
        enc.apt.normal_()  # far from the placeholder's own state, so a wrong injection cannot pass
        out = enc(enc.layout(CAPTIONS))
    assert out["pooled_hidden"].shape == (3, 3, 64)
    worst = 0.0
    for b, caption in enumerate(CAPTIONS):
        cap = tok(caption)["input_ids"]
        for j, prompt in enumerate(enc.prompt_ids):
            i, apt_at = j % 3, len(cap) + enc.apt_offsets[j]
            ids = torch.tensor([cap + prompt])
            with torch.no_grad():
                if trainable == "all":
                    emb = lm.embed_tokens(ids).clone()
                    emb[0, apt_at] = enc.apt[i]
                    ref = lm(inputs_embeds=emb).last_hidden_state[0, -1]
                else:
                    def put_apt(module, args, kwargs):
                        h = args[0].clone()
                        h[0, apt_at] = enc.apt[i]
                        return (h, *args[1:]), kwargs
                    handle = lm.layers[n - 1].register_forward_pre_hook(put_apt, with_kwargs=True)
                    try:
                        ref = lm(input_ids=ids).last_hidden_state[0, -1]
                    finally:
                        handle.remove()
            got = (out["pooled_hidden"] if j < 3 else out["neg_pooled_hidden"])[b, i]
            worst = max(worst, (got - ref).abs().max().item())
    assert worst < 1e-4, f"{family}: masked pass differs from caption+prompt alone by {worst}"


# ------------------------------------------------------------------------------------------------ layout and mask

def test_layout_positions_restart_and_padding_on_the_right():
    caps = [[101, 5, 6, 102], [101, 7, 102], [101, 8, 9, 10, 11, 102]]
    prompts = [[20, 99, 21, 22]] * 3 + [[20, 99, 23, 24, 22]] * 3
    lay = build_layout(caps, prompts, [1] * 6, pad_id=0, negation=True)
    assert lay.n_prompts == 3 and lay.neg_pooled_positions.shape == (3, 3)
    for b, cap in enumerate(caps):
        L = len(cap)
        assert lay.input_ids[b, :L].tolist() == cap and lay.segment_ids[b, :L].eq(0).all()
        assert lay.position_ids[b, :L].tolist() == list(range(L))
        for j, p in enumerate(prompts):
            where = (lay.segment_ids[b] == j + 1).nonzero().flatten()
            assert lay.input_ids[b, where].tolist() == p
            assert lay.position_ids[b, where].tolist() == list(range(L, L + len(p)))  # restarts at caption end
            apt = (lay.apt_positions if j < 3 else lay.neg_apt_positions)[b, j % 3]
            last = (lay.pooled_positions if j < 3 else lay.neg_pooled_positions)[b, j % 3]
            assert lay.input_ids[b, apt] == 99 and last == where[-1]
        n = L + sum(map(len, prompts))
        assert lay.segment_ids[b, n:].eq(-1).all() and lay.input_ids[b, n:].eq(0).all()
    assert lay.lengths.tolist() == [len(c) + 27 for c in caps]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_mask_matches_rules_token_by_token(causal, window):
    """The vectorised mask against the rules written out one (query, key) pair at a time."""
    lay = build_layout([[1, 2, 3], [1, 2, 3, 4, 5, 6]], [[7, 8, 9], [7, 8, 9]], [1, 1], pad_id=0)
    mask = prompt_attention_mask(lay, causal=causal, sliding_window=window)
    assert mask.dtype == torch.float32 and mask.shape == (2, 1, 12, 12)
    seg, pos = lay.segment_ids.tolist(), lay.position_ids.tolist()
    for b in range(2):
        for q in range(12):
            for k in range(12):
                sq, sk = seg[b][q], seg[b][k]
                if sq < 0:
                    ok = q == k  # padding: only itself
                else:
                    ok = sk >= 0 and (sk == 0 or sk == sq)
                    ok = ok and (not causal or k <= q) and (window is None or pos[b][q] - pos[b][k] < window)
                assert (mask[b, 0, q, k] == 0).item() == ok, (b, q, k)
                if not ok:
                    assert mask[b, 0, q, k] == torch.finfo(torch.float32).min


def test_layout_select_collate_and_save_roundtrip():
    lay = build_layout([[1, 2], [1, 2, 3, 4, 5]], [[7, 8, 9]] * 2 + [[7, 8, 6, 9]] * 2, [1] * 4, pad_id=0,
                       negation=True, truncated=[False, True])
    buf = io.BytesIO()
    torch.save(lay.to_dict(), buf)
    buf.seek(0)
    back = PromptLayout.from_dict(torch.load(buf, weights_only=True))
    again = PromptLayout.collate([back.select([0]), back.select([1])])
    assert back.select([0]).input_ids.shape[1] == 2 + 14  # trimmed to its own length
    for name, v in lay.to_dict().items():
        assert torch.equal(v, getattr(again, name)), name
    assert again.n_truncated == 1


# ------------------------------------------------------------------------------------------------ encoder (MiniLM)

def test_encoder_prompts_do_not_see_each_other(minilm):
    """Changing prompt 2 (its words or its APT vector) leaves the caption and every other prompt unchanged."""
    enc = minilm(k=4, embed_dim=64, negation=True)
    lay = enc.layout(CAPTIONS)
    with torch.no_grad():
        base = enc.hidden(lay)
        ids = lay.input_ids.clone()
        words = (lay.segment_ids == 2) & (ids != enc.placeholder_id)
        ids[words] = torch.randint(1000, 20000, (int(words.sum()),))
        changed_words = enc.hidden(dataclasses.replace(lay, input_ids=ids))
        enc.apt[1].add_(5.0)
        changed_apt = enc.hidden(lay)
    # the negated prompt 2 (segment K+2 = 6) shares APT 2, so it moves with the APT but not with prompt 2's words
    for changed, moved in ((changed_words, (2,)), (changed_apt, (2, 6))):
        same = (lay.segment_ids >= 0) & ~torch.isin(lay.segment_ids, torch.tensor(moved))
        assert (changed[same] - base[same]).abs().max() < 1e-5
        for s in moved:
            assert (changed[lay.segment_ids == s] - base[lay.segment_ids == s]).abs().max() > 1e-2


def test_encoder_caption_equals_plain_model_on_caption_alone(minilm, minilm_lm, tok):
    """Captions attend only to captions, so in a padded batch with prompts their outputs are plain MiniLM's."""
    enc = minilm()
    lay = enc.layout(CAPTIONS)
    with torch.no_grad():
        h = enc.hidden(lay)
        for b, c in enumerate(CAPTIONS):
            ref = minilm_lm(**tok(c, return_tensors="pt")).last_hidden_state[0]
            assert torch.allclose(h[b, : len(ref)], ref, atol=1e-5)


def test_mean_and_last_token_pool_the_plain_caption_states(minilm, minilm_lm, tok):
    """mean = sentence-transformers' mean pooling of the caption; last_token = the caption's last ([SEP]) state."""
    with torch.no_grad():
        refs = [minilm_lm(**tok(c, return_tensors="pt")).last_hidden_state[0] for c in CAPTIONS]
        mean = minilm(pooling="mean")(CAPTIONS)["pooled_hidden"][:, 0]
        last = minilm(pooling="last_token")(CAPTIONS)["pooled_hidden"][:, 0]
    assert torch.allclose(mean, torch.stack([r.mean(0) for r in refs]), atol=1e-5)
    assert torch.allclose(last, torch.stack([r[-1] for r in refs]), atol=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_shapes_norms_and_batch_invariance(pooling, minilm):
    enc = minilm(pooling=pooling, k=4, embed_dim=64, defo_tokens=8)
    n = {"multi_prompt": 4, "single_prompt": 1, "defo": 8}.get(pooling, 1)
    with torch.no_grad():
        out = enc(CAPTIONS)
        alone = torch.cat([enc([c])["embedding"] for c in CAPTIONS])
    assert out["embedding"].shape == (3, 64) and out["segments"].shape == (3, n, 64 // n)
    assert torch.allclose(out["embedding"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(out["segments"].flatten(1), out["embedding"])
    assert torch.allclose(out["embedding"], alone, atol=1e-5)  # padding never leaks into a caption's embedding
    assert not torch.allclose(out["embedding"][0], out["embedding"][1], atol=1e-3)


def test_state_dict_keys_shapes_and_initialisation_are_fixed(minilm, minilm_lm):
    """The encoder's saved state: the APTs and heads, then the LM's own keys (apt_init and placeholder_embeds are
    rebuilt, never saved); the heads' initial values are the ones the encoder had before its __init__ was split
    into helpers (a checksum: they come from a seeded generator, no matrix product, so any BLAS gives them); the
    APTs (through the LM's forward) equal a fresh build's."""
    import hashlib

    a, b = minilm(negation=True), minilm(negation=True)
    sa, sb = a.state_dict(), b.state_dict()
    k, n, h = a.cfg.n_prompts, a.cfg.n_heads, 384
    assert list(sa) == ["apt", "head_weight", "head_bias"] + [f"lm.{x}" for x in minilm_lm.state_dict()]
    shapes = (sa["apt"].shape, sa["head_weight"].shape, sa["head_bias"].shape)
    assert shapes == ((k, h), (n, h, 384 // n), (n, 384 // n))
    assert hashlib.sha256(sa["head_weight"].numpy().tobytes() + sa["head_bias"].numpy().tobytes()).hexdigest() == (
        "26cb85469541a5fab558bb1e568992918e06b50d97594be7e63c82c5414dfcad")  # taken before the split (k=6, 6 heads)
    assert list(sa) == list(sb) and all(torch.equal(sa[x], sb[x]) for x in sa)
    assert torch.equal(a.apt_init, a.apt) and a.placeholder_embeds is None
    assert {x for x, p in a.named_parameters() if p.requires_grad} == {"apt", "head_weight", "head_bias"} | {
        f"lm.{x}" for x, _ in minilm_lm.named_parameters() if x.startswith(f"encoder.layer.{a.num_layers - 1}.")}


def test_gradients_reach_apt_heads_and_last_layer_only(minilm):
    enc = minilm(negation=True).train()
    out = enc(CAPTIONS)
    target = torch.randn(3, 384)
    (out["embedding"] * target).sum().add((out["neg_embedding"] * target).sum().neg()).backward()
    assert enc.apt.grad is not None and (enc.apt.grad.abs().sum(1) > 0).all()  # every prompt's APT
    assert enc.head_weight.grad.abs().sum((1, 2)).gt(0).all() and enc.head_bias.grad.abs().gt(0).any()
    last = enc.num_layers - 1
    for name, p in enc.lm.named_parameters():
        if name.startswith(f"encoder.layer.{last}."):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert not enc.lm.embeddings.training and enc.lm.encoder.layer[last].training  # frozen part stays in eval


def test_split_forward_from_a_saved_cache_matches_the_full_forward(minilm):
    """What the cache stage will do: store the frozen states per caption, re-batch them differently, train on top."""
    enc = minilm(trainable_layers=2, negation=True)
    lay = enc.layout(CAPTIONS)
    with torch.no_grad():
        full = enc(lay)
        frozen = enc.frozen_hidden(lay)
        cache = [(lay.select([b]).to_dict(), frozen[b, : lay.lengths[b]].clone()) for b in range(3)]
        buf = io.BytesIO()
        torch.save(cache, buf)
        buf.seek(0)
        cache = torch.load(buf, weights_only=True)
        order = [2, 0, 1]
        batch = PromptLayout.collate([PromptLayout.from_dict(cache[b][0]) for b in order])
        h = pad_sequence([cache[b][1] for b in order], batch_first=True)
        h = enc.run_layers(enc.inject(h, batch), batch, enc.start_layer, enc.num_layers)
        out = enc.pool(h, batch)
    assert torch.allclose(out["embedding"], full["embedding"][order], atol=1e-5)
    assert torch.allclose(out["neg_embedding"], full["neg_embedding"][order], atol=1e-5)


def test_tiny_decoder_gradients_with_two_trainable_layers(tok):
    lm = tiny_decoder("qwen2", tok.vocab_size)
    enc = build_text_encoder(model=lm, tokenizer=tok, k=2, embed_dim=32, trainable_layers=2)
    enc(CAPTIONS)["embedding"].pow(3).sum().backward()
    assert (enc.apt.grad.abs().sum(1) > 0).all()
    for name, p in lm.named_parameters():
        trainable = name.startswith(("layers.1.", "layers.2."))
        assert p.requires_grad == trainable and (p.grad is not None) == trainable, name


# ------------------------------------------------------------------------------------------------ bad input

def test_empty_and_non_string_captions_are_rejected(minilm):
    enc = minilm()
    for bad, what in ([["a cat", ""], "caption 1 is empty"], [["a cat", "   "], "caption 1 is empty"],
                      [[], "no captions"], [["a cat", None], "caption 1 is a NoneType"]):
        with pytest.raises(ValueError, match=what):
            enc.layout(bad)


def test_long_captions_are_truncated_never_the_prompts(minilm):
    enc = minilm(max_length=12)
    long = "a very long caption about " + "many small red and blue shapes " * 10
    lay = enc.layout([long, "a dog"])
    assert lay.n_truncated == 1 and lay.truncated.tolist() == [True, False]
    assert lay.caption_lengths.tolist() == [12, 4]
    assert lay.input_ids[0, 11] == enc.tokenizer.sep_token_id  # the tokenizer's closing token survives
    for b in range(2):
        L = int(lay.caption_lengths[b])
        prompts = lay.input_ids[b, L: int(lay.lengths[b])].tolist()
        assert prompts == sum(enc.prompt_ids, [])


def test_unknown_model_path_names_it_and_how_to_fix(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model.*local") as e:
        build_text_encoder(model_path=missing)
    assert "save_pretrained" in str(e.value)
    with pytest.raises(FileNotFoundError, match="someone/not-a-real-model"):
        resolve_model_path("someone/not-a-real-model")


def test_k_must_divide_the_joint_dimension_given_at_build():
    """D is model.embed_dim, a build argument: K prompts that do not split it are refused when the encoder is built."""
    with pytest.raises(ValueError, match="embed_dim \\(384\\) must be a positive multiple of the number of prompts \\(5"):
        build_text_encoder(k=5)  # D defaults to model.embed_dim's default, 384
    with pytest.raises(ValueError, match="embed_dim \\(64\\) must be a positive multiple of the number of prompts \\(3"):
        MultiPromptConfig(k=3).check_embed_dim(64)
    MultiPromptConfig(k=4).check_embed_dim(64)


def test_old_embed_dim_key_is_read_checked_and_dropped():
    """Params files and saved runs from before D had one name state text_encoder.embed_dim: still read (typed
    like a field), dropped from the section; the run config checks it against model.embed_dim."""
    cfg = from_dict(MultiPromptConfig, {"k": 4, "embed_dim": 64}, "params.yaml:text_encoder")
    assert cfg == MultiPromptConfig(k=4) and "embed_dim" not in dataclasses.asdict(cfg)
    with pytest.raises(ConfigError, match="text_encoder.embed_dim: expected an integer"):
        from_dict(MultiPromptConfig, {"embed_dim": "64"}, "params.yaml:text_encoder")


@pytest.mark.parametrize("fields, message", [
    ({"k": 0}, "k must be >= 1"),
    ({"pooling": "cls"}, "pooling 'cls'"),
    ({"template": "the image means:"}, "template must contain '{apt}'"),
    ({"negation": True, "pooling": "mean"}, "negation needs a prompt template"),
    ({"trainable_layers": 0}, "trainable_layers must be >= 1"),
    ({"attn_implementation": "flex_attention"}, "cannot take the prompt-wise 4-D"),
    ({"dtype": "float64"}, "dtype 'float64'"),
])
def test_bad_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(MultiPromptConfig(), **fields).validate()
    with pytest.raises(ConfigError, match=message):  # the project's params loader calls validate()
        from_dict(MultiPromptConfig, fields, "params.yaml:text_encoder")
    with pytest.raises(ValueError, match=message):
        build_text_encoder(**fields)


def test_model_dependent_errors(minilm, tok):
    with pytest.raises(ValueError, match="trainable_layers \\(7\\) exceeds the model's 6 layers"):
        minilm(trainable_layers=7)
    with pytest.raises(ValueError, match="needs .* positions but the model has 512"):
        minilm(max_length=510)
    with pytest.raises(ValueError, match="'sdpa' cannot apply .*softcapping"):
        build_text_encoder(model=tiny_decoder("gemma2", tok.vocab_size, 1), tokenizer=tok, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="unknown MultiPromptConfig field"):
        build_text_encoder(kk=3)


def test_auto_attention_moves_off_implementations_that_cannot_take_the_mask(tok):
    lm = tiny_decoder("llama", tok.vocab_size, 1)
    lm.set_attn_implementation("flex_attention")  # crashes on CPU with a 4-D tensor mask
    enc = build_text_encoder(model=lm, tokenizer=tok, k=2, embed_dim=32)
    assert enc.lm.config._attn_implementation == "sdpa"
    enc(["a dog"])
    g2 = build_text_encoder(model=tiny_decoder("gemma2", tok.vocab_size, 1), tokenizer=tok, k=2, embed_dim=32)
    assert g2.lm.config._attn_implementation == "eager"  # logit softcapping: not sdpa


# ------------------------------------------------------------------------------------------------ debug view

def test_prompts_debug_command_prints_layout_and_writes_png(tmp_path, capsys):
    from campe.cli import main
    out = tmp_path / "mask.png"
    assert main(["prompts", "a red circle on a blue background", "--k", "3", "--negation", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prompt 3" in text and "negated 3" in text and "[APT-2]" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["prompts", "", "--out", str(out)]) == 1  # empty caption: one-line error, no traceback
    assert "caption 0 is empty" in capsys.readouterr().err
