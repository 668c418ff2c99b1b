"""Heavy, opt-in (``pytest -m heavy``): every method issue 17 added lifts exact match on the
``dates`` sample task over the base model, trained by the bake-off (the History tab's queue and
workers, through ``peft-studio bakeoff``) on the real SmolLM2-135M.

Five real-model trainings of 30 steps cost ~15 minutes on a 2-core CPU, so this file stays out of
the default run (``-m "not heavy"`` in pyproject's ``addopts``): the whole suite has a 20-minute
budget. It ran on this project's machine with the figures in ``docs/bakeoff.md``.
"""

from __future__ import annotations

import gc

import pytest

from conftest import LIFT_LIMIT, LIFT_TASK

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

NEW_METHODS = ["llama_adapter", "oft", "boft", "galore", "apollo"]


def test_each_new_method_lifts_exact_match_through_the_bakeoff(default_model_cached, studio_home, tmp_path):
    from studio import cli
    from studio.db import Database
    from studio.evaluate import score_task
    from studio.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(default_model_cached))
    model = load_model(str(default_model_cached)).eval()
    base = score_task(model, tokenizer, LIFT_TASK, limit=LIFT_LIMIT).exact_match
    del model
    gc.collect()

    code = cli.main(["bakeoff", "--task", LIFT_TASK, "--methods", ",".join(NEW_METHODS), "--steps", "30",
                     "--batch-size", "4", "--max-length", "128", "--eval-rows", str(LIFT_LIMIT),
                     "--project", "lift", "--markdown", str(tmp_path / "lift.md")])
    assert code == 0
    print((tmp_path / "lift.md").read_text())
    db = Database()
    (project,) = [p for p in db.list_projects() if p.name == "lift"]
    scores = {}
    for run in db.list_runs(project.id):
        assert run.status == "completed", (run.method, run.error)
        scores[run.method] = [m.value for m in db.metrics_for(run.id, names=["eval_exact_match"])][-1]
    assert sorted(scores) == sorted(NEW_METHODS)
    print(f"{LIFT_TASK}: base exact match {base:.0%}; " + ", ".join(f"{m} {s:.0%}" for m, s in scores.items()))
    assert all(score > base for score in scores.values()), (base, scores)
