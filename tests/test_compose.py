"""Composing trained LoRA adapters (issue 17, ``studio.adapters.compose``): the composed adapter
is the recipe's arithmetic (checked against factors and logits computed here from the parents'
own files), it reloads with plain PEFT, it is a derived run that Compare, Export and Serve list
like a trained one and that cannot be resumed, every refusal leaves no row and no folder, an
old history file gains the recipe column, and the CLI composes and refuses in one line.

Parents are LoRA adapters with random factors (``chat_helpers.save_peft_adapter``: B is not
zero, so the updates are real) saved where a completed run keeps its final adapter.
"""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chat_helpers import save_peft_adapter
from studio import projects
from studio.adapters import compose as comp
from studio.adapters.compose import CompositionError, Recipe
from studio.db import Database, RunStatus
from studio.runs import launch
from studio.runspec import RunSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOKENS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir):
    """Parent adapter folders made once: LoRA r4 (two seeds), rsLoRA r4, LoRA r8, IA3."""
    root = tmp_path_factory.mktemp("parents")
    made = {}
    for key, method, seed, r in (("a", "lora", 1, 4), ("b", "lora", 2, 4), ("rs", "rslora", 3, 4),
                                 ("r8", "lora", 4, 8), ("ia3", "ia3", 5, 4), ("r20", "lora", 6, 20)):
        made[key] = save_peft_adapter(tiny_llama_dir, root / key, method, seed=seed, r=r)
    return made


def parent(db, model, adapters, key, method="lora", project="compose", status=RunStatus.COMPLETED):
    """A completed run of ``project`` whose final adapter is ``adapters[key]``."""
    found = db.get_project_by_name(project) or projects.create_project(db, project)
    run = launch.create_run(db, found.id, RunSpec(model=str(model), method=method, sample_task="dates"),
                            name=f"{key} run")
    shutil.copytree(adapters[key], launch.run_folder(db, run) / "adapter")
    return db.update_run(run.id, status=RunStatus(status).value)


def factors(folder):
    """{module path: (A, B)} from a saved PEFT LoRA adapter's file."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return {key[:-len(".lora_A.weight")]: (value, tensors[key.replace("lora_A", "lora_B")])
            for key, value in tensors.items() if key.endswith(".lora_A.weight")}


def scaling(config_folder):
    import json

    config = json.loads((config_folder / "adapter_config.json").read_text())
    root = math.sqrt(config["r"]) if config.get("use_rslora") else config["r"]
    return config["lora_alpha"] / root


def logits_with_deltas(model_dir, deltas):
    """The base's logits with ``deltas`` ({module path: ΔW}) added to its weights: by hand."""
    from studio.models import load_model

    base = load_model(str(model_dir))
    with torch.no_grad():
        modules = dict(base.named_modules())
        for path, delta in deltas.items():
            modules[path.removeprefix("base_model.model.")].weight += delta
        return base(TOKENS).logits


def peft_logits(model_dir, folder):
    """Plain PEFT: a fresh base and ``PeftModel.from_pretrained(base, folder)``."""
    from peft import PeftModel

    from studio.models import load_model

    with torch.no_grad():
        return PeftModel.from_pretrained(load_model(str(model_dir)), str(folder)).eval()(TOKENS).logits


def state(db, project_id):
    """Rows and folders of a project: what a refusal must leave unchanged."""
    root = launch.runs_root(db, project_id)
    return sorted(r.id for r in db.list_runs(project_id)), sorted(p.name for p in root.iterdir())


def test_cat_of_rslora_and_lora_is_exactly_the_weighted_sum_of_updates(db, tiny_llama_dir, adapters):
    """cat: ΔW = Σ w_i s_i B_i A_i. An rsLoRA parent first (PEFT would give the new adapter a
    scaling of √r) and a negative weight: the reloaded logits equal the base's with that sum added."""
    rs = parent(db, tiny_llama_dir, adapters, "rs", method="rslora")
    a = parent(db, tiny_llama_dir, adapters, "a")
    recipe = Recipe("cat", ((rs.id, 0.7), (a.id, -0.4)))
    run = comp.compose(db, rs.project_id, recipe, "cat of two")
    folder = launch.run_folder(db, run) / "adapter"
    deltas = {}
    for key, w in (("rs", 0.7), ("a", -0.4)):
        for path, (A, B) in factors(adapters[key]).items():
            deltas[path] = deltas.get(path, 0) + w * scaling(adapters[key]) * (B @ A)
    expected = logits_with_deltas(tiny_llama_dir, deltas)
    got = peft_logits(tiny_llama_dir, folder)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    base = logits_with_deltas(tiny_llama_dir, {})
    assert (got - base).abs().max() > 1e-2  # the composition changes the output
    assert run.method == "rslora" and run.spec["method"] == "rslora" and run.recipe == recipe.as_dict()


