"""OFT and BOFT (``studio/methods/oft.py``): bad block sizes refused before PEFT or a run row,
BOFT built without compiling PEFT's CUDA extension and with every butterfly factor asked for,
and both methods trained through the worker's own code path on the tiny chat model, reloaded
with PEFT (the output changes), exported merged (plain transformers reloads it and its logits
equal the unmerged adapter's), and answered by Compare and the serve engine exactly as plain
``generate`` answers on that adapter alone.

Counts on the meta device, the estimate and the label-only loss are covered for both methods by
the files parametrised over every registered method (test_method_counts, test_estimate,
test_label_loss, test_method_examples).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import CONFIGS, module_home, tiny_llama_config
from serve_helpers import chat_prompt, load_reference_model, reference_ids
from studio.arch import ArchInfo
from studio.db import Database
from studio.methods import get_method
from studio.methods.base import ApplyContext, SettingError, trainable_count
from studio.models import load_config
from studio.runspec import RunSpec, RunSpecError
from worker_helpers import explain, folder_of, metrics, tiny_spec, train_here

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The tiny chat model's Linear inputs are 64 wide (down_proj 128): BOFT with 2 butterfly
# factors of 8 blocks of 8, on every Linear, exercises the permutations PEFT's CPU fallback drops.
SETTINGS = {"oft": {"oft_block_size": 16},
            "boft": {"boft_block_size": 8, "boft_n_butterfly_factor": 2, "target_preset": "all-linear"}}
TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    """One studio home (and history) for the module: the two runs are trained once and shared."""
    yield from module_home(tmp_path_factory, "oft-home")


@pytest.fixture(scope="module")
def trained(studio_home, tiny_chat_model) -> dict:
    """{method: run id}: each trained 3 steps through the worker's ``train`` (a high rate, so
    that the rotations move far enough to change greedy answers)."""
    db, runs = Database(), {}
    for method, settings in SETTINGS.items():
        run = train_here(db, tiny_spec(tiny_chat_model, method=method, method_settings=settings,
                                       max_steps=3, batch_size=4, learning_rate=5e-2,
                                       precision="fp32"))  # no bf16 probe: seconds, not the point
        assert run.status == "completed", explain(db, run)
        assert sorted(metrics(db, run.id)["loss"]) == [1, 2, 3]
        runs[method] = run.id
    return runs


def adapter_of(run_id: int):
    return folder_of(Database(), run_id) / "adapter"


def smollm2() -> ArchInfo:
    return ArchInfo.from_config(load_config(str(CONFIGS / "smollm2-135m.json")))


@pytest.mark.parametrize("method,settings,words", [
    ("oft", {"oft_block_size": 7}, ["oft_block_size 7", "576", "self_attn.q_proj", "e.g."]),
    ("oft", {"r": 5, "target_preset": "mlp"}, ["r = 5", "576", "mlp.gate_proj"]),
    ("oft", {"oft_block_size": 0}, ["'oft_block_size'", "'r'", "both are 0"]),
    ("oft", {"r": 576, "target_preset": "attention"}, ["size 1", "rotate nothing"]),
    ("boft", {"boft_block_size": 5}, ["boft_block_size 5", "576"]),
    ("boft", {"boft_block_num": 6, "boft_n_butterfly_factor": 3}, ["3 butterfly factors", "multiple of 4"]),
])
def test_block_sizes_a_layer_cannot_take_are_refused_naming_it(method, settings, words):
    spec = get_method(method)
    with pytest.raises(SettingError) as refused:
        spec.count(smollm2(), spec.params(settings))
    assert all(word in str(refused.value) for word in words), str(refused.value)


def test_gpt2_conv1d_is_refused_and_a_bad_size_stops_the_run_before_its_row(tiny_chat_model):
    gpt2 = ArchInfo.from_config(load_config(str(CONFIGS / "gpt2.json")))
    for method in ("oft", "boft"):
        with pytest.raises(SettingError, match="Conv1D.*attn.c_attn"):
            get_method(method).count(gpt2, get_method(method).params({}))
    # The tiny model's layers are 64 and 128 wide: 24 divides neither; RunSpec.validate asks
    # the method's run_check, which reads the model's shapes (before any run row exists).
    with pytest.raises(RunSpecError, match="24 does not divide the input width 64 of self_attn.q_proj"):
        RunSpec(model=str(tiny_chat_model), method="oft", method_settings={"oft_block_size": 24},
                sample_task="dates").validate()
    RunSpec(model=str(tiny_chat_model), method="oft", method_settings={"oft_block_size": 32},
            sample_task="dates").validate()


def test_the_bakeoff_takes_both_at_their_rate(tiny_chat_model):
    from studio.bakeoff import Budget, method_spec

    for method in SETTINGS:
        spec = method_spec(str(tiny_chat_model), method, Budget(), sample_task="dates")
        assert spec.method == method and spec.learning_rate == get_method(method).default_learning_rate
        spec.validate()


def test_boft_never_compiles_peft_extension_and_keeps_every_butterfly_factor(monkeypatch):
    """PEFT tries ``cpp_extension.load`` in every BOFT layer and, failing, drops the butterfly
    factor to 1; with ``boft_blockdiag`` the build asks for nothing and counts what was set."""
    import torch.utils.cpp_extension as cpp
    from peft.tuners.boft import layer as boft_layer
    from transformers import AutoModelForCausalLM

    def no_build(*args, **kwargs):
        raise AssertionError("PEFT's CUDA extension build was attempted")
    monkeypatch.setattr(cpp, "load", no_build)
    config = tiny_llama_config()
    arch, spec = ArchInfo.from_config(config), get_method("boft")
    params = spec.params({"boft_block_num": 8, "boft_n_butterfly_factor": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = spec.apply(AutoModelForCausalLM.from_config(config), arch, params, ApplyContext())
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "CUDA extension" in m or "butterfly" in m], said
    assert trainable_count(model) == spec.count(arch, params).trainable
    assert {p.shape[0] for n, p in model.named_parameters() if "boft_R" in n} == {3}
    # The pure-torch block diagonal and its backward equal torch.block_diag's.
    blocks = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    ours = boft_layer.FastBlockDiag.apply(blocks)
    reference = torch.stack([torch.block_diag(*group) for group in blocks])
    assert torch.equal(ours, reference)
    weights = torch.randn_like(ours)
    (grad,) = torch.autograd.grad((ours * weights).sum(), blocks)
    (expected,) = torch.autograd.grad((reference * weights).sum(), blocks)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("method", list(SETTINGS))
def test_trained_adapter_reloads_with_peft_and_changes_the_output(method, trained, tiny_chat_model):
    from studio.compare.sources import detect_method

    folder = adapter_of(trained[method])
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == method.upper()
    assert detect_method(folder) == method
    ids = torch.tensor([[1, 500, 2000, 30, 7, 900]])
    with torch.no_grad():
        base = load_reference_model(tiny_chat_model)(input_ids=ids).logits
        adapted = load_reference_model(tiny_chat_model, folder)
        assert type(adapted).__name__.startswith("Peft")
        logits = adapted(input_ids=ids).logits
    assert (logits - base).abs().max() > 1e-2  # the trained rotation really changes the model


@pytest.mark.parametrize("method,kind", [("oft", "merged"), ("boft", "merged"), ("boft", "adapter")])
def test_exports_reload_with_plain_libraries_and_equal_the_adapter(method, kind, trained):
    """Merged: plain transformers. Adapter-only BOFT with two butterfly factors: plain PEFT, which
    on a CPU drops the factors to 1 and cannot load the adapter unless the verification child
    runs ``boft_blockdiag`` from its file (as it runs ``peft_compat``)."""
    from studio.export import export_run

    export = export_run(Database(), trained[method], kind, "float32")
    result = export.verification
    assert export.status == "verified", result
    loader = "transformers" if kind == "merged" else "transformers + peft"
    assert result["loader"] == loader and result["studio_imported_by_loader"] == []
    assert result["max_abs_diff"] <= 1e-4 and result["greedy_agreement"] == 1.0


def test_compare_and_serve_answer_as_generate_on_each_adapter_alone(trained, tiny_chat_model):
    from studio.compare.engine import BASE, ChatEngine
    from studio.compare.settings import GenerationSettings
    from studio.evaluate import generate_answers
    from studio.models import load_tokenizer
    from studio.serve.completion import Sampling
    from studio.serve.engine import ServeEngine

    message = "Name three colours."
    folders = {method: adapter_of(run_id) for method, run_id in trained.items()}
    tokenizer = load_tokenizer(str(tiny_chat_model))
    # The references: a freshly loaded base with only that adapter, plain greedy generate.
    alone = {name: load_reference_model(tiny_chat_model, folder)
             for name, folder in {BASE: None, **folders}.items()}
    references = {name: generate_answers(model, tokenizer, [message], max_new_tokens=TOKENS)[0]
                  for name, model in alone.items()}
    assert len(set(references.values())) == 3  # both adapters answer unlike the base

    chat = ChatEngine.load(str(tiny_chat_model))
    for name, folder in folders.items():
        chat.add_adapter(name, folder)
    answers = chat.answer({c: [{"role": "user", "content": message}] for c in references},
                          GenerationSettings(max_new_tokens=TOKENS))
    for name in folders:  # not the mixed LoRA batch: each its own generate
        assert answers[name].path == "switched", name
    assert {name: answer.text for name, answer in answers.items()} == references

    serve = ServeEngine.load(str(tiny_chat_model), "tiny", max_active=4)
    try:
        prompt = chat_prompt(serve.tokenizer, message)
        for name, folder in folders.items():
            serve.register(name, folder)
            completion = serve.submit(name, prompt, Sampling(max_tokens=TOKENS, temperature=0))
            completion.text(timeout=60)
            assert completion.token_ids == reference_ids(tiny_chat_model, folder, prompt, TOKENS,
                                                         model=alone[name]), name
    finally:
        serve.close()
