"""PEFT's generate for prompt-learning adapters under transformers 5 (``studio.peft_compat``):
greedy ``generate`` must give what greedy decoding with the adapter's own forward gives (the
forward is what training optimised). Before the patch, prefix tuning answered exactly as the base
model and prompt tuning drifted from the third token."""

from __future__ import annotations

import pytest
import torch

from chat_helpers import save_peft_adapter
from studio.models import load_model, load_tokenizer

NEW_TOKENS = 8


def forward_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding by the full forward, no cache: the reference."""
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -n:].tolist()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_follows_the_adapters_forward(tiny_chat_model, tmp_path, method):
    from peft import PeftModel

    folder = save_peft_adapter(tiny_chat_model, tmp_path / method, method, seed=3)
    tokenizer = load_tokenizer(str(tiny_chat_model))
    # load_model installs the fix (every model the studio generates with is loaded through it)
    model = PeftModel.from_pretrained(load_model(str(tiny_chat_model)), str(folder)).eval()
    base = load_model(str(tiny_chat_model)).eval()
    ids = tokenizer("Convert the date: 24 November 1992", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        as_base = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    expected = forward_greedy(model, ids, NEW_TOKENS)
    assert generated[:len(expected)] == expected[:len(generated)] and len(generated) >= 3, (generated, expected)
    assert generated != as_base  # the adapter is heard (prefix tuning answered as the base before)
