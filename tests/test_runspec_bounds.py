"""Every RunSpec field and every method setting has a bound and its own message, checked by
``RunSpec.validate`` before a run row exists (issue 12, item 11).

Each refusal names the field, the value and what is accepted. The table is pure Python (no
torch); one test builds the model on the meta device to show that ``target_modules:
"all-linear"`` trains what PEFT's keyword means."""

from __future__ import annotations

import json
import math

import pytest

from studio.methods.base import ApplyContext
from studio.runspec import RunSpec, RunSpecError

BIG = "9" * 5000

# (field, bad value, text the message must hold: the accepted range or what is wrong)
BAD = [
    ("max_steps", 10**30, "at least 0 and at most 10,000,000"),
    ("max_steps", -5, "at least 0 and at most 10,000,000"),
    ("epochs", math.nan, "at least 0 and at most 10,000"),
    ("epochs", math.inf, "at least 0 and at most 10,000"),
    ("epochs", -1.0, "at least 0 and at most 10,000"),
    ("batch_size", 10**9, "at least 1 and at most 65,536"),
    ("batch_size", 0, "at least 1 and at most 65,536"),
    ("grad_accum", 10**9, "at least 1 and at most 65,536"),
    ("learning_rate", math.nan, "greater than 0 and less than 1"),
    ("learning_rate", 0.0, "greater than 0 and less than 1"),
    ("learning_rate", -math.inf, "greater than 0 and less than 1"),
    ("warmup_ratio", math.nan, "at least 0 and less than 1"),
    ("warmup_ratio", 1e30, "at least 0 and less than 1"),
    ("warmup_ratio", 1.0, "at least 0 and less than 1"),  # transformers: 1.0 is one step
    ("weight_decay", math.nan, "at least 0 and at most 1"),
    ("weight_decay", -10.0, "at least 0 and at most 1"),
    ("weight_decay", 1e308, "at least 0 and at most 1"),
    ("max_length", 8, "at least 16 and at most 1,000,000"),
    ("seed", 2**70, "at least 0 and less than 4,294,967,296"),
    ("seed", -1, "at least 0 and less than 4,294,967,296"),
    ("eval_steps", -1, "at least 0 and at most 10,000,000"),
    ("save_steps", -5, "at least 0 and at most 10,000,000"),
    ("exact_match_limit", 10**9, "at least 0 and at most 100,000"),
    ("dataset_id", 10**20, "at least 1 and less than 9,223,372,036,854,775,808"),
    ("dataset_id", -1, "at least 1 and less than 9,223,372,036,854,775,808"),
    ("dataset_id", 0, "at least 1 and less than 9,223,372,036,854,775,808"),
    ("dataset_id", 1e20, "must be an integer or null"),
    ("model", "", "must name a model"),
    ("model", "x" * 5000, "1 to 4,096 characters"),
    ("model", "a\0b", "must name a model"),
    ("sample_task", "nope", "must be one of dates, json_fields, sentiment"),
    ("lr_scheduler", "sawtooth", "must be one of linear, cosine"),
    ("optimizer", "adam", "must be one of adamw, adamw8bit, sgd"),
    ("method", "nope", "unknown method 'nope'"),
]


def _ids(cases):
    return [f"{c[0]}={str(c[1])[:12]}" for c in cases]


@pytest.mark.parametrize("field,value,accepted", BAD, ids=_ids(BAD))
def test_each_field_is_refused_by_name_with_its_value_and_range(field, value, accepted):
    with pytest.raises(RunSpecError) as info:
        RunSpec.from_dict({"dataset_id": 1, field: value}).validate()
    message = str(info.value)
    assert message.startswith(f"runspec '{field}': "), message
    assert accepted in message, message
    if field not in ("model", "method"):
        assert repr(value)[:20] in message, message  # the value the user gave, shown back


