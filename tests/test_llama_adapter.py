"""LLaMA-Adapter (``studio/methods/adaption_prompt.py``) through PEFT's AdaptionPromptConfig.

PEFT's adapter attention re-implements part of the attention (it recomputes the queries and
wraps the attention module's call), so it is checked here against transformers 5 itself: with
its zero-initialised gates the adapted model is exactly the base, a backward reaches the gates,
``generate`` with the cache equals greedy decoding by full forwards (also for left-padded
batches), and examples packed in one row stay apart. Then one tiny model is trained through a
real worker process and its saved adapter is reloaded with plain PEFT, detected and answered by
Compare and the serve engine exactly as ``generate`` on that adapter alone, and exported
adapter-only (merged is refused). Unsupported architectures are refused with the reason.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import CONFIGS, module_home, tiny_llama_config
from studio.arch import ArchInfo
from studio.methods import get_method
from studio.methods.adaption_prompt import SUPPORTED
from studio.methods.base import ApplyContext, SettingError
from studio.models import load_config
from studio.runspec import RunSpec, RunSpecError

SPEC = get_method("llama_adapter")
TINY = {"llama": tiny_llama_config,
        "gpt2": lambda: GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                   bos_token_id=0, eos_token_id=0)}


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    """One studio home for the module: the trained run is shared by the tests that use it. Its
    worker keeps fp32 without timing the bf16 probe, as conftest's per-test home does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_STUDIO_PRECISION_PROBE", "fp32")
        yield from module_home(tmp_path_factory, "llama-adapter-home")


