"""The History tab's handlers without a browser, against a real database: the runs listing, the
comparison (overlaid frames, colours, the config diff), clone into the session's run draft and
the Train and Method tabs (through the built app's own event wiring, ``ui_driver``), and the runs table read through two real app processes.
"""

from __future__ import annotations

from datetime import timedelta
import pytest

from conftest import start_app, stop_app
from studio import projects
from studio.db import Database, utcnow
from studio.runs import launch
from studio.runspec import RunSpec
from studio.ui import history_tab, history_view
from studio.ui.draft import RunDraft
from ui_driver import Session


def make_run(db, project_id, name, losses, evals=(), score=None, **spec_fields):
    run = launch.create_run(db, project_id, RunSpec(sample_task="dates", **spec_fields), name=name)
    for step, value in enumerate(losses, start=1):
        db.log_metrics(run.id, step, {"loss": value, "peak_memory_bytes": 1e9 + step})
    for step, value in evals:
        db.log_metrics(run.id, step, {"eval_loss": value})
    if score is not None:
        db.log_metrics(run.id, len(losses), {"eval_exact_match": score})
    started = utcnow() - timedelta(minutes=10)
    return db.update_run(run.id, status="completed", started_at=started, finished_at=started + timedelta(seconds=75))


@pytest.fixture
def setup(tiny_chat_model):
    db = Database()
    project = projects.create_project(db, "UI", model_source=str(tiny_chat_model))
    a = make_run(db, project.id, "lora small lr", [2.0, 1.5, 1.2], [(2, 1.6), (3, 1.4)], 0.5, learning_rate=1e-4)
    b = make_run(db, project.id, "dora", [2.1, 1.4, 1.0], [(3, 1.1)], method="dora", method_settings={"r": 8})
    yield db, project, a, b
    db.close()


def test_runs_listing_filters_sorts_and_lists_methods(setup):
    db, project, a, b = setup
    table, choices, methods = history_tab.runs_listing(db, project.id)
    assert list(table["#"]) == [str(b.id), str(a.id)] and methods == ["dora", "lora"]
    assert [c[1] for c in choices] == [b.id, a.id] and "completed" in choices[0][0]
    row = table[table["#"] == str(a.id)].iloc[0]
    assert (row["train loss"], row["eval loss"], row["eval exact match"], row["steps"]) == ("1.2000", "1.4000",
                                                                                         "50.0%", "3")
    assert row["duration"] == "1 min 15 s" and row["peak memory"] == "954 MiB"
    table, _, _ = history_tab.runs_listing(db, project.id, sort="train_loss", descending=False)
    assert list(table["#"]) == [str(b.id), str(a.id)]
    table, choices, _ = history_tab.runs_listing(db, project.id, methods=["lora"])
    assert list(table["#"]) == [str(a.id)] and [c[1] for c in choices] == [a.id]
    assert history_tab.runs_listing(db, None)[0].empty


def test_the_two_stop_modes_read_differently_in_the_table_and_the_run_panel(setup):
    """Before: both showed a bare "cancelled", though only a saved stop can be resumed."""
    db, project, a, b = setup
    db.update_run(a.id, status="cancelled", cancel_request="save")
    db.update_run(b.id, status="cancelled", cancel_request="discard")
    table, choices, _ = history_tab.runs_listing(db, project.id)
    status = dict(zip(table["#"], table["status"]))
    assert status == {str(a.id): "cancelled (saved)", str(b.id): "cancelled (discarded)"}
    assert "cancelled (discarded)" in choices[0][0]
    table, _, _ = history_tab.runs_listing(db, project.id, statuses=["cancelled"])  # filters by the status
    assert len(table) == 2
    assert "cancelled: stopped and discarded, no checkpoint kept" in history_view.run_detail(db, b.id).summary
    assert "cancelled: stopped and saved, no checkpoint was saved" in history_view.run_detail(db, a.id).summary


def test_live_listing_sends_the_table_only_when_a_run_changed(setup):
    db, project, a, b = setup
    shown, listing = history_tab.live_listing(db, project.id, None)
    assert list(listing[0]["#"]) == [str(b.id), str(a.id)]
    assert history_tab.live_listing(db, project.id, shown) == (shown, None)  # nothing changed: nothing sent
    db.log_metrics(a.id, 4, {"loss": 0.9})  # as a worker would, in another process
    changed, listing = history_tab.live_listing(db, project.id, shown)
    assert changed != shown and listing[0].set_index("#").loc[str(a.id), "train loss"] == "0.9000"
    # The filters apply as in the listing the user asked for.
    _, only_dora = history_tab.live_listing(db, project.id, changed, "", (), ["dora"])
    assert list(only_dora[0]["#"]) == [str(b.id)]


