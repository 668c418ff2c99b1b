"""A project's local MLflow store through ``MlflowClient``: the experiment (the project), the
MLflow runs that copy one studio run (found by the ``peft_studio.run_id`` tag), the spec as
params. Shared by the live logging (``live.py``) and ``runs export`` (``export.py``).

A client bound to the store's URI, never ``mlflow.set_tracking_uri``: an export in the UI or CLI
process must not change where anything else in the process logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.trackers.choice import PROJECT_TAG, RUN_TAG, TrackerError, mlflow_uri, require

# MLflow's batch limits (mlflow.utils.validation): 1000 metrics, 100 params per log_batch.
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
PARAM_PREFIX = "spec."  # apart from the Trainer's own params (learning_rate, seed, ...), which
# transformers' callback logs under their TrainingArguments names: MLflow refuses a param logged
# twice with another value (our max_steps 0 is the Trainer's -1)


def client(store: Path):
    """An ``MlflowClient`` on the store (created on first use: SQLite + MLflow's migrations)."""
    require("mlflow")
    from mlflow import MlflowClient

    try:
        Path(store).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackerError(f"cannot create the MLflow store folder {store}: {exc}") from None
    return MlflowClient(tracking_uri=mlflow_uri(store))


def experiment(mlflow_client: Any, name: str, store: Path) -> str:
    """The id of experiment ``name`` in the store, created with its artifacts inside the store
    (MLflow's default is ./mlruns under whatever folder the process happens to run in)."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=(Path(store) / "artifacts").resolve().as_uri())
    except MlflowException:  # created by another process meanwhile
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def copies_of(mlflow_client: Any, experiment_id: str, studio_run_id: int) -> list[Any]:
    """The active MLflow runs that copy studio run ``studio_run_id`` (live or exported)."""
    return mlflow_client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{int(studio_run_id)}'")


def new_run(mlflow_client: Any, experiment_id: str, project: Any, run: Any, start_ms: int | None = None) -> str:
    """A new MLflow run for a studio run: its name, the tags that find it again, the spec as
    params. Returns the MLflow run id."""
    tags = {RUN_TAG: str(run.id), PROJECT_TAG: project.name}
    created = mlflow_client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=run.name)
    mlflow_id = created.info.run_id
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in spec_params(run.spec or {}).items()]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        mlflow_client.log_batch(mlflow_id, params=params[i:i + PARAMS_PER_BATCH])
    return mlflow_id


def spec_params(spec: dict[str, Any]) -> dict[str, str]:
    """The RunSpec as MLflow params: ``spec.<field>``, method settings as
    ``spec.method_settings.<name>``, lists and None as JSON (MLflow keeps strings)."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        if key == "method_settings" and isinstance(value, dict):
            for name, setting in value.items():
                out[f"{PARAM_PREFIX}method_settings.{name}"] = _text(setting)
        else:
            out[PARAM_PREFIX + key] = _text(value)
    return out


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)  # true/false/null and lists as JSON, numbers as written


def millis(moment: Any) -> int | None:
    """A history datetime (UTC) or wall time in seconds as MLflow's epoch milliseconds."""
    if moment is None:
        return None
    if isinstance(moment, (int, float)):
        return int(moment * 1000)
    return int(moment.timestamp() * 1000)
