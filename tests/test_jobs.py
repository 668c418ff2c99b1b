"""Cluster jobs (issue 18): ``peft-studio job export`` writes a self-contained folder, its
``launch.sh`` trains the run under a real torchrun (gloo, two ranks on this CPU) in the job's own
home, and ``peft-studio job import`` brings it back as a run that History, Compare and Export use.

One round trip is shared by the module (a torchrun start with two ranks costs seconds); the
refusals each need only an exported, untrained job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import free_port
from studio import projects
from studio.db import Database
from studio.jobs import JobError
from studio.jobs.export import export_job
from studio.jobs.importer import import_job
from studio.jobs.manifest import Manifest, projects_of, run_dir
from studio.runs import launch
from studio.runspec import RunSpecError
from worker_helpers import tiny_spec

NPROC = 2  # two ranks (gloo): only rank 0 writes the job's history (studio/worker/ranks.py)
JOB_SPEC = dict(max_steps=4, save_steps=2, batch_size=2)


def _fingerprint(projects_dir: Path) -> dict[str, str]:
    """The user's history, byte for byte (the WAL and its index too)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(projects_dir.glob("studio.db*"))}


def _small_dataset(db, project, folder: Path):
    """An imported chat dataset of 12 rows (3 for eval): the job's final evaluation stays short."""
    from studio.data import import_dataset

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(12)]
    path = folder / "sums.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return import_dataset(db, project, path, name="sums", eval_ratio=0.25).dataset


