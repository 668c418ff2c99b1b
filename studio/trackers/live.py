"""Live logging while a run trains: the worker's side of a run's ``trackers`` switches.

transformers' own callbacks do the logging (``report_to``, ``worker/train.py``); this module
points them at the studio's places and gives the MLflow run its identity:

- TensorBoard: ``TENSORBOARD_LOGGING_DIR`` = ``<run folder>/tensorboard`` (the callback reads it
  when the Trainer is built).
- MLflow: the run is created here, in the project's local store, with the run's name, the tags
  that ``runs export`` finds it by, and the spec as ``spec.*`` params, then made the active run;
  transformers' ``MLflowCallback`` sees an active run, logs into it (its TrainingArguments and
  model config as params, every Trainer log as metrics) and leaves it open, so the evaluation
  after training lands in the same run and ``end`` records how the run ended. Left to itself the
  callback would end the run at ``on_train_end`` and a later log would silently start another.

Only the main rank logs: both callbacks check ``state.is_world_process_zero``, and only the
main rank creates the MLflow run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from studio.trackers.choice import (TITLES, TrackerError, mlflow_store, mlflow_uri, project_folder, tensorboard_dir,
                                    view_line)

# History status -> MLflow's RunStatus name
MLFLOW_STATUS = {"completed": "FINISHED", "cancelled": "KILLED", "failed": "FAILED", "oom": "FAILED"}
_ENV = "TENSORBOARD_LOGGING_DIR"
_state: dict[str, Any] = {"mlflow_run": None, "env": None}


def begin(db: Any, run_id: int, spec: Any, folder: Any, resume: bool, main: bool,
          say: Callable[[str], None] = print) -> None:
    """Point the Trainer's tracker callbacks at this run's places; says where each logs and the
    command that shows it. A store that cannot be opened fails the run here, before the model
    loads: the user asked for the copy."""
    if not spec.trackers:
        return
    run = db.get_run(run_id)
    project = db.get_project(run.project_id)
    if "tensorboard" in spec.trackers:
        _state["env"] = (_ENV, os.environ.get(_ENV))
        logs = tensorboard_dir(folder)
        os.environ[_ENV] = str(logs)
        if main:
            say(f"{TITLES['tensorboard']}: logging to {logs}; view: "
                f"{view_line('tensorboard', project_folder(project) / 'runs')}")
    if "mlflow" in spec.trackers and main:
        store = mlflow_store(project_folder(project))
        try:
            _start_mlflow(project, run, resume)
        except Exception as exc:  # the store locked, unwritable, damaged: the user asked for it
            raise TrackerError(f"the run asked for MLflow, and its store {store} could not be used: "
                               f"{type(exc).__name__}: {exc}") from exc
        say(f"{TITLES['mlflow']}: logging to experiment '{project.name}', run '{run.name}' in {store}; "
            f"view: {view_line('mlflow', store)}")


def _start_mlflow(project: Any, run: Any, resume: bool) -> None:
    import mlflow

    from studio.trackers import mlflow_store as stores

    store = mlflow_store(project_folder(project))
    client = stores.client(store)
    experiment = stores.experiment(client, project.name, store)
    # A resumed run is a second MLflow run with the same tag (``runs export`` replaces both):
    # re-opening the first would re-log the Trainer's params, which MLflow refuses if any differs.
    named = run if not resume else _Renamed(run, f"{run.name} (resumed)")
    mlflow_id = stores.new_run(client, experiment, project, named, stores.millis(time.time()))
    mlflow.set_tracking_uri(mlflow_uri(store))
    mlflow.start_run(run_id=mlflow_id)
    _state["mlflow_run"] = mlflow_id


class _Renamed:
    def __init__(self, run: Any, name: str) -> None:
        self.id, self.spec, self.name = run.id, run.spec, name


def end(status: str, say: Callable[[str], None] = print) -> None:
    """Close what ``begin`` opened: the MLflow run with the run's outcome (its queued metrics
    flushed), and the environment as it was (a test trains in-process)."""
    mlflow_id, _state["mlflow_run"] = _state["mlflow_run"], None
    if mlflow_id is not None:
        import mlflow

        try:  # the copy's end must not keep the history from recording the run's
            active = mlflow.active_run()
            if active is not None and active.info.run_id == mlflow_id:
                mlflow.end_run(status=MLFLOW_STATUS.get(status, "FAILED"))
        except Exception as exc:
            say(f"MLflow: could not end run {mlflow_id} ({type(exc).__name__}: {exc}); the history has it all")
    env, _state["env"] = _state["env"], None
    if env is not None:
        name, before = env
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