def test_comparison_overlays_both_runs_in_both_plots_and_diffs_the_config(setup):
    db, project, a, b = setup
    c = history_view.comparison(db, [a.id, b.id])
    labels = [f"#{a.id} lora small lr", f"#{b.id} dora"]
    assert c.labels == labels and c.x_lim == [0.0, 3.0]
    assert c.color_map == {labels[0]: history_view.PALETTE[0], labels[1]: history_view.PALETTE[1]}
    for frame in (c.train, c.eval):
        assert set(frame["series"]) == set(labels)  # every run in every frame (Gradio fixes colours once)
        assert frame["step"].dtype == float and frame["value"].dtype == float
    assert list(c.train[c.train["series"] == labels[1]]["value"]) == [2.1, 1.4, 1.0]
    assert list(c.eval[c.eval["series"] == labels[0]].dropna()["step"]) == [2.0, 3.0]
    assert list(c.diff.columns) == ["field", *labels]
    # Exactly the differing fields of the effective runspecs: the method, DoRA's switch and rank
    # (LoRA's default 16 against 8), and the learning rate.
    assert [list(r) for r in c.diff.values] == [["method", "lora", "dora"],
                                               ["method_settings.r", "16", "8"],
                                               ["method_settings.use_dora", "false", "true"],
                                               ["learning_rate", "0.0001", "0.0002"]]
    assert "4 configuration field(s) differ" in history_tab.compare_message([a.id, b.id], c)
    assert list(c.results["run"]) == labels and list(c.results["eval exact match"]) == ["50.0%", "—"]

    same = make_run(db, project.id, "copy", [1.0], learning_rate=1e-4)
    assert "same configuration" in history_tab.compare_message([a.id, same.id],
                                                               history_view.comparison(db, [a.id, same.id]))
    assert "at least two" in history_tab.compare_message([a.id])
    assert "at most 8" in history_tab.compare_message(list(range(1, 10)))


def test_clone_puts_the_runspec_in_the_draft_and_both_tabs_redraw_from_it(setup):
    from studio.ui.app import build_app

    db, project, a, b = setup
    cloned, message = history_tab.clone_draft(db, project.id, b.id, RunDraft())
    assert cloned.data == "sample:dates" and cloned.spec.method == "dora" and cloned.spec.method_settings == {"r": 8}
    # What Start would start from that draft is the cloned run's spec.
    assert cloned.run_spec("default").to_dict() == db.get_run(b.id).spec
    assert "Cloned run" in message

    # Fields no widget shows are kept in the draft (and named), not dropped.
    tuned = make_run(db, project.id, "tuned", [1.0], weight_decay=0.1, lr_scheduler="constant_with_warmup")
    cloned, message = history_tab.clone_draft(db, project.id, tuned.id, RunDraft())
    assert "weight_decay = 0.1" in message and cloned.run_spec("default").weight_decay == 0.1
    assert cloned.spec.lr_scheduler == "constant_with_warmup"
    other = projects.create_project(db, "Other")
    with pytest.raises(ValueError):
        history_tab.clone_draft(db, other.id, b.id, RunDraft())

    # Through the app's own wiring: a session on LoRA clones the DoRA run.
    demo = build_app(db)
    page = Session(demo)
    page.fire("project-picker", "change", project.id)
    page.set("history-run", b.id)  # the run opened
    page.fire("history-clone", "click")
    assert "Cloned run" in page.value("history-message") and page.selected_tab == "train"
    assert page.state(RunDraft).spec.method_settings == {"r": 8}
    assert page.value("train-method") == "dora" and page.value("train-data") == "sample:dates"
    assert page.value("method-choice") == "dora" and page.value("param-r") == 8
    assert page.value("param-use_dora") is True
    # Opening the tabs in any order redraws them from the draft: nothing resets the clone.
    for tab in ("tab-method", "tab-train", "tab-method"):
        page.fire(tab, "select")
    assert page.value("method-choice") == "dora" and page.value("param-r") == 8
    assert page.value("train-method") == "dora"
    # A method the user picks afterwards starts from its own defaults, in both tabs.
    page.fire("train-method", "input", "lora")
    page.fire("tab-method", "select")
    assert page.value("method-choice") == "lora" and page.value("param-r") == 16
    assert page.state(RunDraft).spec.method_settings == {}
    page.set("history-run", None)
    page.fire("history-clone", "click")
    assert "Could not clone" in page.value("history-message") and page.state(RunDraft).spec.method == "lora"
    demo.close()


def test_the_runs_table_is_the_same_after_a_real_app_restart(setup, tmp_path, studio_home):
    from gradio_client import Client

    db, project, a, b = setup
    export = db.add_export(project.id, "merged", studio_home / "m", run_id=a.id, dtype="bfloat16")
    db.update_export(export.id, status="verified", size_bytes=3 * 2**30)
    expected = history_tab.runs_listing(db, project.id)[0]
    tables = []
    for _ in range(2):  # two app processes, one after the other, on the same file
        proc, url, log = start_app(tmp_path / "app.log")
        try:
            tables.append(Client(url, verbose=False).predict(project.id, api_name="/history_runs"))
        finally:
            stop_app(proc, log)
    assert tables[0] == tables[1]
    header, *rows = tables[0]
    assert header == list(expected.columns) and rows == expected.values.tolist()
    assert history_view.exports_table(Database(), project.id).iloc[0]["size"] == "3.00 GiB"
