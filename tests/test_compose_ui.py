"""Adapter composition in the app (issue 17): the Export tab's "Combine adapters" handlers, and how
History, the Train tab's Resume, Clone, Compare and Export treat the combined (derived) run.

Everything runs against a real history and real LoRA adapter folders on a tiny model (random,
perturbed weights: a fresh LoRA is a no-op, so the parents would not differ), through the core's
real ``compose`` (no mock): in this process for the handler tests, in the app's child process
(``compose_in_child``) for the wiring test. The module shares one studio home: two parents are
made once, and one combination is made once and read by every test after it.
"""

from __future__ import annotations

import pytest
from conftest import module_home

from studio import history
from studio.adapters import compose, derived
from studio.compare.sources import project_adapters
from studio.db import Database, RunStatus
from studio.projects import create_project
from studio.runs import launch
from studio.runspec import RunSpec
from studio.ui import compose_panel as panel
from studio.ui import export_tab, history_tab, history_view, train_actions
from studio.ui.draft import RunDraft
from studio.ui.labels_compose import COMPOSE, DERIVED


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    yield from module_home(tmp_path_factory, "compose-ui-home")


def finished_lora_run(db: Database, project_id: int, model, name: str, seed: int) -> int:
    """A completed LoRA run whose final adapter is a real PEFT folder in ``<run folder>/adapter``."""
    from chat_helpers import save_peft_adapter

    spec = RunSpec(model=str(model), method="lora", sample_task="dates", max_steps=3)
    run = launch.create_run(db, project_id, spec, name=name)
    save_peft_adapter(model, launch.run_folder(db, run) / "adapter", "lora", seed=seed)
    db.update_run(run.id, status=RunStatus.COMPLETED.value)
    return run.id


@pytest.fixture(scope="module")
def parents(studio_home, tiny_chat_model):
    """(project id, first parent's id, second parent's id)."""
    db = Database()
    project = create_project(db, "mix", model_source=str(tiny_chat_model))
    first = finished_lora_run(db, project.id, tiny_chat_model, "dates-lora", seed=1)
    second = finished_lora_run(db, project.id, tiny_chat_model, "qa-lora", seed=2)
    return project.id, first, second


@pytest.fixture(scope="module")
def combined(parents):
    """(message, the combined run's id): one combination through the panel's handler."""
    project_id, first, second = parents
    steps = []
    message, run_id = panel.combine(Database(), project_id, "cat", [first, second], "0.6, 0.4", None, None, "mix",
                                    progress=lambda fraction, text: steps.append(text), composer=compose.compose)
    assert run_id is not None, message
    assert steps == [COMPOSE["working"]]  # the user sees that it is working before the base loads
    return message, run_id


def test_weights_field_defaults_parse_and_keep_the_users_own():
    assert panel.default_weights("cat", 2) == "0.5, 0.5" and panel.default_weights("ties", 3) == "1, 1, 1"
    assert panel.parse_weights(" 0.6 ,0.4 ", 2) == [0.6, 0.4]
    with pytest.raises(ValueError, match=r"weights: 'a, b' is not a list of numbers"):
        panel.parse_weights("a, b", 2)
    with pytest.raises(ValueError, match=r"weights: 3 adapters are chosen but 2 weight\(s\)"):
        panel.parse_weights("0.6, 0.4", 3)
    with pytest.raises(ValueError, match="not a list of numbers"):
        panel.parse_weights("nan, 1", 2)
    # A third run chosen: equal weights again; the user's own weights survive a combination change.
    assert panel.refill_weights("cat", [1, 2, 3], "0.6, 0.4") == "0.3333, 0.3333, 0.3333"
    assert panel.refill_weights("ties", [1, 2], "0.6, 0.4") == "0.6, 0.4"
    assert panel.refill_weights("ties", [1, 2], "0.5, 0.5") == "1, 1"  # still the defaults: follow the choice


