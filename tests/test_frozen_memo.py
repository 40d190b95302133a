"""campe.text.frozen_memo: the frozen layers' states of captions seen before are looked up, not recomputed, and the
tower's output is the same tensor as the live computation (bit-equal), including after the trainable layers change.

Tiny BERTs from configs (random weights) with the packaged MiniLM tokenizer; nothing is downloaded.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from campe.text.cached_tower import CachedTextTower  # noqa: E402
from campe.text.frozen_memo import FrozenStateMemo, frozen_fingerprint, memoize_frozen_states  # noqa: E402
from campe.text.multiprompt import build_text_encoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a dog", "a red circle on a blue background next to a small green square", "two cats on a mat"]
OTHER = ["a green square", "three small triangles above a yellow star"]


def tiny_bert(vocab_size: int, layers: int = 3) -> torch.nn.Module:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=160)).eval()


def tower_of(tok, **kw) -> CachedTextTower:
    enc = build_text_encoder(model=tiny_bert(len(tok)), tokenizer=tok, k=3, embed_dim=48, **kw)
    return CachedTextTower(enc, online=False).eval()


def live(tower: CachedTextTower, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return tower(captions)["embedding"]


def test_lookup_is_the_live_computation(tok):
    tower = tower_of(tok, negation=True)
    want = live(tower, CAPTIONS)
    with memoize_frozen_states(max_bytes=1 << 26) as memo:
        first, again = live(tower, CAPTIONS), live(tower, CAPTIONS)
        assert (memo.misses, memo.hits) == (1, 1)
        live(tower, OTHER)
        assert (memo.misses, memo.hits) == (2, 1)
    assert torch.equal(first, want) and torch.equal(again, want)
    # Outside the context nothing is memoised.
    live(tower, CAPTIONS)
    assert (memo.misses, memo.hits) == (2, 1)


def test_the_encoder_itself_looks_up_too(tok):
    """Evaluation runs the loaded model's MultiPromptTextEncoder (no CachedTextTower): the same lookup."""
    enc = tower_of(tok).encoder
    with torch.no_grad():
        want = enc(CAPTIONS)["embedding"]
        with memoize_frozen_states(max_bytes=1 << 26) as memo:
            first, again = enc(CAPTIONS)["embedding"], enc(CAPTIONS)["embedding"]
    assert (memo.misses, memo.hits) == (1, 1) and torch.equal(first, want) and torch.equal(again, want)


def test_trained_layers_change_frozen_states_do_not(tok):
    """The grid's case: another cell (other trainable weights and APTs, same frozen LM) hits the memo and gets its
    own live result."""
    tower = tower_of(tok)
    other = copy.deepcopy(tower)
    with torch.no_grad():
        for p in other.encoder.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    want = live(other, CAPTIONS)
    with memoize_frozen_states(max_bytes=1 << 26) as memo:
        live(tower, CAPTIONS)
        got = live(other, CAPTIONS)
    assert memo.hits == 1 and torch.equal(got, want)
    assert not torch.equal(want, live(tower, CAPTIONS))  # the trainable change mattered


def test_other_frozen_weights_miss(tok):
    tower = tower_of(tok)
    frozen_fingerprint(tower.encoder)
    other = copy.deepcopy(tower)  # a copy is fingerprinted anew: its frozen weights may differ
    frozen = next(p for p in other.encoder.lm.parameters() if not p.requires_grad)
    with torch.no_grad():
        frozen.add_(0.5)
    assert frozen_fingerprint(other.encoder) != frozen_fingerprint(tower.encoder)
    want = live(other, CAPTIONS)
    with memoize_frozen_states(max_bytes=1 << 26) as memo:
        live(tower, CAPTIONS)
        got = live(other, CAPTIONS)
    assert (memo.misses, memo.hits) == (2, 0) and torch.equal(got, want)


def test_training_mode_and_entry_at_input_bypass(tok):
    tower = tower_of(tok)
    inputs = tower_of(tok, apt_entry="input")
    with memoize_frozen_states(max_bytes=1 << 26) as memo:
        tower.train()
        tower(CAPTIONS)
        tower(CAPTIONS)
        live(inputs, CAPTIONS)  # entry layer 0: only the embedding runs below it, nothing to keep
    assert (memo.misses, memo.hits) == (0, 0)


def test_least_recently_used_go_and_nesting(tok):
    tower = tower_of(tok)
    enc = tower.encoder
    one = enc.entry_hidden(enc.layout(CAPTIONS))
    memo = FrozenStateMemo(max_bytes=one.numel() * one.element_size() + 1)
    with memoize_frozen_states(memo):
        live(tower, CAPTIONS)
        live(tower, OTHER)  # evicts CAPTIONS
        assert len(memo.entries) == 1 and memo.bytes <= memo.max_bytes
        with memoize_frozen_states(max_bytes=1 << 26) as inner:
            assert inner is memo  # the outer memo serves nested uses (a grid's cells' val losses)
            live(tower, CAPTIONS)
    assert (memo.misses, memo.hits) == (3, 0)
    with pytest.raises(ValueError, match="max_bytes"):
        FrozenStateMemo(0)