# (method, settings, setting named, accepted range or what is wrong)
BAD_SETTINGS = [
    ("lora", {"r": math.nan}, "r", "expects int, got nan"),
    ("lora", {"r": 1e30}, "r", "at least 1 and at most 1024"),
    ("lora", {"r": True}, "r", "expects int, got True"),
    ("lora", {"r": BIG}, "r", "expects int"),
    ("lora", {"lora_dropout": math.nan}, "lora_dropout", "finite number at least 0.0 and at most 0.5"),
    ("lora", {"lora_dropout": math.inf}, "lora_dropout", "finite number at least 0.0 and at most 0.5"),
    ("lora", {"lora_dropout": 1e308}, "lora_dropout", "at least 0.0 and at most 0.5, got 1e+308"),
    ("lora", {"lora_alpha": -3}, "lora_alpha", "at least 1 and at most 4096"),
    ("loraplus", {"loraplus_lr_ratio": math.nan}, "loraplus_lr_ratio", "finite number"),
    ("lora", {"use_dora": "maybe"}, "use_dora", "expects true or false, got 'maybe'"),
    ("lora", {"use_dora": 2}, "use_dora", "expects true or false, got 2"),
    ("lora", {"target_modules": ["q_proj", 5]}, "target_modules", "expects module names"),
    ("lora", {"target_modules": ".*_proj"}, "target_modules", "is not a module name"),
    ("lora", {"target_modules": ",".join(f"m{i}" for i in range(300))}, "target_modules",
     "at most 256 module names"),
    ("lora", {"target_modules": "all-linear,q_proj"}, "target_modules",
     "set target_preset to 'all-linear' and leave target_modules empty"),
    ("ia3", {"target_modules": "all-linear"}, "target_modules", "which is not a module name"),
    ("houlsby", {"r": math.inf}, "r", "expects int, got inf"),
    ("prefix", {"num_virtual_tokens": 10**9}, "num_virtual_tokens", "at least 1 and at most 512"),
    ("prompt", {"init_text": "x" * 20_000}, "init_text", "at most 10,000 characters"),
    ("adalora", {"total_step": 1e30}, "total_step", "at least 1 and at most 10000000"),
    ("vera", {"r": -1}, "r", "at least 1 and at most 4096"),
    ("last_n", {"num_layers": 0}, "num_layers", "at least 1 and at most 1000"),
]


@pytest.mark.parametrize("method,settings,name,accepted", BAD_SETTINGS,
                         ids=[f"{c[0]}.{c[2]}" for c in BAD_SETTINGS])
def test_method_settings_keep_to_their_params_bounds(method, settings, name, accepted):
    with pytest.raises(RunSpecError) as info:
        RunSpec(method=method, method_settings=settings, dataset_id=1).validate()
    message = str(info.value)
    assert message.startswith(f"runspec 'method_settings': {method}: '{name}'"), message
    assert accepted in message and len(message) < 400, message


def test_save_steps_is_named_as_itself_not_as_eval_steps():
    with pytest.raises(RunSpecError, match=r"^runspec 'save_steps': .*\(got -5\)$"):
        RunSpec(dataset_id=1, eval_steps=20, save_steps=-5).validate()


@pytest.mark.parametrize("literal,field", [
    ('"weight_decay": NaN', "weight_decay"), ('"warmup_ratio": Infinity', "warmup_ratio"),
    ('"learning_rate": -Infinity', "learning_rate"), ('"epochs": NaN', "epochs"),
    (f'"seed": {BIG}', "seed"), (f'"dataset_id": {BIG}', "dataset_id"),
    ('"method_settings": {"lora_dropout": NaN}', "method_settings"),
    (f'"method_settings": {{"r": {BIG}}}', "method_settings"),
])
def test_nan_infinity_and_huge_literals_in_a_runspec_file_are_named(tmp_path, literal, field):
    path = tmp_path / "runspec.json"
    path.write_text('{"dataset_id": 1, %s}' % literal)
    with pytest.raises(RunSpecError) as info:
        RunSpec.load(path).validate()
    message = str(info.value)
    assert message.startswith(f"runspec '{field}': "), message
    assert BIG not in message and len(message) < 300, message  # the number is described, not shown


