"""Loss masks, truncation, dataset tokenization, statistics and preview of studio.data.tokenize.

Masks are checked against an independent reading of the tokens: for ChatML, the trained tokens
are exactly those after each ``<|im_start|>assistant\\n`` header up to and including the next
``<|im_end|>``. The same checks run on a small local BPE tokenizer (fast) and on the real
SmolLM2 tokenizer and chat template (slow).
"""

from __future__ import annotations

import pytest

from studio.data.tokenize import (
    IGNORE_INDEX,
    ChatTemplateError,
    encode_chat,
    encode_row,
    encode_text,
    has_loss_tokens,
    length_stats,
    preview_html,
    render_preview,
    token_lengths,
    tokenize_dataset,
)

DEFAULT_SYSTEM = "You are a helpful test assistant"
# ChatML that, like SmolLM2's, injects a default system prompt when the first message is not one.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Renders earlier assistant turns as a placeholder (like templates that drop old reasoning):
# the last turn renders differently once a later message exists.
REWRITING = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and not loop.last %}[earlier answer]"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SHAPES = {
    "single-turn": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ],
    "with-system": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello there, how are you?"},
        {"role": "assistant", "content": "I am fine.\nThanks!"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hello!\n\nHow  are you?"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four, I think."},
    ],
}


@pytest.fixture(scope="module")
def toy_tokenizer():
    """A byte-level BPE trained on a few strings, wrapped like a hub tokenizer, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [text for messages in SHAPES.values() for text in (m["content"] for m in messages)]
    corpus += ["system user assistant", DEFAULT_SYSTEM]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from studio.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def chatml_loss_positions(tokenizer, ids):
    """Independent of the module: positions after each assistant header through its <|im_end|>."""
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    positions, i = set(), 0
    while i + len(header) <= len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while j < len(ids) and ids[j] != end:
                j += 1
            positions.update(range(i + len(header), min(j + 1, len(ids))))
            i = j
        else:
            i += 1
    return positions


def check_chat_masks(tokenizer, messages):
    features = encode_chat(tokenizer, messages, max_length=None)
    ids, labels = features["input_ids"], features["labels"]
    assert len(labels) == len(ids) == len(features["attention_mask"])
    assert not features["truncated"] and has_loss_tokens(labels)
    labeled = {i for i, label in enumerate(labels) if label != IGNORE_INDEX}
    assert labeled == chatml_loss_positions(tokenizer, ids)
    assert all(labels[i] == ids[i] for i in labeled)
    trained = tokenizer.decode([ids[i] for i in sorted(labeled)], skip_special_tokens=False)
    assistant = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert trained == "".join(assistant)
    # Exactly what apply_chat_template(tokenize=True) gives: the model sees these very tokens.
    assert ids == list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    return features


# --- fast: a locally built tokenizer --------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_chat_masks_cover_exactly_assistant_turns(toy_tokenizer, shape):
    check_chat_masks(toy_tokenizer, SHAPES[shape])


def test_injected_default_system_prompt_is_not_trained(toy_tokenizer):
    features = check_chat_masks(toy_tokenizer, SHAPES["single-turn"])
    segments = render_preview(toy_tokenizer, SHAPES["single-turn"], max_length=None)
    assert DEFAULT_SYSTEM in segments[0][0] and not segments[0][1]
    assert toy_tokenizer.decode(features["input_ids"]).count(DEFAULT_SYSTEM) == 1


def test_loss_on_all_labels_every_token(toy_tokenizer):
    features = encode_chat(toy_tokenizer, SHAPES["multi-turn"], max_length=None, loss_on="all")
    assert features["labels"] == features["input_ids"]


def test_plain_text_trains_every_token_and_ends_with_eos(toy_tokenizer):
    features = encode_text(toy_tokenizer, "Hello there, how are you?", max_length=None)
    assert features["labels"] == features["input_ids"]
    assert features["input_ids"][-1] == toy_tokenizer.eos_token_id
    assert toy_tokenizer.decode(features["input_ids"]) == "Hello there, how are you?<|im_end|>"


def test_truncation_keeps_the_start_and_flags_it(toy_tokenizer):
    messages = SHAPES["multi-turn"]
    full = encode_chat(toy_tokenizer, messages, max_length=None)
    cut = len(full["input_ids"]) - 3  # inside the second assistant turn
    right = encode_chat(toy_tokenizer, messages, max_length=cut)
    assert right["truncated"] and right["input_ids"] == full["input_ids"][:cut]
    assert right["labels"] == full["labels"][:cut]
    left = encode_chat(toy_tokenizer, messages, max_length=cut, truncation="left")
    assert left["truncated"] and left["labels"] == full["labels"][-cut:]
    exact = encode_chat(toy_tokenizer, messages, max_length=len(full["input_ids"]))
    assert not exact["truncated"] and exact["labels"] == full["labels"]
    # Cut before the first assistant token: nothing left to learn from.
    first = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    early = encode_chat(toy_tokenizer, messages, max_length=first)
    assert early["truncated"] and not has_loss_tokens(early["labels"])


def test_slow_tokenizer_fallback_gives_the_same_masks(toy_tokenizer, monkeypatch):
    expected = encode_chat(toy_tokenizer, SHAPES["multi-turn"], max_length=None)
    # Without offsets the spans come from tokenizing rendered prefixes instead.
    monkeypatch.setattr(type(toy_tokenizer), "is_fast", False)
    assert encode_chat(toy_tokenizer, SHAPES["multi-turn"], max_length=None) == expected


def test_template_that_rewrites_earlier_turns_is_refused(toy_tokenizer):
    tokenizer = toy_tokenizer.__class__(tokenizer_object=toy_tokenizer.backend_tokenizer,
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = REWRITING
    with pytest.raises(ChatTemplateError, match="prefix by prefix"):
        encode_chat(tokenizer, SHAPES["multi-turn"], max_length=None)
    # Single-turn conversations render the same either way, and loss_on="all" needs no spans.
    encode_chat(tokenizer, SHAPES["single-turn"], max_length=None)
    encode_chat(tokenizer, SHAPES["multi-turn"], max_length=None, loss_on="all")


def test_malformed_conversations_are_errors(toy_tokenizer):
    with pytest.raises(ChatTemplateError, match="starts with an assistant"):
        encode_chat(toy_tokenizer, [{"role": "assistant", "content": "hi"}], max_length=None)
    for bad in ([], [{"role": "bot", "content": "x"}], [{"role": "user", "content": None}]):
        with pytest.raises(ValueError):
            encode_chat(toy_tokenizer, bad, max_length=None)
    with pytest.raises(ValueError, match="loss_on"):
        encode_chat(toy_tokenizer, SHAPES["single-turn"], max_length=None, loss_on="user")


def test_tokenize_dataset_mixes_kinds_and_drops_rows_without_loss(toy_tokenizer):
    from datasets import Dataset

    rows = [{"messages": SHAPES[name], "text": None} for name in sorted(SHAPES)]
    rows.append({"messages": None, "text": "Hello there, how are you?"})
    rows.append({"messages": [{"role": "user", "content": "no answer"}], "text": None})
    prompt_only = len(encode_chat(toy_tokenizer, SHAPES["multi-turn"][:1],
                                  max_length=None)["input_ids"]) + 4
    report: dict = {}
    out = tokenize_dataset(Dataset.from_list(rows), toy_tokenizer, max_length=prompt_only,
                           report=report)
    assert out.column_names == ["input_ids", "labels", "attention_mask", "length", "truncated"]
    one_by_one = [encode_row(toy_tokenizer, row, max_length=prompt_only) for row in rows]
    no_loss = sum(not has_loss_tokens(f["labels"]) for f in one_by_one)
    assert no_loss >= 2  # the unanswered row and the multi-turn one cut inside its first prompt
    assert report == {"rows_in": 5, "rows_out": 5 - no_loss, "dropped_no_loss": no_loss,
                      "dropped_truncated": 0, "truncated_kept": report["truncated_kept"]}
    assert len(out) == report["rows_out"] and sum(out["truncated"]) == report["truncated_kept"]
    for row in out:
        assert row["length"] == len(row["input_ids"]) <= prompt_only
        assert has_loss_tokens(row["labels"])
    wide = tokenize_dataset(Dataset.from_list(rows), toy_tokenizer, max_length=512)
    assert len(wide) == 4 and not any(wide["truncated"])
    strict: dict = {}
    tokenize_dataset(Dataset.from_list(rows), toy_tokenizer, max_length=prompt_only,
                     drop_truncated=True, report=strict)
    assert strict["rows_out"] == report["rows_out"] - report["truncated_kept"]


def test_preview_is_built_from_the_training_tokens(toy_tokenizer):
    messages = SHAPES["multi-turn"]
    features = encode_chat(toy_tokenizer, messages, max_length=None)
    segments = render_preview(toy_tokenizer, messages, max_length=None)
    assert "".join(text for text, _ in segments) == toy_tokenizer.decode(features["input_ids"])
    assert [text for text, counts in segments if counts] == \
        [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    html = preview_html(segments)
    assert "&lt;|im_start|&gt;" in html and "<|im_start|>" not in html
    assert html.count('<mark class="loss">') == 2 and "pre-wrap" in html
    assert preview_html([("a<b>\n", True)]).count('<mark class="loss">a&lt;b&gt;\n</mark>') == 1


def test_token_lengths_and_stats(toy_tokenizer):
    rows = [{"messages": SHAPES[name]} for name in sorted(SHAPES)] + [{"text": "Four."}]
    lengths = token_lengths(toy_tokenizer, rows)
    assert lengths[:3] == [len(encode_chat(toy_tokenizer, SHAPES[name], max_length=None)
                               ["input_ids"]) for name in sorted(SHAPES)]
    stats = length_stats([1, 2, 3, 4, 10])
    assert (stats["count"], stats["min"], stats["max"], stats["mean"], stats["median"]) == \
        (5, 1, 10, 4.0, 3.0)
    assert stats["p90"] == pytest.approx(7.6) and stats["p99"] == pytest.approx(9.76)
    assert sum(stats["histogram"]["counts"]) == 5
    assert len(stats["histogram"]["edges"]) == len(stats["histogram"]["counts"]) + 1
    assert length_stats([])["count"] == 0 and length_stats([7])["histogram"]["counts"] == [1]


# --- slow: the real SmolLM2 tokenizer and chat template -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_smollm2_chat_masks(smol_tokenizer, shape):
    features = check_chat_masks(smol_tokenizer, SHAPES[shape])
    all_labels = encode_chat(smol_tokenizer, SHAPES[shape], max_length=None, loss_on="all")
    assert all_labels["labels"] == features["input_ids"]


@pytest.mark.slow
def test_smollm2_default_system_prompt_is_not_trained(smol_tokenizer):
    messages = SHAPES["single-turn"]
    segments = render_preview(smol_tokenizer, messages, max_length=None)
    assert "named SmolLM" in segments[0][0] and not segments[0][1]
    assert [text for text, counts in segments if counts] == ["Four.<|im_end|>"]


@pytest.mark.slow
def test_smollm2_plain_text_and_truncation(smol_tokenizer):
    text = encode_text(smol_tokenizer, "Continued pre-training text.", max_length=None)
    assert text["labels"] == text["input_ids"]
    assert text["input_ids"][-1] == smol_tokenizer.eos_token_id
    short = encode_text(smol_tokenizer, "Continued pre-training text.", max_length=3)
    assert short["truncated"] and short["input_ids"] == text["input_ids"][:3]
    full = encode_chat(smol_tokenizer, SHAPES["multi-turn"], max_length=None)
    cut = encode_chat(smol_tokenizer, SHAPES["multi-turn"], max_length=len(full["input_ids"]) - 2)
    assert cut["truncated"] and cut["labels"] == full["labels"][:-2]
