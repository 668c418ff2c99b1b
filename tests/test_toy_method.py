"""A new method is one module plus one registration: the toy method of tests/toy_method.py
(defined there and nowhere else) is counted, estimated, planned, given its bake-off rate and
trained for two steps through the worker's own code path."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from conftest import tiny_llama_config
from studio import methods
from studio.arch import ArchInfo
from studio.bakeoff import Budget, method_spec
from studio.estimate import TrainSetup
from studio.methods.base import ApplyContext, trainable_count
from studio.planner import plan
from toy_method import TOY
from worker_helpers import explain, folder_of, metrics, tiny_spec, train_here


@pytest.fixture
def toy():
    methods.register(TOY)
    yield TOY
    del methods.REGISTRY[TOY.name]


def test_the_toy_method_is_counted_estimated_and_planned(toy):
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config()
    arch = ArchInfo.from_config(config)
    result = plan(arch, toy.name, {"r": 4}, TrainSetup(batch_size=2, seq_len=32, dtype="fp32", device="cpu"))
    q = arch.matching(["q_proj"])[0]
    assert result["trainable_params"] == q.count * 4 * (q.in_features + q.out_features)
    assert result["memory_bytes"]["trainable"] == result["trainable_params"] * 4
    assert result["memory_bytes"]["activations"] > 0 and result["title"] == toy.title
    built = toy.apply(AutoModelForCausalLM.from_config(config), arch, toy.params({"r": 4}),
                      ApplyContext(tokenizer=object()))
    assert trainable_count(built) == result["trainable_params"]  # the count is the model's
    assert method_spec("default", toy.name, Budget(), sample_task="dates").learning_rate == 5e-2
    with pytest.raises(ValueError, match="already registered"):
        methods.register(toy)


def test_the_toy_method_trains_two_steps(db, tiny_chat_model, toy):
    run = train_here(db, tiny_spec(tiny_chat_model, method=toy.name, method_settings={"r": 2}, max_steps=2))
    assert run.status == "completed", explain(db, run)
    assert sorted(metrics(db, run.id)["loss"]) == [1, 2]
    with safe_open(str(folder_of(db, run.id) / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        names = list(saved.keys())
    assert names and all("q_proj" in name for name in names)