def _launch(job: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """launch.sh in a session of its own: a launch that times out takes its ranks with it."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", str(job / "launch.sh"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def trip(tmp_path_factory, tiny_chat_model):
    """A LoRA run exported as a 1-node job of NPROC processes, trained by its launch.sh (while
    this process's PEFT_STUDIO_HOME still names the user's home), then imported."""
    home = tmp_path_factory.mktemp("user-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_STUDIO_HOME", str(home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("PEFT_STUDIO_PRECISION_PROBE", "fp32")
        db = Database()
        project = projects.create_project(db, "cluster", model_source=str(tiny_chat_model))
        dataset = _small_dataset(db, project, tmp_path_factory.mktemp("data"))
        spec = tiny_spec(tiny_chat_model, **JOB_SPEC, sample_task=None, dataset_id=dataset.id)
        run = launch.create_run(db, project.id, spec, name="lora job")
        job = export_job(db, run.id, nodes=1, gpus_per_node=NPROC,
                         dest=str(tmp_path_factory.mktemp("cluster") / "job"))
        before = _fingerprint(home / "projects")
        done = _launch(job, "--rdzv-port", str(free_port()))
        after = _fingerprint(home / "projects")
        imported = import_job(db, job) if done.returncode == 0 else None
        yield SimpleNamespace(home=home, db=db, project=project, source=run, job=job, done=done,
                              before=before, after=after, imported=imported)
        db.close()


def _job_history(job: Path) -> Database:
    return Database(projects_of(job) / "studio.db")


def test_job_trains_under_torchrun_in_its_own_home_and_imports(trip, monkeypatch):
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(trip.home))
    assert trip.done.returncode == 0, trip.done.stdout[-3000:] + trip.done.stderr[-3000:]
    # The user's history was not touched while the job ran: the job home is its only history.
    assert trip.after == trip.before
    job_db = _job_history(trip.job)
    try:
        job_run = job_db.get_run(trip.source.id)
        assert job_run.status == "completed", job_run.error
        assert job_db.journal_mode() == "delete"  # the rollback journal: shared file systems
        job_metrics = [(m.step, m.name, m.value, m.wall_time) for m in job_db.metrics_for(job_run.id)]
        job_steps = sorted(c.step for c in job_db.list_checkpoints(job_run.id))
    finally:
        job_db.close()
    assert not list(projects_of(trip.job).glob("studio.db-wal"))
    run = trip.imported
    assert run.status == "completed" and run.project_id == trip.project.id
    assert (run.started_at, run.finished_at) == (job_run.started_at, job_run.finished_at)
    got = [(m.step, m.name, m.value, m.wall_time) for m in trip.db.metrics_for(run.id)]
    assert got == job_metrics and any(name == "loss" for _, name, _, _ in got)
    assert sorted(c.step for c in trip.db.list_checkpoints(run.id)) == job_steps == [2, 4]
    folder = launch.run_folder(trip.db, run)
    paths = [Path(c.path) for c in trip.db.list_checkpoints(run.id)]
    assert all(p.parent == folder / "checkpoints" and p.is_dir() for p in paths), (paths, folder)
    assert json.loads((folder / "job.json").read_text())["job_id"] == Manifest.load(trip.job).job_id
    log = (folder / "worker.log").read_text()  # launch.sh's log, both ranks in it
    assert f"run {trip.source.id}: completed" in log and f"rank 1, run {trip.source.id}: completed" in log
    # The source run is untouched: the job trained a copy of its spec.
    assert trip.db.get_run(trip.source.id).status == "queued"


def test_imported_run_is_listed_by_export_and_loads_in_compare(trip, monkeypatch):
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(trip.home))
    from studio.compare.engine import ChatEngine
    from studio.compare.sources import project_adapters
    from studio.export.weights import exportable

    run = trip.db.get_run(trip.imported.id)
    weights = exportable(trip.db, run)
    assert weights[0].step is None and weights[0].path == launch.run_folder(trip.db, run) / "adapter"
    sources = [s for s in project_adapters(trip.db, trip.project.id, lambda r: launch.run_folder(trip.db, r))
               if s.run_id == run.id]
    assert [s.step for s in sources] == [None, 2]  # step 4's checkpoint is the final adapter, listed once
    engine = ChatEngine.load(trip.project.model_source, dtype="float32", device="cpu")
    attached = engine.add_adapter("imported", sources[0].folder)
    assert (attached.method, attached.path) == ("lora", "batched")
    # History: the job's figures, read from the imported metrics like a local run's.
    from studio.history import run_summaries

    row = next(r for r in run_summaries(trip.db, trip.project.id) if r.id == run.id)
    assert row.steps == 4 and row.train_loss is not None and row.eval_loss is not None
    assert "cluster job" in row.notes


def test_second_import_and_another_base_are_refused(trip, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(trip.home))
    count = len(trip.db.list_runs())
    with pytest.raises(JobError, match="already imported, as run"):
        import_job(trip.db, trip.job)
    projects.create_project(trip.db, "other base", model_source=str(tiny_llama_dir))
    with pytest.raises(JobError, match="another base model"):
        import_job(trip.db, trip.job, project="other base")
    assert len(trip.db.list_runs()) == count  # nothing half-imported: no row...
    for project in trip.db.list_projects():  # ...and no folder
        root = launch.runs_root(trip.db, project.id)
        assert not list(root.glob(".job-import-*")) if root.exists() else True
    # A finished job is not trained again.
    rc = _launch(trip.job, "--rdzv-port", str(free_port()))
    assert rc.returncode == 2 and "has finished" in rc.stderr


@pytest.fixture
def exported(db, tiny_chat_model, tmp_path):
    project = projects.create_project(db, "jobs", model_source=str(tiny_chat_model))
    run = launch.create_run(db, project.id, tiny_spec(tiny_chat_model, **JOB_SPEC))
    return SimpleNamespace(project=project, run=run,
                           job=export_job(db, run.id, nodes=2, gpus_per_node=4, dest=str(tmp_path / "job")))


def test_export_writes_launchers_for_the_cluster(exported):
    job = exported.job
    printed = _launch(job, "--print", "--rdzv-host", "node-a", "--rdzv-port", "1234")
    assert printed.returncode == 0, printed.stderr
    line = printed.stdout
    for part in ("torch.distributed.run", "--nnodes 2", "--nproc_per_node 4", "--rdzv_backend c10d",
                 "--rdzv_endpoint node-a:1234", f"-m studio.worker {exported.run.id}"):
        assert part in line, line
    assert "--resume" in _launch(job, "--print", "--resume").stdout
    assert os.access(job / "launch.sh", os.X_OK)
    sbatch = (job / "job.sbatch").read_text()
    for part in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "scontrol show hostnames", "srun"):
        assert part in sbatch
    assert subprocess.run(["bash", "-n", str(job / "job.sbatch")]).returncode == 0
    readme = (job / "README.txt").read_text()
    assert "MODEL at the top of launch.sh" in readme and "job import" in readme
    manifest = Manifest.load(job)
    assert (manifest.nodes, manifest.gpus_per_node, manifest.model) == (2, 4, exported.run.spec["model"])
    # The job's history: the project, its dataset (copied) and the run, queued, same ids.
    job_db = _job_history(job)
    try:
        job_run = job_db.get_run(exported.run.id)
        assert job_run.status == "queued" and job_db.journal_mode() == "delete"
        dataset = job_db.get_dataset(job_run.dataset_id)
        assert job_run.spec["dataset_id"] == dataset.id
    finally:
        job_db.close()
    assert (projects_of(job) / exported.project.folder / "datasets" / dataset.folder / "train").is_dir()
    assert json.loads((run_dir(job, manifest) / "runspec.json").read_text()) == job_run.spec


def test_preflight_sets_the_model_and_refuses_a_restart(exported, tiny_llama_dir, monkeypatch):
    from studio.jobs.preflight import preflight

    job = exported.job
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(job / "home"))
    said = preflight(job, str(tiny_llama_dir), resume=False)
    assert "model set to" in said
    manifest = Manifest.load(job)
    assert json.loads((run_dir(job, manifest) / "runspec.json").read_text())["model"] == str(tiny_llama_dir)
    job_db = Database()
    try:
        assert job_db.get_run(manifest.run_id).spec["model"] == str(tiny_llama_dir)
        job_db.update_run(manifest.run_id, status="cancelled")
    finally:
        job_db.close()
    with pytest.raises(JobError, match="--resume"):
        preflight(job, "", resume=False)
    assert "ready" in preflight(job, "", resume=True)
    with pytest.raises(JobError, match="MODEL in launch.sh"):
        preflight(job, str(job / "no-such-model"), resume=True)
    # After a launcher that failed (a rank killed: measured by hand, see the report), a run left
    # "running" is recorded failed with the log's tail; a run that recorded its own end is kept.
    from studio.jobs.preflight import ended

    (run_dir(job, manifest) / "worker.log").write_text("rank 1 exitcode -9 (SIGKILL)\n")
    job_db = Database()
    try:
        job_db.update_run(manifest.run_id, status="running")
        assert "marked failed" in ended(job, 1)
        run = job_db.get_run(manifest.run_id)
        assert (run.status, run.exit_code) == ("failed", 1) and "--resume" in run.error
        assert "SIGKILL" in run.error
        job_db.update_run(manifest.run_id, status="cancelled")
        assert ended(job, 1) == f"run {manifest.run_id}: cancelled"
        assert job_db.get_run(manifest.run_id).status == "cancelled"
    finally:
        job_db.close()


def test_import_refuses_what_is_not_a_finished_job(db, exported, tmp_path):
    runs = len(db.list_runs())
    with pytest.raises(JobError, match="has not run yet"):
        import_job(db, exported.job)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(JobError, match="not a PEFT Studio job folder"):
        import_job(db, plain)
    broken = tmp_path / "broken"
    shutil.copytree(exported.job, broken)
    (broken / "job.json").write_text(json.dumps({**json.loads((broken / "job.json").read_text()),
                                                 "run_folder": "../../etc"}))
    with pytest.raises(JobError, match="run_folder"):
        import_job(db, broken)
    assert len(db.list_runs()) == runs
    assert not list(launch.runs_root(db, exported.project.id).glob(".job-import-*"))


def test_export_refusals(db, exported, tmp_path, studio_home):
    run_id = exported.run.id
    for nodes, gpus, field in ((0, 1, "--nodes"), (1, 65, "--gpus-per-node"), (True, 1, "--nodes")):
        with pytest.raises(JobError, match=field):
            export_job(db, run_id, nodes, gpus)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    with pytest.raises(JobError, match="already holds files"):
        export_job(db, run_id, 1, 1, dest=str(full))
    assert [p.name for p in full.iterdir()] == ["mine.txt"]
    with pytest.raises(JobError, match="inside the studio's projects folder"):
        export_job(db, run_id, 1, 1, dest=str(studio_home / "projects" / exported.project.folder / "x"))
    with pytest.raises(JobError, match="no run 999"):
        export_job(db, 999, 1, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_job(db, run_id, 1, 1, dest=str(empty)) == empty.resolve()
    assert not list(tmp_path.glob(".*tmp-*"))  # no work folder left


def test_a_stopped_job_imports_its_checkpoints(trip, tmp_path, monkeypatch):
    """A job stopped with Stop and save (cancelled, checkpoints, no final adapter) comes home as a
    cancelled run whose checkpoints Export offers; stopped without one, it is refused."""
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(trip.home))
    from studio.export.weights import exportable

    stopped = tmp_path / "stopped"
    shutil.copytree(trip.job, stopped)
    manifest = json.loads((stopped / "job.json").read_text())
    (stopped / "job.json").write_text(json.dumps({**manifest, "job_id": "job-stopped"}))
    shutil.rmtree(run_dir(stopped, Manifest.load(stopped)) / "adapter")
    job_db = _job_history(stopped)
    try:
        job_db.update_run(trip.source.id, status="cancelled", error="Stopped by SIGTERM at step 4")
    finally:
        job_db.close()
    trip.db.rename_project(trip.project.id, "renamed since")  # still the project it came from
    try:
        run = import_job(trip.db, stopped)
    finally:
        trip.db.rename_project(trip.project.id, trip.project.name)
    assert run.status == "cancelled" and run.error.startswith("Stopped by SIGTERM")
    assert run.project_id == trip.project.id
    assert [w.step for w in exportable(trip.db, run)] == [4, 2]
    trip.db.delete_run(run.id)
    shutil.rmtree(launch.runs_root(trip.db, run.project_id) / run.folder)
    # Into a project of its own (made for it): the job's dataset comes along, so a clone works.
    from studio.data import load_dataset_split
    from studio.history import clone_spec

    run = import_job(trip.db, stopped, project="elsewhere")
    elsewhere = trip.db.get_project_by_name("elsewhere")
    assert run.project_id == elsewhere.id and elsewhere.model_source == trip.project.model_source
    [dataset] = trip.db.list_datasets(elsewhere.id)
    assert run.dataset_id == run.spec["dataset_id"] == dataset.id
    assert len(load_dataset_split(trip.db, dataset.id, "train")) == 9
    assert clone_spec(trip.db, run.id).dataset_id == dataset.id
    assert run.spec["nproc_per_node"] == 0  # the job's 2 per node stay in its notes
    projects.delete_project(trip.db, elsewhere.id)

    count = len(trip.db.list_runs())
    (run_dir(stopped, Manifest.load(stopped)) / "notes").symlink_to("/etc")  # never followed
    with pytest.raises(JobError, match="is a link"):
        import_job(trip.db, stopped)
    (run_dir(stopped, Manifest.load(stopped)) / "notes").unlink()
    shutil.rmtree(run_dir(stopped, Manifest.load(stopped)) / "checkpoints")
    with pytest.raises(JobError, match="stopped without a checkpoint"):
        import_job(trip.db, stopped)
    assert len(trip.db.list_runs()) == count
    assert not list(launch.runs_root(trip.db, trip.project.id).glob(".job-import-*"))


def test_model_reference_is_the_hub_id_when_there_is_one(tiny_chat_model):
    from studio.export.card import EMBEDDED_HUB_ID
    from studio.jobs.export import model_reference

    assert model_reference("default") == (EMBEDDED_HUB_ID, True)
    assert model_reference("org/model-7b") == ("org/model-7b", True)
    assert model_reference(str(tiny_chat_model)) == (str(tiny_chat_model.resolve()), False)
    with pytest.raises(JobError, match="cannot be named"):
        model_reference("/no/such/folder")


def test_a_zero3_job_launches_through_accelerate_with_the_written_config(db, tiny_chat_model, tmp_path,
                                                                         monkeypatch):
    """ZeRO cannot run here (DeepSpeed kernels, NCCL): its job is checked for what it writes and
    the command launch.sh runs on node 1 of 2, parsed by accelerate's own launcher."""
    import shlex

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    project = projects.create_project(db, "zero", model_source=str(tiny_chat_model))
    with pytest.raises(RunSpecError, match="zero3 needs"):  # not on this machine: as a job
        launch.create_run(db, project.id, tiny_spec(tiny_chat_model, distributed="zero3", offload=True,
                                                    nproc_per_node=2))
    run = launch.create_run(db, project.id, tiny_spec(tiny_chat_model))
    job = export_job(db, run.id, nodes=2, gpus_per_node=4, dest=str(tmp_path / "job"),
                     distributed="zero3", offload=True)
    folder = run_dir(job, Manifest.load(job))
    assert json.loads((folder / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 3
    printed = _launch(job, "--print", "--node-rank", "1", "--rdzv-host", "node-a", "--rdzv-port", "1234")
    assert printed.returncode == 0, printed.stderr
    cmd = shlex.split(printed.stdout)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    args, defaults, from_config = _validate_launch_command(args)
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, 1)
    assert (args.main_process_ip, args.main_process_port) == ("node-a", 1234)
    assert args.module and args.training_script == "studio.worker" and args.training_script_args == [str(run.id)]
    assert args.use_deepspeed and args.deepspeed_config_file == str(folder / "deepspeed.json")
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys())
    command, env = prepare_deepspeed_cmd_env(args)
    assert command is None  # the 'standard' launcher: this node's torchrun, no pdsh/ssh
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(folder / "deepspeed.json")
    # One node of one GPU cannot shard.
    with pytest.raises(JobError, match="1 node x 1 GPU"):
        export_job(db, run.id, nodes=1, gpus_per_node=1, dest=str(tmp_path / "one"), distributed="zero3")
    with pytest.raises(JobError, match="offload"):  # the strategy's own rules, named
        export_job(db, run.id, nodes=2, gpus_per_node=4, dest=str(tmp_path / "two"), offload=True)


def test_cli_job_commands(db, exported, tmp_path, capsys):
    """``peft-studio job export / import``: the folder and how to start it; a refusal is one line
    and exit code 2."""
    from studio.cli import main

    assert main(["job", "export", str(exported.run.id), "--nodes", "1", "--gpus-per-node", "2",
                 "--dest", str(tmp_path / "cli-job")]) == 0
    out = capsys.readouterr().out
    assert f"job written to {tmp_path / 'cli-job'}" in out and "sbatch job.sbatch" in out
    assert Manifest.load(tmp_path / "cli-job").gpus_per_node == 2
    assert main(["job", "import", str(tmp_path / "cli-job")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-studio job: job run") and "has not run yet" in err and "\n" not in err
    assert main(["job", "export", str(exported.run.id), "--nodes", "0"]) == 2
    assert "--nodes: a whole number from 1" in capsys.readouterr().err