def test_linear_is_the_square_root_split_not_the_sum_of_updates(db, tiny_llama_dir, adapters):
    """linear: A = Σ sign(w_i s_i) √|w_i s_i| A_i and B = Σ √|w_i s_i| B_i (PEFT combines the
    factors, so BA holds cross terms B_i A_j); the saved factors and the reloaded logits are that."""
    a = parent(db, tiny_llama_dir, adapters, "a")
    b = parent(db, tiny_llama_dir, adapters, "b")
    weights = {"a": 0.6, "b": -0.3}
    run = comp.compose(db, a.project_id, Recipe("linear", ((a.id, 0.6), (b.id, -0.3))), "linear")
    folder = launch.run_folder(db, run) / "adapter"
    got = factors(folder)
    deltas, plain_sum = {}, {}
    for path in factors(adapters["a"]):
        A = B = 0
        for key, w in weights.items():
            ws = w * scaling(adapters[key])
            Ai, Bi = factors(adapters[key])[path]
            A = A + math.copysign(math.sqrt(abs(ws)), ws) * Ai
            B = B + math.sqrt(abs(ws)) * Bi
            plain_sum[path] = plain_sum.get(path, 0) + ws * (Bi @ Ai)
        assert torch.allclose(got[path][0], A, atol=1e-6) and torch.allclose(got[path][1], B, atol=1e-6)
        deltas[path] = B @ A
    assert scaling(folder) == 1.0
    expected = logits_with_deltas(tiny_llama_dir, deltas)
    assert torch.allclose(peft_logits(tiny_llama_dir, folder), expected, atol=1e-5)
    # ... and that is not the weighted sum of the updates (what cat and svd give).
    assert not torch.allclose(expected, logits_with_deltas(tiny_llama_dir, plain_sum), atol=1e-3)


def test_a_composed_run_is_listed_like_a_trained_one_and_cannot_resume(db, tiny_chat_model, adapters):
    """Over the tiny model with a tokenizer (an export needs one); the adapters fit its shapes."""
    from studio.compare.sources import detect_method, project_adapters
    from studio.export import export_run
    from studio.export.weights import exportable
    from studio.history import run_summaries
    from studio.serve.catalog import project_catalog, served_name

    a = parent(db, tiny_chat_model, adapters, "a")
    r8 = parent(db, tiny_chat_model, adapters, "r8")
    recipe = Recipe("ties_svd", ((a.id, 0.5), (r8.id, 0.5)), density=0.5, svd_rank=6)
    assert [r.id for r in comp.composable_runs(db, a.project_id)] == [r8.id, a.id]
    run = comp.compose(db, a.project_id, recipe, "ties of two")
    assert run.status == "completed" and run.recipe == recipe.as_dict()
    assert Recipe.from_dict(db.get_run(run.id).recipe) == recipe
    assert recipe.describe({a.id: "a run", r8.id: "r8 run"}) == \
        f"TIES SVD (density 0.5, SVD rank 6) of #{a.id} a run × 0.5 + #{r8.id} r8 run × 0.5"
    folder = launch.run_folder(db, run) / "adapter"
    assert folder.parent.name == launch.folder_name(run.id, "ties of two")
    assert detect_method(folder) == "lora" and scaling(folder) == 1.0
    assert factors(folder)[next(iter(factors(folder)))][0].shape[0] == 6  # the SVD rank
    listed = {s.run_id: s for s in project_adapters(db, a.project_id, lambda r: launch.run_folder(db, r))}
    assert listed[run.id].folder == folder and listed[run.id].method == "lora"
    assert [w.path for w in exportable(db, db.get_run(run.id))] == [folder.resolve()]
    catalog = project_catalog(db, a.project_id, model=str(tiny_chat_model))
    assert catalog.adapters[served_name("ties of two", run.id)] == folder.resolve()
    summary = {s.id: s for s in run_summaries(db, a.project_id)}[run.id]  # no metrics: still a row
    assert summary.status == "completed" and summary.steps is None
    assert run.id in [r.id for r in comp.composable_runs(db, a.project_id)]  # composable again
    with pytest.raises(launch.RunConflict, match="composed adapter.*no training to resume"):
        launch.resume(db, run.id)
    exported = export_run(db, run.id, "merged", verify=False)  # Export's loader takes it too
    assert exported.status == "unverified" and (Path(exported.path) / "config.json").is_file()
    card = (Path(exported.path) / "README.md").read_text()
    assert f"| composed | TIES SVD (density 0.5, SVD rank 6) of #{a.id} × 0.5" in card
    assert "learning rate" not in card  # no training settings it never had


