"""The mixed LoRA batch (``studio.serve.mixed_lora``) on a real (tiny, random) model: its hooks
and its batched decode step give PEFT's ``adapter_names`` logits, and answers through the engine
equal ``generate`` on each adapter alone. Split from test_serve_engine.py (one job a file)."""

from __future__ import annotations

import pytest

from serve_helpers import chat_prompt, make_adapters, reference_ids, serving
from studio.serve.completion import Sampling
from studio.serve.engine import ServeEngine


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    return make_adapters(tiny_chat_model, tmp_path_factory.mktemp("mixed-adapters"), names=["lora1", "lora2"])


@pytest.fixture(scope="module")
def engine(tiny_chat_model, adapters):
    yield from serving(tiny_chat_model, adapters)


@pytest.fixture(scope="module")
def prompt(engine):
    return chat_prompt(engine.tokenizer, "Name three colours.")


def test_mixed_lora_hooks_equal_peft_adapter_names_bit_for_bit(engine, prompt):
    """The mixed lane's cheaper path (``MixedLoRA``: every row the base to PEFT, a hook adds each
    row's LoRA) gives the very logits of PEFT's ``adapter_names``, for groups that are contiguous
    and groups that are not; the hooks do nothing outside ``rows()``."""
    import torch

    from studio.serve.mixed_lora import MixedLoRA

    for name in ("lora1", "lora2"):
        engine.submit(name, prompt, Sampling(max_tokens=1, temperature=0)).text(timeout=60)
    view = engine.pool.mixed_view
    k1, k2 = engine.pool.adapters["lora1"].key, engine.pool.adapters["lora2"].key
    ids = torch.tensor([prompt] * 5)
    names = [k1, k2, None, k1, k1]
    hooks = MixedLoRA(view)
    assert hooks.usable({k1, k2})
    with torch.no_grad():
        peft = view(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
        with hooks.rows(names):
            ours = view(input_ids=ids, adapter_names=["__base__"] * 5).logits
        untouched = view(input_ids=ids, adapter_names=["__base__"] * 5).logits
    hooks.close()
    assert torch.equal(peft, ours)
    assert not torch.equal(ours[0], ours[1]) and torch.equal(untouched[0], untouched[2])
    assert torch.equal(untouched[2], peft[2])


def test_mixed_lora_batched_decode_equals_peft_adapter_names(tiny_chat_model, prompt, monkeypatch):
    """The batched path (adapters stacked per layer, two bmm per layer, after S-LoRA / Punica)
    gives PEFT's ``adapter_names`` logits for a decode step: rows grouped contiguously, scattered,
    one row per adapter, uneven groups beside base rows (zero-padded layout), one scaling for
    every adapter (fused into baddbmm / index_add_) and one per slot, at least half the
    adapters (the whole stack, unused slots fed zeros) and fewer (the used slots gathered); adapters of different ranks (zero-padded stacks) and different target layers. MKL's
    batched kernel may round the sums differently from ``F.linear``: within 1e-5 of the logits'
    scale, the same greedy token; a prefill (several tokens a row) takes the per-group path,
    bit for bit."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache

    from studio.compare.engine import share_base
    from studio.models import load_model
    from studio.serve import mixed_lora
    from studio.serve.mixed_lora import MixedLoRA

    base = load_model(str(tiny_chat_model)).eval()
    ranks = {"a": 4, "b": 8, "c": 8, "d": 2, "e": 8, "f": 4, "g": 8}
    targets = {"d": ["q_proj", "v_proj"]}
    configs = {k: LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                             target_modules=targets.get(k, ["q_proj", "k_proj", "v_proj", "o_proj"]))
               for k, r in ranks.items()}
    view = get_peft_model(share_base(base), configs["a"], adapter_name="a")
    for key in "bcdefg":
        view.add_adapter(key, configs[key])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in view.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    view.eval()
    hooks = MixedLoRA(view, base=base)
    assert hooks.usable(set(ranks)) and hooks.base is base
    calls = []
    batched = MixedLoRA._batched
    monkeypatch.setattr(MixedLoRA, "_batched", lambda self, *a: calls.append(1) or batched(self, *a))

    cases = {"contiguous": list("aabbccdd"), "scattered": ["a", "b", "c", "a", "b", "c", None, "d"],
             "one row each": list("abcde"), "shuffled": list("edcba"),
             "every adapter once, in slot order (the batch is the layout)": list("abcdefg"),
             "uneven beside base": ["a", "a", "a", None, "b", "c", "c", None],
             "three of seven (gathered)": ["c", "a", "b", "a"]}
    assert all(layer.uniform == 2.0 for layer in hooks._layers)  # alpha = 2r everywhere
    uniform = list(cases.items())
    # the same cases with a scaling per slot (adapters of different alphas take that path)
    per_slot = [(label + ", a scaling per slot", keys) for label, keys in uniform]
    for label, keys in uniform + per_slot:
        if label.endswith("per slot"):
            for layer in hooks._layers:
                layer.uniform = None
        ids = torch.tensor([prompt] * len(keys))
        names = [k or "__base__" for k in keys]
        with torch.no_grad():
            cache = DynamicCache(config=view.config)
            peft = view(input_ids=ids, adapter_names=names, cache=cache, use_cache=True).logits
            before = len(calls)
            with hooks.rows(keys):
                ours = base(input_ids=ids).logits
            assert torch.equal(ours, peft) and len(calls) == before, label  # prefill: per group, exact
            step = peft[:, -1:].argmax(-1)
            after = view(input_ids=step, adapter_names=names, cache=copy.deepcopy(cache), use_cache=True).logits
            with hooks.rows(keys):
                decoded = base(input_ids=step, cache=copy.deepcopy(cache), use_cache=True).logits
        assert len(calls) > before, label  # the batched path ran
        scale = after.abs().max()
        assert (decoded - after).abs().max() <= 1e-5 * scale, label
        assert torch.equal(decoded.argmax(-1), after.argmax(-1)), label
        rows = [i for i, k in enumerate(keys) if k is None]
        plain = base(input_ids=step, cache=copy.deepcopy(cache)).logits
        assert torch.equal(decoded[rows], plain[rows]), label  # base rows untouched
    # Below the threshold of adapters (or off), the per-group path: PEFT's bits.
    assert mixed_lora.MIN_BATCHED_GROUPS > 2
    assert not base._forward_hooks and all(not m._forward_hooks for m in base.modules())  # hooks gone


def test_a_batch_over_many_lora_adapters_answers_as_each_alone(tiny_chat_model, adapters, prompt, tmp_path,
                                                               monkeypatch):
    """Four LoRA adapters (two ranks) and the base at once through the engine: the mixed lane's
    decode steps take the batched path (``MixedLoRA._batched`` runs), and every greedy answer
    equals ``generate`` on its adapter alone."""
    from chat_helpers import save_peft_adapter
    from studio.serve.mixed_lora import MixedLoRA

    folders = {"lora1": adapters["lora1"], "lora2": adapters["lora2"],
               "lora3": save_peft_adapter(tiny_chat_model, tmp_path / "lora3", "lora", seed=3, r=8),
               "lora4": save_peft_adapter(tiny_chat_model, tmp_path / "lora4", "lora", seed=4)}
    texts = ["Hi", "Name three colours.", "Count to five", "What is the capital of France?"]
    calls = []
    batched = MixedLoRA._batched
    monkeypatch.setattr(MixedLoRA, "_batched", lambda self, *a: calls.append(1) or batched(self, *a))
    engine = ServeEngine.load(str(tiny_chat_model), "tiny", max_active=8)
    try:
        for name, folder in folders.items():
            engine.register(name, folder)
        prompts = [chat_prompt(engine.tokenizer, text) for text in texts]
        jobs = [(name, ids) for i, name in enumerate([*folders, "tiny"] * 2) for ids in [prompts[i % 4]]]
        refs = {(name, tuple(ids)): reference_ids(tiny_chat_model, folders.get(name), ids, 10) for name, ids in jobs}
        assert len({tuple(r) for r in refs.values()}) >= 6  # the adapters really answer differently
        for name in folders:  # attach every adapter first, so the batch below is one mixed batch
            engine.submit(name, prompt, Sampling(max_tokens=1, temperature=0)).text(timeout=60)
        running = [(name, ids, engine.submit(name, ids, Sampling(max_tokens=10, temperature=0)))
                   for name, ids in jobs]
        for name, ids, completion in running:
            completion.text(timeout=60)
            assert completion.token_ids == refs[(name, tuple(ids))], name
    finally:
        engine.close()
    assert calls