def adapted(config, **settings):
    """(base, the same base with LLaMA-Adapter applied), both in eval mode."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = SPEC.apply(copy.deepcopy(base), ArchInfo.from_config(config), SPEC.params(settings),
                       ApplyContext())
    return base, model.eval()


def open_gates(model, value: float = 0.7) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(value)


def greedy_by_forward(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with a full forward over the whole sequence at every step (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            step = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
    return ids


def test_the_supported_model_types_are_peft_s():
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    assert SUPPORTED == {k: v.target_modules for k, v in TRANSFORMERS_MODEL_CONFIG.items()}


@pytest.mark.parametrize("family", list(TINY))
def test_zero_gates_give_the_base_then_it_trains_and_generates_with_the_cache(family):
    base, model = adapted(TINY[family]())
    ids = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)  # zero-init
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n.rsplit(".", 1)[-1]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == {"adaption_prompt", "adaption_gate"}
    gate_grads = [p.grad for n, p in model.named_parameters() if n.endswith("adaption_gate")]
    assert len(gate_grads) == 2 and all(g is not None and g.abs().item() > 0 for g in gate_grads)
    model.eval()
    open_gates(model)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
    expected = greedy_by_forward(model, ids[:1], 6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]),
                                max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, expected)
    # A left-padded batch (Compare, evaluation) answers each row as that row alone.
    short = ids[1:, 4:]
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        both = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(both[0], expected[0])
    assert torch.equal(both[1, 4:], greedy_by_forward(model, short, 6)[0])


def test_examples_packed_in_one_row_stay_apart(tiny_chat_model):
    _, model = adapted(tiny_llama_config())
    open_gates(model)
    first, second = torch.randint(3, 512, (1, 7)), torch.randint(3, 512, (1, 5))
    packed = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = [model(input_ids=x, use_cache=False).logits for x in (first, second)]
    torch.testing.assert_close(together, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    assert SPEC.packs_exactly
    RunSpec(model=str(tiny_chat_model), method="llama_adapter", sample_task="dates", packing=True).validate()


def test_the_bake_off_takes_it_at_the_paper_s_learning_rate(tiny_chat_model):
    from studio.bakeoff import Budget, method_spec

    run = method_spec(str(tiny_chat_model), "llama_adapter", Budget(), sample_task="dates")
    assert run.learning_rate == 9e-3 and run.method == "llama_adapter"


@pytest.mark.parametrize("family,model_type", [("qwen2-0.5b", "qwen2"), ("pythia-160m", "gpt_neox"),
                                               ("gemma-2b", "gemma")])
def test_architectures_peft_does_not_implement_are_refused(family, model_type, tmp_path):
    arch = ArchInfo.from_config(load_config(str(CONFIGS / f"{family}.json")))
    with pytest.raises(SettingError, match=f"llama, mistral, gpt2; this model is '{model_type}'"):
        SPEC.count(arch, SPEC.params({}))
    # ... and before a run row exists (RunSpec.validate asks the method's run_check).
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / f"{family}.json").read_text())
    with pytest.raises(RunSpecError, match=f"method_settings.*'{model_type}'"):
        RunSpec(model=str(folder), method="llama_adapter", sample_task="dates").validate()


def test_layers_and_head_geometry_are_bounded_with_the_reason():
    arch = ArchInfo.from_config(tiny_llama_config())  # 2 layers
    assert SPEC.count(arch, SPEC.params({"adapter_layers": 2})) == SPEC.count(arch, SPEC.params({}))
    assert SPEC.count(arch, SPEC.params({"adapter_len": 3, "adapter_layers": 1})).trainable == 3 * 64 + 1
    with pytest.raises(SettingError, match="'adapter_layers' is 3 but this model has 2 layers; choose 1 to 2"):
        SPEC.count(arch, SPEC.params({"adapter_layers": 3}))
    with pytest.raises(SettingError, match="'adapter_len' must be at least 1"):
        SPEC.params({"adapter_len": 0})
    # Queries wider than the hidden size: PEFT would regroup the key/value heads wrongly.
    wide = ArchInfo.from_config(tiny_llama_config(head_dim=32))
    with pytest.raises(SettingError, match="heads × head_dim = hidden size.*4 × 32 = 128 against 64"):
        SPEC.count(wide, SPEC.params({}))


# ------------------------------------------------------------- trained through a real worker

@pytest.fixture(scope="module")
def trained(tiny_chat_model):
    """One run trained through a real worker process: (db, run id, its adapter folder)."""
    from studio.db import Database
    from worker_helpers import explain, folder_of, run_through_worker, tiny_spec

    db = Database()
    spec = tiny_spec(tiny_chat_model, method="llama_adapter", max_steps=3, batch_size=2, max_length=64,
                     learning_rate=9e-3, grad_checkpointing=True)
    run = run_through_worker(db, spec)
    assert run.status == "completed", explain(db, run)
    yield db, run.id, folder_of(db, run.id) / "adapter"
    db.close()


def test_the_trained_adapter_reloads_with_plain_peft_and_changes_the_output(trained, tiny_chat_model):
    from peft import PeftModel

    db, run_id, folder = trained
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "ADAPTION_PROMPT"
    ids = torch.randint(3, 500, (1, 16))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model)).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-4
    losses = [m.value for m in db.metrics_for(run_id) if m.name == "loss"]
    assert len(losses) == 3


def test_compare_and_serve_answer_as_generate_on_the_adapter_alone(trained, tiny_chat_model, tmp_path):
    from serve_helpers import chat_prompt, reference_ids
    from studio.compare.engine import BASE, ChatEngine
    from studio.compare.settings import GenerationSettings
    from studio.compare.sources import detect_method
    from studio.models import load_model
    from studio.serve.completion import Sampling
    from studio.serve.engine import ServeEngine

    assert detect_method(trained[2]) == "llama_adapter"
    # Four steps barely open the gates (the greedy answer stays the base's), so Compare and the
    # serve engine get an adapter with open gates and random prompts: its answer must differ.
    model = load_model(str(tiny_chat_model))
    torch.manual_seed(5)
    model = SPEC.apply(model, ArchInfo.from_model(model), SPEC.params({"adapter_len": 4}), ApplyContext())
    open_gates(model, 1.0)
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    engine = ChatEngine.load(str(tiny_chat_model))
    engine.add_adapter("adapter", folder)
    assert engine.path("adapter") == "switched"  # never in the mixed LoRA batch
    prompt = chat_prompt(engine.tokenizer, "Name three colours.")
    expected = reference_ids(tiny_chat_model, folder, prompt, 8)
    assert expected != reference_ids(tiny_chat_model, None, prompt, 8)  # the adapter matters
    answers = engine.answer({c: [{"role": "user", "content": "Name three colours."}] for c in (BASE, "adapter")},
                            GenerationSettings(max_new_tokens=8))
    assert answers["adapter"].text == engine.tokenizer.decode(expected, skip_special_tokens=True).strip()

    server = ServeEngine.load(str(tiny_chat_model), "tiny", max_active=2)
    try:
        server.register("adapter", folder)
        completion = server.submit("adapter", prompt, Sampling(max_tokens=8, temperature=0))
        completion.text(timeout=60)
        assert completion.token_ids == expected
    finally:
        server.close()


def test_it_exports_as_an_adapter_and_refuses_a_merge(trained):
    from studio.export import ExportError, export_run

    db, run_id, _ = trained
    with pytest.raises(ExportError, match="LLaMA-Adapter cannot be merged: Cannot merge"):
        export_run(db, run_id, "merged")
    # verify=False: the clean-process reload costs a child process (~7 s); plain PEFT reloads the
    # adapter in test_the_trained_adapter_reloads_with_plain_peft_and_changes_the_output.
    export = export_run(db, run_id, "adapter", verify=False)
    assert json.loads((Path(export.path) / "adapter_config.json").read_text())["peft_type"] == "ADAPTION_PROMPT"
