"""``peft-studio projects / data / runs``: the project picker, the Data tab's import and the
History/Train tabs' run actions from the command line, on fresh studio homes, through
``studio.cli.main`` (the real parser, handlers and database) and, for ``runs resume --wait``, the
real CLI as a subprocess following a real worker.

The run commands share one real run (a worker process started, stopped and saved once for the
module, in a home of its own): starting a worker costs seconds, and only the last test changes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import main
from studio.db import Database
from studio.runs import launch
from worker_helpers import explain, metrics, tiny_spec, wait_finished, wait_for

DATA = Path(__file__).parent / "assets" / "data"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one ``peft-studio`` command run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv: str) -> str:
    """The one stderr line of a refused command (exit code 2, no traceback, nothing on stdout)."""
    code, out, err = cli(capsys, *argv)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err and out == "", err
    return err


# ---- projects ----
def test_projects_on_a_fresh_home(capsys, tiny_chat_model, studio_home):
    assert json.loads(cli(capsys, "projects", "list", "--json")[1]) == {"projects": []}
    for command in (("data", "list"), ("runs", "list"), ("data", "import", DATA / "qa.tsv")):
        assert "there is no project yet" in refused(capsys, *command)

    code, out, _ = cli(capsys, "projects", "create", "demo", "--model", tiny_chat_model, "--json")
    made = json.loads(out)
    assert code == 0 and made["name"] == "demo" and made["model"] == str(tiny_chat_model.resolve())
    assert Path(made["folder"]).is_dir()
    assert "already exists" in refused(capsys, "projects", "create", "DEMO")  # names ignore case
    assert "neither a model folder" in refused(capsys, "projects", "create", "other", "--model", "./nope")
    assert [p.name for p in Database().list_projects()] == ["demo"]  # the refusals made nothing

    assert json.loads(cli(capsys, "projects", "rename", "demo", "renamed", "--json")[1])["name"] == "renamed"
    assert "no project 'demo' (projects: renamed)" in refused(capsys, "projects", "rename", "demo", "x")
    assert "cannot be undone. Pass --yes" in refused(capsys, "projects", "delete", "renamed")
    assert Path(made["folder"]).is_dir()  # not without --yes
    assert cli(capsys, "projects", "delete", "renamed", "--yes")[0] == 0
    assert not Path(made["folder"]).exists() and Database().list_projects() == []


# ---- data ----
@pytest.fixture
def project(capsys, tiny_chat_model):
    """A project on the tiny model (its real SmolLM2 tokenizer counts the import's tokens)."""
    assert cli(capsys, "projects", "create", "demo", "--model", tiny_chat_model)[0] == 0
    return Database().get_project_by_name("demo")


@pytest.fixture
def odd_csv(tmp_path) -> Path:
    """Columns no detection recognises: the user must map them."""
    path = tmp_path / "odd.csv"
    path.write_text("q,a,extra\n" + "".join(f"What is {i} + {i}?,{2 * i},x\n" for i in range(10)))
    return path


def test_data_import_maps_columns_splits_and_lists(capsys, project, odd_csv):
    code, out, err = cli(capsys, "data", "import", odd_csv, "--map", "q=prompt", "--map", "a=completion",
                         "--eval-ratio", "0.2", "--name", "sums", "--json")
    assert code == 0, err
    result = json.loads(out)
    dataset = result["dataset"]
    assert result["project"] == "demo" and result["reused"] is False  # the only project: no --project needed
    assert (dataset["name"], dataset["format"], dataset["train"], dataset["eval"]) == ("sums", "prompt_completion", 8, 2)
    assert dataset["mapping"] == {"prompt": "q", "completion": "a"}
    # The Data tab's token check ran with the project model's tokenizer, at a run's default length.
    assert result["validation"]["max_tokens"] == 256 and "tokenizer" in result["validation"]["length_method"]

    again = json.loads(cli(capsys, "data", "import", odd_csv, "--map", "q=prompt", "--map", "a=completion",
                           "--eval-ratio", "0.2", "--json")[1])
    assert again["reused"] is True and again["dataset"]["id"] == dataset["id"]  # as the tab: nothing rewritten
    code, out, _ = cli(capsys, "data", "import", DATA / "sharegpt.jsonl", "--project", "demo", "--max-tokens", "0")
    assert code == 0 and out.startswith("Imported: sharegpt") and "format messages" in out

    listed = json.loads(cli(capsys, "data", "list", "--json")[1])["datasets"]
    assert [d["name"] for d in listed] == ["sums", "sharegpt"] and listed[0]["id"] == dataset["id"]
    code, out, _ = cli(capsys, "data", "list")
    assert code == 0 and "sums  (prompt_completion, 8 train / 2 eval)" in out

    code, out, _ = cli(capsys, "data", "sample", "dates", "--json")
    sample = json.loads(out)["dataset"]
    assert code == 0 and (sample["train"], sample["eval"]) == (400, 50)
    assert "no sample task 'nope'; choose one of dates" in refused(capsys, "data", "sample", "nope")


@pytest.mark.parametrize("args,says", [
    (["missing.jsonl"], "missing.jsonl: file not found"),
    (["{odd}"], "could not recognise the layout"),
    (["{odd}", "--format", "chatml"], "unknown format 'chatml'; choose one of alpaca, messages"),
    (["{odd}", "--map", "question=prompt", "--map", "a=completion"],
     "mapping 'prompt' -> 'question': no such column; the file has columns: 'q', 'a', 'extra'"),
    (["{odd}", "--map", "q=query", "--map", "a=completion"],
     "mapping key 'query' is not used by format 'prompt_completion' (it uses prompt, completion, system)"),
    (["{odd}", "--map", "q"], "--map expects COLUMN=FIELD (e.g. question=prompt), got 'q'"),
    (["{odd}", "--map", "q=prompt", "--map", "a=prompt"], "field 'prompt' is mapped twice"),
    (["{odd}", "--map", "q=prompt", "--map", "a=completion", "--eval-ratio", "1.5"],
     "--eval-ratio must be at least 0 and below 1, not 1.5"),
    (["{odd}", "--map", "q=prompt", "--map", "a=completion", "--on-long", "cut"],
     "--on-long must be one of ('keep', 'drop', 'truncate'), not 'cut'"),
    (["{odd}", "--project", "elsewhere"], "--project: no project 'elsewhere' (projects: demo)"),
])
def test_data_import_refuses_bad_input_in_one_line_and_creates_nothing(capsys, project, odd_csv, args, says):
    argv = [str(odd_csv) if a == "{odd}" else a for a in args]
    err = refused(capsys, "data", "import", *argv)
    assert err.startswith("peft-studio data import: ") and says in err, err
    assert Database().list_datasets(project.id) == []
    datasets = Path(project_folder(project)) / "datasets"
    assert not datasets.exists() or list(datasets.iterdir()) == []  # no half-imported folder left


def project_folder(project) -> Path:
    from studio.projects import project_dir

    return project_dir(project)


def test_two_projects_need_project_named(capsys, project):
    assert cli(capsys, "projects", "create", "second")[0] == 0
    err = refused(capsys, "data", "import", DATA / "qa.tsv")
    assert "there are 2 projects ('demo', 'second'): say which one with --project NAME" in err
    assert "say which one with --project" in refused(capsys, "runs", "list")


# ---- runs: one real run, started, stopped and saved once for the module ----
@pytest.fixture(scope="module")
def run_home(tmp_path_factory, tiny_chat_model):
    """(home, run id): a LoRA run on the tiny model, trained by a real worker, stopped with
    ``runs stop`` (save) after its first logged step. Tests point PEFT_STUDIO_HOME at it."""
    from conftest import module_home

    gen = module_home(tmp_path_factory, "cli-runs-home")
    home = next(gen)
    db = Database()
    from studio import projects

    project = projects.create_project(db, "runs demo", model_source=str(tiny_chat_model))
    spec = tiny_spec(tiny_chat_model, max_steps=100_000, save_steps=0)
    run = launch.create_run(db, project.id, spec, name="long")
    launch.start(db, run.id)
    try:
        wait_for(lambda: metrics(db, run.id).get("loss"), 120, 0.1, "the first logged loss")
        assert main(["runs", "stop", str(run.id)]) == 0
        done = wait_finished(db, run.id, 120)
        assert done.status == "cancelled", explain(db, done)
        from studio.runs import children

        # Our child: reap it, or its zombie looks alive to the resuming CLI process (a worker
        # started by a CLI that exits is reaped by init; one started by this test is not).
        children.processes[done.pid].wait(timeout=60)
        yield home, run.id
    finally:
        current = db.get_run(run.id)
        if current is not None and current.status == "running":
            launch.stop(db, run.id, "discard")
            wait_finished(db, run.id, 60)
        db.close()
        next(gen, None)


@pytest.fixture
def in_run_home(run_home, monkeypatch):
    home, run_id = run_home
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(home))
    return run_id