def test_recipe_from_the_widgets_passes_density_and_rank_only_where_they_apply():
    recipe = panel.recipe_from("ties_svd", [3, 5], "1, 1", 0.3, 8)
    assert recipe == compose.Recipe("ties_svd", ((3, 1.0), (5, 1.0)), density=0.3, svd_rank=8)
    # Hidden widgets keep their values; a combination that does not take them must not get them.
    assert panel.recipe_from("cat", [3, 5], "0.5, 0.5", 0.3, 8) == compose.Recipe("cat", ((3, 0.5), (5, 0.5)))
    assert panel.recipe_from("svd", [3, 5], "0.5, 0.5", 0.3, 0).svd_rank is None  # 0: the largest parent rank
    with pytest.raises(ValueError, match="rank of the result: 2.5 is not a whole number"):
        panel.recipe_from("svd", [3, 5], "0.5, 0.5", None, 2.5)
    with pytest.raises(compose.CompositionError, match="at least two"):
        panel.recipe_from("cat", [3], "1", None, None)


def test_preview_names_each_parent_with_its_weight_before_anything_loads(parents):
    project_id, first, second = parents
    db = Database()
    ids = [value for _, value in panel.parent_choices(db, project_id)]
    assert first in ids and second in ids
    text = panel.preview(db, project_id, "cat", [first, second], "0.6, 0.4", None, None)
    assert text.startswith("**Recipe:**"), text
    assert "dates-lora" in text and "qa-lora" in text and "0.6" in text and "0.4" in text
    assert panel.preview(db, project_id, "cat", [first], "1", None, None) == COMPOSE["pick"]
    assert "2 adapters are chosen but 1 weight" in panel.preview(db, project_id, "cat", [first, second], "1",
                                                                 None, None)


def test_a_refusal_is_a_message_in_the_panel_and_nothing_is_made(parents, tiny_chat_model):
    project_id, first, _ = parents
    db = Database()
    failed = launch.create_run(db, project_id, RunSpec(model=str(tiny_chat_model), method="lora",
                                                       sample_task="dates"), name="broken")
    db.update_run(failed.id, status=RunStatus.FAILED.value)
    before = [r.id for r in db.list_runs(project_id)]
    message, run_id = panel.combine(db, project_id, "cat", [first, failed.id], "0.5, 0.5", None, None, "nope")
    assert run_id is None and message.startswith("**Not combined:**") and f"run {failed.id}" in message, message
    message, run_id = panel.combine(db, project_id, "cat", [first, first + 1000], "x", None, None, "")
    assert run_id is None and "not a list of numbers" in message
    assert panel.combine(db, None, "cat", [first], "1", None, None, "")[1] is None
    assert [r.id for r in db.list_runs(project_id)] == before
    history.delete_run(db, failed.id)


def test_combined_run_is_saved_and_listed_in_export_compare_and_history(parents, combined):
    project_id, first, second = parents
    message, run_id = combined
    db = Database()
    run = db.get_run(run_id)
    assert message.startswith(f"**Saved as run #{run_id} mix:**") and "Compare, History and Export" in message
    assert run.status == RunStatus.COMPLETED.value and run.method == "lora"
    assert compose.Recipe.from_dict(run.recipe) == compose.Recipe("cat", ((first, 0.6), (second, 0.4)))
    # Export: listed as combined, exportable at once.
    labels = dict((value, label) for label, value in export_tab.run_choices(db, project_id))
    assert labels[run_id] == f"#{run_id} mix (lora, combined)"
    assert export_tab.weight_choices(db, run_id)[0][1] == "final"
    # Compare: its label says what it combines.
    sources = {s.run_id: s for s in project_adapters(db, project_id, lambda r: launch.run_folder(db, r))
               if s.step is None}
    assert sources[run_id].label == f"#{run_id} mix (cat of #{first} + #{second})"
    assert sources[first].label == f"#{first} dates-lora"  # trained runs keep their labels
    # History's table: a "combined" marker after the method, the recipe as its settings.
    table, _, methods = history_tab.runs_listing(db, project_id)
    row = table[table["#"] == str(run_id)].iloc[0]
    assert row["method"] == "lora · combined" and row["status"] == "completed"
    assert row["key settings"] == derived.text(compose.Recipe.from_dict(run.recipe))
    assert table[table["#"] == str(first)].iloc[0]["method"] == "lora" and methods == ["lora"]
    assert list(history_tab.runs_listing(db, project_id, "combined")[0]["#"]) == [str(run_id)]