def test_valid_specs_and_the_edges_of_every_range_still_validate(tmp_path):
    RunSpec(dataset_id=1).validate()
    (tmp_path / "notepad.json").write_text('\ufeff{"dataset_id": 3}', encoding="utf-8")
    assert RunSpec.load(tmp_path / "notepad.json").validate().dataset_id == 3  # a BOM is fine
    RunSpec(sample_task="dates").validate()
    edges = dict(max_steps=10_000_000, epochs=10_000.0, batch_size=65_536, grad_accum=65_536,
                 learning_rate=1e-9, warmup_ratio=0.0, weight_decay=1.0, max_length=16,
                 seed=2**32 - 1, eval_steps=0, save_steps=10_000_000, exact_match_limit=100_000,
                 dataset_id=2**63 - 1, model="x" * 4096)
    RunSpec(**edges).validate()
    RunSpec(dataset_id=1, max_steps=0, epochs=0.5).validate()  # epochs decide
    RunSpec(dataset_id=1, method_settings={"r": "8", "lora_dropout": "0.1", "use_dora": "yes",
                                            "target_modules": ["q_proj", "model.layers.0.mlp.up_proj"]}
            ).validate()
    with pytest.raises(RunSpecError, match=r"^runspec 'max_steps': give max_steps > 0 or epochs"):
        RunSpec(dataset_id=1, max_steps=0, epochs=0.0).validate()


def test_a_refused_spec_creates_no_run_row_or_folder(db):
    from studio import projects
    from studio.runs import launch

    project = projects.create_project(db, "Bounds")
    for bad in (dict(batch_size=10**9), dict(seed=2**70), dict(weight_decay=math.nan),
                dict(method_settings={"target_modules": "all-linear,q_proj"})):
        with pytest.raises(RunSpecError):
            launch.create_run(db, project.id, RunSpec(sample_task="dates", **bad))
    assert db.list_runs(project.id) == []
    runs = projects.project_dir(project) / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


@pytest.mark.parametrize("method", ["lora", "loha", "adalora"])
def test_target_modules_all_linear_means_every_linear_as_in_peft(method):
    """PEFT's ``target_modules="all-linear"`` keyword, given as a studio setting, was a module
    name that matched nothing (PEFT: "Target modules {'all-linear'} not found"). It now means the
    all-linear preset, and the model PEFT builds trains what the formula counts."""
    import torch

    from conftest import CONFIGS
    from studio.arch import ArchInfo, build_on_meta
    from studio.methods import get_method
    from studio.methods.base import trainable_count
    from studio.models import load_config

    spec = get_method(method)
    params = spec.params({"target_preset": "attention", "target_modules": "all-linear"})
    assert (params.target_preset, params.target_modules) == ("all-linear", ())
    RunSpec(method=method, method_settings={"target_modules": "all-linear"}, dataset_id=1).validate()
    cfg = load_config(str(CONFIGS / "smollm2-135m.json"))
    arch = ArchInfo.from_config(cfg)
    with torch.device("meta"):
        model = spec.apply(build_on_meta(cfg), arch, params, ApplyContext())
    every = spec.count(arch, spec.params({"target_preset": "all-linear"})).trainable
    assert trainable_count(model) == spec.count(arch, params).trainable == every > 0


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_packing_is_refused_where_packed_examples_would_see_each_other(method):
    with pytest.raises(RunSpecError, match="runspec 'packing': .*virtual tokens"):
        RunSpec(sample_task="dates", method=method, packing=True).validate()
    RunSpec(sample_task="dates", method="lora", packing=True).validate()  # LoRA packs exactly