def test_runs_list_and_show_a_stopped_run(capsys, in_run_home):
    run_id, db = in_run_home, Database()
    [row] = json.loads(cli(capsys, "runs", "list", "--json")[1])["runs"]  # the only project
    assert (row["id"], row["name"], row["status"], row["stopped"], row["method"]) == (run_id, "long", "cancelled", "saved", "lora")
    assert json.loads(cli(capsys, "runs", "list", "--status", "completed", "--json")[1])["runs"] == []
    assert "--status must be one of queued, running, completed" in refused(capsys, "runs", "list", "--status", "done")

    shown = json.loads(cli(capsys, "runs", "show", run_id, "--json")[1])
    losses = metrics(db, run_id)["loss"]
    step = max(losses)
    [checkpoint] = db.list_checkpoints(run_id)
    assert shown["status"] == "cancelled"
    assert shown["status_words"] == f"cancelled: stopped and saved, checkpoint at step {checkpoint.step} kept"
    assert shown["last"]["loss"] == {"step": step, "value": losses[step]} and shown["train_loss"] == losses[step]
    assert shown["checkpoints"] == [{"step": checkpoint.step, "path": checkpoint.path, "on_disk": True}]
    assert shown["resumes_from_step"] == checkpoint.step and shown["spec"] == db.get_run(run_id).spec
    assert shown["exports"] == []
    code, text, _ = cli(capsys, "runs", "show", run_id)
    assert code == 0 and f"#{run_id} long" in text and "stopped and saved" in text and "log (last lines)" in text


