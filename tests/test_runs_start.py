"""``studio.runs.start``: the one door through which the Train tab and ``peft-studio train`` start
a new run. Every refusal leaves no run row and no run folder.

There is no GPU here, so the memory refusal is tested through the same ``start_new_run`` with
the device facts of a GPU given (``run_setup.DeviceFacts``, what ``device_facts`` reads from a
real card): the estimate itself is the planner's, for a real 8B model config (read on the meta
device, no weights). The race is staged with a real second claim of the device (a live process
standing in for another run's worker) between our row and our start.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import CONFIGS

from studio import config, projects
from studio.run_setup import DeviceFacts
from studio.runs import launch
from studio.runs.start import StartRefused, check_new_run, start_new_run
from studio.runspec import RunSpec

GIB = 2**30


def gpu(free_gib: float) -> DeviceFacts:
    return DeviceFacts("cuda", int(free_gib * GIB), True, None, int(80 * GIB))


@pytest.fixture
def llama8b(tmp_path):
    """A model folder holding only Llama-3-8B's config: enough for the estimate (no weights)."""
    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    shutil.copy(CONFIGS / "llama3-8b.json", folder / "config.json")
    return folder


def nothing_made(db) -> bool:
    return db.list_runs() == [] and list(config.projects_dir().glob("*/runs/*")) == []


def test_a_run_that_exceeds_the_gpu_is_refused_before_any_row(db, llama8b):
    project = projects.create_project(db, "big")
    full = RunSpec(model=str(llama8b), method="full", sample_task="dates", batch_size=4, max_length=512)
    with pytest.raises(StartRefused) as refused:
        start_new_run(db, project.id, full, device=gpu(24))
    reason = str(refused.value)
    assert "would not fit" in reason and "24.0 GiB free" in reason and "\n" not in reason, reason
    assert nothing_made(db)
    # The refusal is the memory check's: a LoRA of the same model on an 80 GiB card passes it.
    lora = RunSpec(model=str(llama8b), method="lora", sample_task="dates", batch_size=1, max_length=256,
                   grad_checkpointing=True)
    check_new_run(db, lora, project.id, device=gpu(78))


@pytest.mark.parametrize("field, value, reason", [
    ("precision", "fp16", "runspec 'precision': fp16 training needs a GPU"),
    ("liger_kernel", True, "runspec 'liger_kernel': liger-kernel needs a CUDA GPU"),
])
def test_gpu_only_settings_on_the_cpu_are_refused_before_any_row(db, tiny_chat_model, field, value, reason):
    project = projects.create_project(db, "cpu")
    spec = RunSpec(model=str(tiny_chat_model), method="lora", sample_task="dates", **{field: value})
    with pytest.raises(StartRefused, match=reason):
        start_new_run(db, project.id, spec, device=DeviceFacts("cpu", None, False, None))
    assert nothing_made(db)


def test_a_start_that_loses_the_device_after_its_checks_leaves_no_orphan(db, tiny_chat_model, sleeper,
                                                                         monkeypatch):
    """The Train tab's race: another start claims the device between our checks and our start.
    The claim is atomic, so ours is refused, and the queued row and folder we made are gone."""
    project = projects.create_project(db, "racer")
    other = db.create_run(project.id, "the other training", "lora", {})
    real_create = launch.create_run

    def create_then_lose_the_race(*args, **kwargs):
        run = real_create(*args, **kwargs)
        assert db.claim_run(other.id, sleeper.pid)[0] is not None  # the device is taken now
        return run

    monkeypatch.setattr(launch, "create_run", create_then_lose_the_race)
    spec = RunSpec(model=str(tiny_chat_model), method="lora", sample_task="dates")
    with pytest.raises(StartRefused, match="is training on this machine"):
        start_new_run(db, project.id, spec, device=DeviceFacts("cpu", None, False, None))
    assert [r.id for r in db.list_runs()] == [other.id]
    assert list(config.projects_dir().glob("*/runs/*")) == []


def test_a_busy_device_and_a_foreign_dataset_are_refused_by_the_check(db, tiny_chat_model, sleeper):
    project, other = projects.create_project(db, "mine"), projects.create_project(db, "theirs")
    dataset = db.add_dataset(other.id, name="theirs")
    spec = RunSpec(model=str(tiny_chat_model), method="lora", dataset_id=dataset.id)
    with pytest.raises(StartRefused, match=f"project 'mine' has no dataset {dataset.id}"):
        start_new_run(db, project.id, spec)
    busy = db.create_run(other.id, "the other training", "lora", {})
    db.claim_run(busy.id, sleeper.pid)
    spec = RunSpec(model=str(tiny_chat_model), method="lora", sample_task="dates")
    with pytest.raises(StartRefused, match=f"run {busy.id} .* is training on this machine"):
        start_new_run(db, project.id, spec)
    assert [r.id for r in db.list_runs()] == [busy.id]
