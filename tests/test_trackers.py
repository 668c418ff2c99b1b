"""Experiment trackers (issue 19): TensorBoard and MLflow as per-run switches, and
``peft-studio runs export`` copying runs from the history into them.

One real worker process trains a tiny run with both switches on; a second run without them is
trained in this process meanwhile (the worker's own ``train``). Every check reads the trackers
back with their own readers (tensorboard's EventAccumulator, MLflow's MlflowClient) and compares
with the studio's history, the source of truth.
"""

from __future__ import annotations

import json

import pytest
from conftest import module_home

from studio import cli
from studio.db import Database
from studio.runs import launch
from studio.runspec import RunSpec, RunSpecError
from studio.trackers import choice
from worker_helpers import explain, folder_of, metrics, new_run, tiny_spec, train_here, wait_finished

PROJECT = "worker tests"  # worker_helpers.new_run's project


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    """One home for the module (replaces conftest's per-test one): both runs live in it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_STUDIO_PRECISION_PROBE", "fp32")  # as conftest's studio_home
        yield from module_home(tmp_path_factory, "trackers-home")


@pytest.fixture(scope="module")
def runs(studio_home, tiny_chat_model):
    """(id of the run trained by a worker with both switches on, id of a run trained without).
    The tests that use it need the ``trackers`` extra; the checks of refusals run without it."""
    for module in ("tensorboard", "mlflow", "alembic"):
        pytest.importorskip(module)
    db = Database()
    tracked = new_run(db, tiny_spec(tiny_chat_model, max_steps=3, trackers=["tensorboard", "mlflow"]))
    launch.start(db, tracked.id)
    plain = train_here(db, tiny_spec(tiny_chat_model, max_steps=2, seed=7))  # while the worker loads
    assert plain.status == "completed", explain(db, plain)
    done = wait_finished(db, tracked.id, timeout=240)
    assert done.status == "completed", explain(db, done)
    return tracked.id, plain.id


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_copies(run_id: int):
    """(client, the active MLflow runs of the project's store tagged with ``run_id``)."""
    from mlflow import MlflowClient

    db = Database()
    project = db.get_project_by_name(PROJECT)
    store = choice.mlflow_store(choice.project_folder(project))
    client = MlflowClient(tracking_uri=choice.mlflow_uri(store))
    experiment = client.get_experiment_by_name(PROJECT)
    assert experiment is not None, f"no experiment {PROJECT!r} in {store}"
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{choice.RUN_TAG}` = '{run_id}'")
    return client, found


def mlflow_history(client, mlflow_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(mlflow_id, name)}


def test_live_tensorboard_events_hold_the_historys_losses(runs):
    tracked, _ = runs
    loss = metrics(Database(), tracked)["loss"]
    assert sorted(loss) == [1, 2, 3]
    scalars = tensorboard_scalars(folder_of(Database(), tracked) / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(loss, rel=1e-6)  # float32 in the event file


def test_live_mlflow_run_holds_the_historys_losses_and_the_spec(runs):
    tracked, _ = runs
    db = Database()
    run, loss = db.get_run(tracked), metrics(db, tracked)["loss"]
    client, [copy] = mlflow_copies(tracked)
    assert copy.info.run_name == run.name and copy.info.status == "FINISHED"
    assert mlflow_history(client, copy.info.run_id, "loss") == pytest.approx(loss, rel=1e-9)
    params = copy.data.params
    assert params["spec.max_steps"] == "3" and params["spec.model"] == run.spec["model"]
    assert json.loads(params["spec.trackers"]) == ["tensorboard", "mlflow"]
    assert params["learning_rate"] == "0.01"  # the Trainer's own arguments, logged by its callback
    # The worker said where the logs are and how to view them.
    log = launch.log_tail(db, run)
    assert "tensorboard --logdir" in log and "mlflow ui --backend-store-uri" in log


def test_runs_export_copies_a_run_trained_without_the_switches(runs, capsys):
    _, plain = runs
    db = Database()
    history = metrics(db, plain)
    folder = folder_of(db, plain) / "tensorboard"
    assert not folder.exists()  # trained without the switches: nothing was logged live
    _, before = mlflow_copies(plain)
    assert before == []

    assert cli.main(["runs", "export", "--tracker", "tensorboard", str(plain), "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)["runs"]
    assert result["action"] == "created" and result["metrics"] == sum(len(v) for v in history.values())
    scalars = tensorboard_scalars(folder)
    assert scalars["train/loss"] == pytest.approx(history["loss"], rel=1e-6)
    assert scalars["train/tokens_per_s"] == pytest.approx(history["tokens_per_s"], rel=1e-6)

    assert cli.main(["runs", "export", "--tracker", "mlflow", str(plain)]) == 0
    assert "created in MLflow" in capsys.readouterr().out
    client, [copy] = mlflow_copies(plain)
    for name, values in history.items():  # every metric row, with its step
        assert mlflow_history(client, copy.info.run_id, name) == pytest.approx(values, rel=1e-9, nan_ok=True)
    spec = db.get_run(plain).spec
    assert copy.data.params["spec.seed"] == "7" and copy.data.params["spec.method"] == spec["method"]


def test_a_second_export_replaces_the_copy(runs, capsys):
    tracked, _ = runs
    loss = metrics(Database(), tracked)["loss"]
    for _ in range(2):  # the live copy, then the first export, are replaced: one copy remains
        assert cli.main(["runs", "export", "--tracker", "mlflow", "--project", PROJECT, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {r["action"] for r in out["runs"] if r["run_id"] == tracked} == {"replaced"}
        client, [copy] = mlflow_copies(tracked)
        assert mlflow_history(client, copy.info.run_id, "loss") == pytest.approx(loss, rel=1e-9)
    # TensorBoard: the live event file is replaced by the history's copy, with the same losses.
    assert cli.main(["runs", "export", "--tracker", "tensorboard", str(tracked)]) == 0
    assert "replaced in TensorBoard" in capsys.readouterr().out
    folder = folder_of(Database(), tracked) / "tensorboard"
    assert len(list(folder.iterdir())) == 1
    assert tensorboard_scalars(folder)["train/loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("argv,words", [
    (["--tracker", "mlflow", "999"], ["no run with id 999", "runs list"]),
    (["--tracker", "wandb", "1"], ["unknown tracker 'wandb'", "tensorboard, mlflow"]),
    (["--tracker", "mlflow", "--project", "nope"], ["no project named 'nope'", PROJECT]),
    (["--tracker", "mlflow"], ["run ids, or --project NAME, or --all"]),
])
def test_runs_export_refuses_bad_input_by_name(runs, capsys, argv, words):
    assert cli.main(["runs", "export", *argv]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, err


def test_runs_export_refuses_a_folder_it_did_not_write(runs, tmp_path, capsys):
    _, plain = runs
    project = Database().get_project_by_name(PROJECT)
    mine = tmp_path / project.folder / Database().get_run(plain).folder / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    assert cli.main(["runs", "export", "--tracker", "tensorboard", str(plain), "--dest", str(tmp_path)]) == 2
    assert "notes.txt" in capsys.readouterr().err and mine.read_text() == "keep me"


def test_a_tracker_whose_package_is_missing_is_refused_with_the_install_line(monkeypatch, tiny_chat_model):
    monkeypatch.setattr(choice, "_installed", lambda module: module != "alembic")  # all else installed
    with pytest.raises(RunSpecError, match=r"trackers.*MLflow needs alembic.*peft-studio\[trackers\]"):
        tiny_spec(tiny_chat_model, trackers=["mlflow"]).validate()
    tiny_spec(tiny_chat_model, trackers=["tensorboard"]).validate()  # the other one still can


def test_runs_export_without_the_package_says_how_to_install_it(runs, monkeypatch, capsys):
    real = choice._installed
    monkeypatch.setattr(choice, "_installed", lambda module: not module.startswith("tensorboard") and real(module))
    tracked, _ = runs
    before = sorted(p.name for p in (folder_of(Database(), tracked) / "tensorboard").iterdir())
    assert cli.main(["runs", "export", "--tracker", "tensorboard", str(tracked)]) == 2
    err = capsys.readouterr().err
    assert "TensorBoard needs tensorboard" in err and "pip install" in err, err
    assert sorted(p.name for p in (folder_of(Database(), tracked) / "tensorboard").iterdir()) == before


@pytest.mark.parametrize("value,words", [
    (["wandb"], "unknown tracker 'wandb'"), ("mlflow", "must be a list"), (["mlflow", "mlflow"], "twice")])
def test_a_bad_trackers_field_is_refused_by_name(value, words):
    with pytest.raises(RunSpecError, match=f"runspec 'trackers'.*{words}"):
        RunSpec(sample_task="dates", trackers=value).validate()


def test_the_switches_write_the_draft_and_the_run_view_says_where_the_logs_are(runs, tiny_chat_model):
    from studio.ui.draft import RunDraft
    from studio.ui.train_actions import with_tracker
    from studio.ui.train_view import render_run

    draft = with_tracker(with_tracker(RunDraft(), "mlflow", True), "tensorboard", True)
    assert draft.run_spec(str(tiny_chat_model)).trackers == ["tensorboard", "mlflow"]  # what Start starts
    assert with_tracker(draft, "mlflow", False).spec.trackers == ["tensorboard"]
    from studio.ui.train_tab import redraw

    assert redraw(Database(), None, with_tracker(RunDraft(), "mlflow", True))[-2:] == [False, True]  # the boxes
    from studio import history
    from studio.ui.train_tab import SHOWN

    assert history.hidden_changes(RunSpec(trackers=["mlflow"]), SHOWN) == {}  # a clone's switches are shown
    tracked, plain = runs
    status = render_run(Database(), tracked).status
    assert "tensorboard --logdir" in status and "mlflow ui --backend-store-uri" in status, status
    assert "tensorboard" not in render_run(Database(), plain).status


def test_a_switch_whose_package_is_missing_is_greyed_with_the_install_line(monkeypatch):
    gr = pytest.importorskip("gradio")
    from studio.ui import train_tab

    monkeypatch.setattr(choice, "_installed", lambda module: module != "mlflow")  # all else installed
    with gr.Blocks():
        boxes = train_tab._tracker_boxes()
    assert boxes["mlflow"].interactive is False and "peft-studio[trackers]" in boxes["mlflow"].info
    assert boxes["tensorboard"].interactive is not False and "pip install" not in boxes["tensorboard"].info