REFUSALS = [
    ("one parent", lambda ids: Recipe("cat", ((ids["a"], 1.0),)), "at least two parent runs"),
    ("unknown combination", lambda ids: Recipe("mean", ((ids["a"], 1.0), (ids["b"], 1.0))), "ties_svd"),
    ("density 0", lambda ids: Recipe("ties", ((ids["a"], 1.0), (ids["b"], 1.0)), density=0.0), r"\(0, 1\]"),
    ("density 1.5", lambda ids: Recipe("dare_linear", ((ids["a"], 1.0), (ids["b"], 1.0)), density=1.5),
     r"\(0, 1\]"),
    ("density missing", lambda ids: Recipe("ties", ((ids["a"], 1.0), (ids["b"], 1.0))), "density"),
    ("density unused", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["b"], 1.0)), density=0.5),
     "takes no density"),
    ("all zero", lambda ids: Recipe("cat", ((ids["a"], 0.0), (ids["b"], 0.0))), "all are 0"),
    ("nan weight", lambda ids: Recipe("cat", ((ids["a"], float("nan")), (ids["b"], 1.0))), "finite"),
    ("twice", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["a"], 1.0))), "listed twice"),
    ("ranks", lambda ids: Recipe("linear", ((ids["a"], 1.0), (ids["r8"], 1.0))), "r=4.*r=8"),
    ("ia3", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["ia3"], 1.0))), "IA3, which cannot be composed"),
    ("other project", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["elsewhere"], 1.0))),
     "this project has no run"),
    ("other base", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["other base"], 1.0))),
     "only adapters of one base model"),
    ("failed", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["failed"], 1.0))), "is failed"),
    ("svd rank", lambda ids: Recipe("svd", ((ids["a"], 1.0), (ids["b"], 1.0)), svd_rank=9), "at most 8"),
    ("4-bit and full", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["qlora"], 1.0))), "4-bit base"),
    ("layers", lambda ids: Recipe("cat", ((ids["a"], 1.0), (ids["layer 0"], 1.0))), "layers_to_transform"),
]