def test_history_panel_shows_the_recipe_with_parents_and_a_deleted_parent(parents, combined, tiny_chat_model):
    project_id, first, second = parents
    db = Database()
    _, run_id = combined
    detail = history_view.run_detail(db, run_id)
    assert "| recipe |" in detail.summary and "dates-lora" in detail.summary and "qa-lora" in detail.summary
    assert DERIVED["panel_note"] in detail.summary
    assert "| recipe |" not in history_view.run_detail(db, first).summary
    # A parent deleted since: the recipe still names it, as deleted. (A spare parent, so the
    # module's parents stay for the other tests.)
    spare = finished_lora_run(db, project_id, tiny_chat_model, "spare", seed=3)
    message, mixed = panel.combine(db, project_id, "cat", [first, spare], "0.5, 0.5", None, None, "",
                                   composer=compose.compose)
    assert mixed is not None, message
    assert db.get_run(mixed).name == f"cat of #{first} + #{spare}"  # the default name is the recipe
    history.delete_run(db, spare)
    summary = history_view.run_detail(db, mixed).summary
    assert f"#{spare} (deleted)" in summary and "dates-lora" in summary


def test_a_combined_run_is_not_offered_for_resume_or_clone(parents, combined):
    project_id, first, second = parents
    db = Database()
    _, run_id = combined
    before = db.get_run(run_id)
    assert train_actions.resume_run(db, run_id) == DERIVED["no_resume"].format(id=run_id)
    with pytest.raises(launch.RunConflict):
        launch.resume(db, run_id)  # the CLI's door refuses it too
    after = db.get_run(run_id)
    assert (after.status, after.pid, after.started_at) == (RunStatus.COMPLETED.value, None, before.started_at)
    with pytest.raises(history.HistoryError, match=rf"run #{run_id} is a combination.*#{first}, #{second}"):
        history_tab.clone_draft(db, project_id, run_id, RunDraft())
    # A trained parent still clones.
    draft, message = history_tab.clone_draft(db, project_id, first, RunDraft())
    assert message.startswith(f"**Cloned run #{first}") and draft.spec.method == "lora"


def test_the_export_tabs_wiring_fills_weights_previews_combines_and_picks_the_new_run(parents, monkeypatch):
    """The built app's own events (``ui_driver``): choosing parents fills equal weights and the
    preview, a TIES choice re-weights, Combine saves, and the Export tab's run list picks the new
    run so it can be exported at once. The real ``compose`` runs in this process: the app's child
    process (``compose_in_child``, tested in test_compose.py) took 10-30 s to import torch here."""
    from ui_driver import Session

    from studio.ui.app import build_app

    monkeypatch.setattr(panel, "compose_in_child", compose.compose)

    project_id, first, second = parents
    db = Database()
    page = Session(build_app(db))
    page.set("project-picker", project_id)  # (its change event would redraw every tab: seconds)
    page.fire("tab-export", "select")
    assert page.value("compose-preview") == COMPOSE["pick"]  # the section followed the project
    page.fire("compose-parents", "change", [first, second])
    assert page.value("compose-weights") == "0.5, 0.5"
    assert page.value("compose-preview").startswith("**Recipe:** Concatenation of")
    page.fire("compose-combination", "change", "ties")
    assert page.value("compose-weights") == "1, 1"
    assert page.value("compose-preview").startswith("**Recipe:** TIES (density 0.5) of")
    page.set("compose-name", "wired")
    page.fire("compose-go", "click")
    made = max(r.id for r in db.list_runs(project_id))
    assert page.value("compose-result").startswith(f"**Saved as run #{made} wired:** TIES"), page.errors
    assert page.value("export-run") == made and page.value("export-weights") == "final"
