"""Packing: every token kept, no example split, and (on a real tiny Llama) no cross-attention."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from studio.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    pack_examples,
    packing_efficiency,
    split_pack,
)

VOCAB = 128


def make_examples(lengths, seed=0, masked_prefix=True):
    """Token ids from the vocab; labels mask a random prompt prefix like chat examples do."""
    rng = random.Random(seed)
    examples = []
    for length in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        prompt = rng.randrange(0, length) if masked_prefix else 0
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


# --- pack_examples ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60), max_length=st.integers(40, 96))
def test_packing_keeps_every_token_in_order_and_never_splits(lengths, max_length):
    examples = make_examples(lengths)
    packs = pack_examples(examples, max_length)

    seen = []
    for pack in packs:
        assert len(pack["input_ids"]) <= max_length
        assert len(pack["labels"]) == len(pack["position_ids"]) == len(pack["input_ids"])
        assert sum(pack["seq_lengths"]) == len(pack["input_ids"])
        start = 0
        for index, length in zip(pack["example_indices"], pack["seq_lengths"]):
            # The whole example, contiguous and in its own order, with positions 0..n-1.
            assert pack["input_ids"][start:start + length] == examples[index]["input_ids"]
            assert pack["labels"][start:start + length] == examples[index]["labels"]
            assert pack["position_ids"][start:start + length] == list(range(length))
            start += length
        seen += pack["example_indices"]
    assert sorted(seen) == list(range(len(examples)))  # each example exactly once


def test_best_fit_decreasing_fills_packs():
    examples = make_examples([6, 4, 5, 5, 3, 7])  # 30 tokens: three full packs of 10 exist
    packs = pack_examples(examples, 10)
    assert sorted(sum(p["seq_lengths"]) for p in packs) == [10, 10, 10]
    assert packing_efficiency(packs, 10) == 1.0


def test_too_long_or_empty_examples_are_errors():
    with pytest.raises(ValueError, match="more than max_length"):
        pack_examples(make_examples([5, 11]), 10)
    with pytest.raises(ValueError, match="empty"):
        pack_examples([{"input_ids": [], "labels": []}], 10)
    with pytest.raises(ValueError, match="labels"):
        pack_examples([{"input_ids": [1, 2], "labels": [1]}], 10)


# --- PackedCollator ---------------------------------------------------------------------------


def test_collator_rows_pad_as_own_sequence_and_mask_first_labels():
    packs = pack_examples(make_examples([5, 3, 4, 6, 2], masked_prefix=False), 9)
    batch = PackedCollator(pad_token_id=0)(packs)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask, on purpose
    longest = max(len(p["input_ids"]) for p in packs)
    assert batch["input_ids"].shape == (len(packs), longest)
    for row, pack in enumerate(packs):
        n = len(pack["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == pack["input_ids"]
        assert batch["position_ids"][row, :n].tolist() == pack["position_ids"]
        assert batch["position_ids"][row, n:].tolist() == list(range(longest - n))
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        start = 0
        for length in pack["seq_lengths"]:
            assert batch["labels"][row, start] == IGNORE_INDEX  # never learn across a boundary
            assert batch["labels"][row, start + 1:start + length].tolist() == \
                pack["labels"][start + 1:start + length]
            start += length


def test_collator_flatten_and_boundaries_from_position_ids():
    packs = pack_examples(make_examples([5, 3, 4, 6]), 9)
    flat = PackedCollator(flatten=True)(packs)
    assert flat["input_ids"].shape == (1, 18)
    # Trainer drops seq_lengths (not a forward() argument); position_ids still mark the examples.
    stripped = [{k: v for k, v in p.items() if k not in ("seq_lengths", "example_indices")}
                for p in packs]
    for pack, bare in zip(packs, stripped):
        assert split_pack(bare) == split_pack(pack)
    assert torch.equal(PackedCollator()(stripped)["labels"], PackedCollator()(packs)["labels"])
    padded = PackedCollator(pad_to_multiple_of=8)(packs)
    assert padded["input_ids"].shape[1] % 8 == 0


# --- the real proof: a tiny Llama ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                         max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=request.param,
                                             dtype=torch.float32)
    assert model.config._attn_implementation == request.param
    return model.eval()


def _alone_logits(model, example):
    with torch.no_grad():
        return model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]


def _assert_each_example_as_if_alone(model, examples, packs, batch, flatten):
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    row_packs = [[i for p in packs for i in p["example_indices"]]] if flatten else \
        [p["example_indices"] for p in packs]
    for row, indices in enumerate(row_packs):
        start = 0
        for index in indices:
            n = len(examples[index]["input_ids"])
            torch.testing.assert_close(logits[row, start:start + n],
                                       _alone_logits(model, examples[index]), atol=1e-5, rtol=0)
            start += n


@pytest.mark.parametrize("flatten", [False, True])
def test_packed_examples_never_attend_to_each_other(tiny_llama, flatten):
    examples = make_examples([7, 12, 3, 9, 15, 5, 1, 10], seed=1)
    packs = pack_examples(examples, 24)
    assert any(len(p["seq_lengths"]) > 1 for p in packs)
    batch = PackedCollator(pad_token_id=0, flatten=flatten)(packs)
    _assert_each_example_as_if_alone(tiny_llama, examples, packs, batch, flatten)


def test_the_model_needs_no_mask_and_no_cache(tiny_llama):
    """Negative controls: the test above would catch a leak. A 2D attention mask or a KV cache
    turns transformers' packed-sequence detection off and later examples see earlier ones."""
    examples = make_examples([6, 8, 5], seed=2)
    packs = pack_examples(examples, 19)
    assert len(packs) == 1
    batch = PackedCollator()(packs)
    last = examples[packs[0]["example_indices"][-1]]
    alone = _alone_logits(tiny_llama, last)
    with torch.no_grad():
        masked = tiny_llama(**batch, attention_mask=torch.ones_like(batch["input_ids"]),
                            use_cache=False).logits[0, -len(alone):]
        cached = tiny_llama(**batch, use_cache=True).logits[0, -len(alone):]
        right = tiny_llama(**batch, use_cache=False).logits[0, -len(alone):]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(masked, alone, atol=1e-3)
    assert not torch.allclose(cached, alone, atol=1e-3)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("masked_prefix", [False, True])
def test_packed_loss_is_token_weighted_mean_of_example_losses(tiny_llama, flatten, masked_prefix):
    # masked_prefix=False labels every token (plain text): each example's first label is real, so
    # a collator that let the previous example's last token predict it would change the loss.
    examples = make_examples([7, 12, 3, 9, 15, 5, 2, 10], seed=3, masked_prefix=masked_prefix)
    packs = pack_examples(examples, 24)
    batch = PackedCollator(flatten=flatten)(packs)
    with torch.no_grad():
        packed_loss = tiny_llama(**batch, use_cache=False).loss
        total, weight = 0.0, 0
        for example in examples:
            # An example alone is trained on its labels shifted by one: labels[1:] that count.
            n = sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)
            if n == 0:
                continue
            ids = torch.tensor([example["input_ids"]])
            loss = tiny_llama(input_ids=ids, labels=torch.tensor([example["labels"]]),
                              use_cache=False).loss
            total, weight = total + loss.item() * n, weight + n
    assert packed_loss.item() == pytest.approx(total / weight, abs=1e-5)
