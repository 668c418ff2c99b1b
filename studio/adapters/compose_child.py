"""Composing in a child process (``peft-studio compose``), for the UI.

``compose`` loads the base model and every parent adapter: torch, peft and the model's memory.
Done on a Gradio handler thread it would bring all of that into the UI process, which otherwise
never loads a model (Export runs its exports in a child for the same reason, see
``studio.export.child``). The child uses the same history and the same ``compose``; it prints
the new run as JSON, or refuses with one ``peft-studio compose: <reason>`` line and exit code 2,
raised here as ``CompositionError`` with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from studio.adapters.compose import CompositionError, Recipe

PREFIX = "peft-studio compose: "


def compose_in_child(db: Any, project_id: int, recipe: Recipe, name: str, *, device: str = "cpu",
                     timeout: float = 3600) -> Any:
    """``compose`` in ``python -m studio compose``; the new derived run, read back from ``db``.
    ``CompositionError`` with the child's reason when it refuses or fails."""
    project = db.get_project(project_id)
    if project is None:
        raise CompositionError(f"project: there is no project {project_id}")
    # "--key=value": a name starting with "-" must not read as an option
    argv = [sys.executable, "-m", "studio", "compose", f"--project={project.name}",
            f"--combination={recipe.combination}", f"--name={name}", f"--device={device}"]
    for run_id, weight in recipe.parents:
        argv.append(f"--adapter={int(run_id)}={float(weight)!r}")
    if recipe.density is not None:
        argv += ["--density", repr(float(recipe.density))]
    if recipe.svd_rank is not None:
        argv += ["--svd-rank", str(int(recipe.svd_rank))]
    # stderr to a file, not a pipe: library warnings could fill a pipe nobody reads until the end
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException:  # the handler was cancelled or timed out: no unseen composition
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        stderr = err.read()
    if proc.returncode == 2 and PREFIX in stderr:
        raise CompositionError(stderr[stderr.rindex(PREFIX) + len(PREFIX):].strip())
    try:
        run = db.get_run(int(json.loads(out)["run_id"]))
    except (ValueError, KeyError, TypeError):
        run = None
    if proc.returncode != 0 or run is None:
        tail = stderr.strip()[-1500:] or out[-1500:]
        raise CompositionError(f"the compose process ended with exit code {proc.returncode}: {tail}")
    return run