def test_runs_commands_on_an_unknown_run(capsys, in_run_home):
    for command in (["show"], ["stop"], ["resume"], ["delete", "--yes"], ["rename", "x"], ["note", "x"]):
        err = refused(capsys, "runs", command[0], "999", *command[1:])
        assert "999" in err and ("there is no run 999" in err or "no run with id 999" in err), err
    assert "there is no run 999" in refused(capsys, "stop", "999")  # the top-level stop stays


def test_runs_rename_note_and_delete(capsys, in_run_home):
    from studio.db import RunStatus

    db = Database()
    run = db.get_run(in_run_home)
    assert json.loads(cli(capsys, "runs", "rename", run.id, "long run", "--json")[1])["name"] == "long run"
    assert cli(capsys, "runs", "note", run.id, "lr too high?")[0] == 0
    assert db.get_run(run.id).notes == "lr too high?"
    assert "a run needs a name" in refused(capsys, "runs", "rename", run.id, "  ")

    spare = launch.create_run(db, run.project_id, tiny_spec(Path(run.spec["model"])), name="spare")
    assert spare.status == RunStatus.QUEUED.value  # made, never started
    assert "Pass --yes" in refused(capsys, "runs", "delete", spare.id)
    assert db.get_run(spare.id) is not None
    code, out, _ = cli(capsys, "runs", "delete", spare.id, "--yes", "--json")
    assert code == 0 and json.loads(out)["deleted"] == spare.id and db.get_run(spare.id) is None
    assert "is cancelled (not training" in refused(capsys, "runs", "stop", run.id)


def test_runs_resume_wait_follows_the_worker_and_runs_stop_discard_ends_it(capsys, in_run_home):
    """Last in the module: it changes the shared run."""
    db, run_id = Database(), in_run_home
    saved = db.latest_checkpoint(run_id).step
    steps_before = max(metrics(db, run_id)["loss"])
    follower = subprocess.Popen([sys.executable, "-m", "studio", "runs", "resume", str(run_id), "--wait"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        def resumed():
            assert follower.poll() is None, follower.communicate()  # exited: say why
            return max(metrics(db, run_id)["loss"]) > steps_before
        wait_for(resumed, 120, 0.1, "a step after the resume")
        err = refused(capsys, "runs", "resume", run_id)  # the Train tab's refusal, word for word
        assert f"run {run_id} is running; only failed, cancelled or out-of-memory runs can be resumed" in err
        assert f"run #{run_id} is training; stop it before deleting it" in refused(capsys, "runs", "delete", run_id, "--yes")
        assert f"run #{run_id} of 'runs demo' is training or queued; stop it first" in refused(
            capsys, "projects", "delete", "runs demo", "--yes")
        code, out, _ = cli(capsys, "runs", "stop", run_id, "--discard", "--json")
        assert code == 0 and json.loads(out) == {"id": run_id, "status": "running", "cancel_request": "discard"}
        out, err = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, out + err
    assert f"Resumed run #{run_id} from its checkpoint at step {saved}." in out
    assert f"run {run_id} resumed in project 'runs demo'" in out and f"run {run_id}: cancelled" in out
    assert min(s for s in metrics(db, run_id)["loss"] if s > steps_before) == saved + 1  # went on, not from 0
    shown = json.loads(cli(capsys, "runs", "show", run_id, "--json")[1])
    assert shown["stopped"] == "discarded" and shown["checkpoints"] == []
    assert shown["status_words"] == "cancelled: stopped and discarded, no checkpoint kept"
