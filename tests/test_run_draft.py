"""The session's run draft (``studio.ui.draft``) and the data-choice encoding, then the two tabs
that edit the draft, through the built app's own event wiring (``ui_driver``: no browser, the
real handlers, a real database and, for Start, a real worker)."""

from __future__ import annotations

import pytest

from studio import projects
from studio.methods import SettingError
from studio.runspec import RunSpecError
from studio.ui import data_choice
from studio.ui.draft import RunDraft
from ui_driver import Session


def test_data_choice_encoding_round_trips_and_names_a_bad_value():
    assert data_choice.encode(sample_task="dates") == "sample:dates"
    assert data_choice.encode(dataset_id=7) == "dataset:7" and data_choice.encode() is None
    assert data_choice.decode("dataset:7") == data_choice.DataChoice(dataset_id=7)
    assert data_choice.decode("sample:dates").sample_task == "dates" and data_choice.decode(None).dataset_id is None
    for bad in ("dataset:x", "sample:", "file:/etc/passwd"):
        with pytest.raises(ValueError, match="not a data choice"):
            data_choice.decode(bad)
    offered = [("a", "sample:dates"), ("b", "dataset:3")]
    assert data_choice.kept("dataset:3", offered) == "dataset:3"
    assert data_choice.kept("dataset:9", offered, None) is None


def test_draft_edits_replace_the_draft_and_keep_what_is_refused():
    draft = RunDraft()
    edited = draft.with_method("dora").with_setting("r", 8).with_field("optimizer", "adamw8bit")
    assert draft.spec.method == "lora" and draft.spec.method_settings == {}  # never edited in place
    assert edited.spec.method_settings == {"r": 8} and edited.spec.optimizer == "adamw8bit"
    # Another method starts from its own defaults; picking the same one keeps the settings.
    assert edited.with_method("dora") is edited and edited.with_method("lora").spec.method_settings == {}
    assert edited.with_setting("r", None).spec.method_settings == {}  # a cleared field: the default
    assert edited.with_field("batch_size", 8.0).spec.batch_size == 8
    assert edited.with_field("batch_size", None) is edited  # a cleared number keeps the value
    with pytest.raises(ValueError, match="whole number"):
        edited.with_field("batch_size", 2.5)
    with pytest.raises(ValueError, match="not a training setting"):
        edited.with_field("model", "elsewhere")
    with pytest.raises(SettingError):
        draft.with_method("no-such-method")
    with pytest.raises(ValueError, match="quantisation"):
        draft.with_plan(quant="int3")
    # Bounds are the RunSpec's, checked when a run starts from the draft.
    with pytest.raises(RunSpecError, match="learning_rate"):
        draft.with_field("learning_rate", 5).run_spec("default")
    spec = edited.with_data("dataset:4").run_spec("my-model")
    assert (spec.model, spec.dataset_id, spec.sample_task) == ("my-model", 4, None)


@pytest.fixture
def page(db, tiny_chat_model):
    from studio.ui.app import build_app

    project = projects.create_project(db, "Draft", model_source=str(tiny_chat_model))
    demo = build_app(db)
    session = Session(demo)
    session.fire("project-picker", "change", project.id)
    yield session, project
    demo.close()


def test_the_method_tabs_optimizer_reaches_the_started_run(page, db):
    """Regression: the Method tab's optimizer changed its estimate but never the run (its own
    training widgets were not the Train tab's)."""
    session, project = page
    session.fire("tab-method", "select")
    session.fire("setup-optimizer", "input", "adamw8bit")
    session.fire("setup-batch", "input", 2)
    assert "adamw8bit" not in session.errors
    session.fire("tab-train", "select")
    session.fire("train-start", "click")
    assert "Started run" in session.value("train-message"), session.value("train-message")
    (run,) = db.list_runs(project.id)
    assert run.spec["optimizer"] == "adamw8bit" and run.spec["batch_size"] == 2


def test_both_tabs_are_views_of_one_draft(page):
    session, _ = page
    session.fire("tab-train", "select")
    session.fire("train-batch-size", "input", 8)
    session.fire("train-precision", "input", "fp32")
    session.fire("tab-method", "select")
    assert session.value("setup-batch") == 8 and session.value("setup-precision") == "fp32"
    assert "fp32" in session.value("memory-total")  # the Method tab estimates what the run uses
    session.fire("method-choice", "input", "ia3")
    session.fire("tab-train", "select")
    assert session.value("train-method") == "ia3"
    assert "IA3" in session.value("train-estimate") and "batch 8" in session.value("train-estimate")
    # A value the draft refuses is said and changes nothing.
    session.fire("train-batch-size", "input", 2.5)
    assert session.errors and "whole number" in session.errors[-1]
    assert session.state(RunDraft).spec.batch_size == 8