def test_refusals_name_the_problem_and_leave_nothing(db, tiny_llama_dir, tiny_chat_model, adapters):
    ids = {key: parent(db, tiny_llama_dir, adapters, key).id for key in ("a", "b", "r8")}
    ids["ia3"] = parent(db, tiny_llama_dir, adapters, "ia3", method="ia3").id
    ids["failed"] = parent(db, tiny_llama_dir, adapters, "b", status=RunStatus.FAILED).id
    ids["other base"] = parent(db, tiny_chat_model, adapters, "b").id
    ids["elsewhere"] = parent(db, tiny_llama_dir, adapters, "b", project="another").id
    ids["qlora"] = parent(db, tiny_llama_dir, adapters, "b", method="qlora").id
    layer0 = parent(db, tiny_llama_dir, adapters, "b")
    config_path = launch.run_folder(db, layer0) / "adapter" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"layers_to_transform": null',
                                                           '"layers_to_transform": [0]'))
    ids["layer 0"] = layer0.id
    project_id = db.get_run(ids["a"]).project_id
    before = state(db, project_id)
    for what, make, words in REFUSALS:
        with pytest.raises(CompositionError, match=words):
            comp.compose(db, project_id, make(ids), "refused")
        assert state(db, project_id) == before, what
    with pytest.raises(CompositionError, match="no CUDA GPU") if not torch.cuda.is_available() \
            else pytest.raises(CompositionError, match="device: 'cpu' or 'cuda'"):
        comp.compose(db, project_id, Recipe("cat", ((ids["a"], 1.0), (ids["b"], 1.0))), "gpu",
                     device="cuda" if not torch.cuda.is_available() else "tpu")
    assert state(db, project_id) == before
    assert "no run" in str(pytest.raises(CompositionError, comp.check_recipe, db, project_id,
                                         Recipe("cat", ((ids["a"], 1.0), (999, 1.0)))).value)
    # Refused once the model is loaded: an SVD rank wider than a layer (k_proj is 32 wide here).
    wide = [parent(db, tiny_llama_dir, adapters, "r20").id for _ in range(2)]
    with pytest.raises(CompositionError, match="svd_rank: 40 is more than .*k_proj.*at most 32"):
        comp.compose(db, project_id, Recipe("svd", ((wide[0], 1.0), (wide[1], 1.0)), svd_rank=40), "wide")
    # A failure while building (a parent's weights unreadable): no row, no temporary folder.
    broken = parent(db, tiny_llama_dir, adapters, "b")
    (launch.run_folder(db, broken) / "adapter" / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    before = state(db, project_id)
    # ... and a killed composition's work folder (a day old) is swept; a fresh one is kept.
    root = launch.runs_root(db, project_id)
    stale, fresh = root / f"{comp.WORK_PREFIX}killed", root / f"{comp.WORK_PREFIX}running"
    stale.mkdir(), fresh.mkdir()
    os.utime(stale, (0, 0))
    with pytest.raises(Exception):
        comp.compose(db, project_id, Recipe("cat", ((ids["a"], 1.0), (broken.id, 1.0))), "broken")
    assert not stale.exists() and fresh.exists()
    fresh.rmdir()
    assert state(db, project_id) == before


def test_a_schema_3_file_gains_the_recipe_column(tmp_path):
    path = tmp_path / "old" / "studio.db"
    db = Database(path)
    project = db.create_project("old")
    kept = db.create_run(project.id, "trained", "lora", {"method": "lora"})
    db.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE runs DROP COLUMN recipe")  # back to what schema 3 wrote
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    db = Database(path)
    try:
        assert db.schema_version() == 4 and db.get_run(kept.id).recipe is None
        columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(runs)")]
        assert columns[-1] == "recipe"
        db.update_run(kept.id, recipe={"combination": "cat"})
        assert db.get_run(kept.id).recipe == {"combination": "cat"}
    finally:
        db.close()


def test_cli_composes_in_a_child_and_refuses_in_one_line(db, tiny_llama_dir, adapters, capsys):
    """``peft-studio compose`` as the UI runs it (``compose_in_child``: a real child process, the
    same history), then refusals through ``main``: one line, exit 2."""
    from studio.adapters.compose_child import compose_in_child
    from studio.cli import main

    a = parent(db, tiny_llama_dir, adapters, "a")
    b = parent(db, tiny_llama_dir, adapters, "b")
    recipe = Recipe("dare_linear", ((a.id, 0.5), (b.id, -0.25)), density=0.7)
    run = compose_in_child(db, a.project_id, recipe, "-from the cli")
    assert run.name == "-from the cli" and Recipe.from_dict(run.recipe) == recipe
    again = comp.compose(db, a.project_id, recipe, "in this process")  # DARE's drop is seeded:
    got, same = (load_file(str(launch.run_folder(db, r) / "adapter" / "adapter_model.safetensors"))
                 for r in (run, again))
    assert got.keys() == same.keys() and all(torch.equal(got[k], same[k]) for k in got)
    assert any((got[k] == 0).any() for k in got)  # ... and it did drop values
    capsys.readouterr()  # the loading progress bars
    with pytest.raises(CompositionError, match="^adapters: run .* is listed twice"):
        compose_in_child(db, a.project_id, Recipe("cat", ((a.id, 1.0), (a.id, 2.0))), "twice")
    assert main(["compose", "--project", "compose", "--combination", "ties",
                 "--adapter", f"{a.id}=0.5", "--adapter", f"{b.id}=0.5", "--name", "no density"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-studio compose: density") and err.count("\n") == 1
    assert main(["compose", "--project", "compose", "--combination", "cat", "--adapter", "x=1",
                 "--adapter", f"{b.id}=1", "--name", "bad"]) == 2
    assert "RUN_ID=WEIGHT" in capsys.readouterr().err
