"""``peft-studio compare`` through ``studio.cli.main`` on a fresh home: the base and two trained
LoRA runs answer one prompt, each column equal to plain transformers / PEFT greedy generation
over the same model and adapter; bad input is refused with one line naming what is wrong.

Two tiny LoRA runs are trained once for the module (the worker's own ``train``, in this
process), so every test shares one studio home.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
from conftest import module_home

from studio import cli
from studio.db import Database, RunStatus
from studio.projects import create_project
from studio.runs import launch
from studio.runspec import RunSpec
from studio.worker.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT, SYSTEM, TOKENS = "When was the moon landing?", "Answer briefly.", 10


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    yield from module_home(tmp_path_factory, "compare-cli-home")


@pytest.fixture(scope="module")
def project(studio_home, tiny_chat_model):
    """Project "cmp" over the tiny model: runs "lora-a" and "lora-b" (trained; learning rates
    large and different enough that three steps give three different greedy answers; "lora-b"
    keeps a checkpoint at step 2) and "elsewhere", a completed run
    recorded as trained on another base model."""
    db = Database()
    found = create_project(db, "cmp", model_source=str(tiny_chat_model))
    ids = {}
    for name, lr, seed, save in (("lora-a", 3e-2, 0, 0), ("lora-b", 1e-2, 1, 2)):
        spec = RunSpec(model=str(tiny_chat_model), method="lora", sample_task="dates", max_steps=3, batch_size=2,
                       max_length=64, learning_rate=lr, seed=seed, precision="fp32", eval_steps=0, save_steps=save,
                       exact_match_limit=0)
        run = launch.create_run(db, found.id, spec, name=name)
        assert train(db, run.id) == "completed", db.get_run(run.id).error
        ids[name] = run.id
    gc.collect()
    other = RunSpec(model="HuggingFaceTB/SmolLM2-360M-Instruct", method="lora", sample_task="dates").to_dict()
    ids["elsewhere"] = db.create_run(found.id, "elsewhere", "lora", other, status=RunStatus.COMPLETED).id
    return found, ids


def compare(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["compare", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def plain_answers(model_dir, adapters: list) -> list[str]:
    """The reference: transformers' own greedy ``generate`` on a fresh base, and on a fresh base
    with each adapter loaded by PEFT, over the chat template with the system prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
                                         tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    answers = []
    for folder in [None, *adapters]:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder))
        with torch.no_grad():
            out = model.eval().generate(**batch, max_new_tokens=TOKENS, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def test_base_and_two_trained_adapters_answer_as_plain_peft(project, tiny_chat_model, capsys):
    found, ids = project
    code, out, err = compare(capsys, "--project", "cmp", "--adapters", f"{ids['lora-a']},LORA-B", "--adapters",
                             "lora-b@2", "--prompt", PROMPT, "--system", SYSTEM, "--max-tokens", str(TOKENS),
                             "--device", "cpu", "--json")  # the CPU in fp32, as the reference
    assert code == 0, err
    result = json.loads(out)
    assert result["project"] == "cmp" and result["settings"]["decoding"] == "greedy"
    columns = result["columns"]
    a, b = ids["lora-a"], ids["lora-b"]
    assert [c["column"] for c in columns] == ["base", f"#{a} lora-a", f"#{b} lora-b", f"#{b} lora-b @ step 2"]
    assert [(c["run_id"], c["checkpoint_step"]) for c in columns] == [(None, None), (a, None), (b, None), (b, 2)]
    assert all(c["path"] == "batched" and c["tokens"] > 0 for c in columns)  # one generate, as the tab does
    db = Database()
    folders = [launch.run_folder(db, db.get_run(run)) / "adapter" for run in (a, b)]
    folders += [Path(c.path) for c in db.list_checkpoints(b) if c.step == 2]
    assert [c["text"] for c in columns] == plain_answers(tiny_chat_model, folders)
    assert len({c["text"] for c in columns[:3]}) == 3  # each trained adapter really changes the answer


def test_text_output_puts_the_columns_side_by_side_and_the_project_defaults_to_the_only_one(project, capsys):
    found, ids = project
    code, out, err = compare(capsys, "--adapters", "lora-a", "--prompt", PROMPT, "--max-tokens", "4")
    assert code == 0, err
    header = out.splitlines()[0]
    assert "base (base)" in header and f"#{ids['lora-a']} lora-a (lora)" in header and "│" in header
    assert out.splitlines()[-1].count("4 tokens") == 2  # each column's figures under it


@pytest.mark.parametrize("argv, message", [
    (["--adapters", "lora-a"], "--prompt is empty"),
    (["--adapters", "lora-a", "--prompt", "   "], "--prompt is empty"),
    (["--adapters", "no-such-run", "--prompt", "hi"], "project 'cmp' has no run with that id or name (its runs: #"),
    (["--adapters", "999", "--prompt", "hi"], "has no run with that id or name"),
    (["--adapters", "elsewhere", "--prompt", "hi"], "was trained on HuggingFaceTB/SmolLM2-360M-Instruct, not on"),
    (["--adapters", "lora-a@99", "--prompt", "hi"], "has no checkpoint at step 99"),
    (["--adapters", "lora-a,lora-a", "--prompt", "hi"], "names '#1 lora-a' twice"),
    (["--project", "nope", "--adapters", "lora-a", "--prompt", "hi"], "no project 'nope' (projects: cmp)"),
    (["--adapters", "lora-a", "--prompt", "hi", "--max-tokens", "0"], "max new tokens must be between 1 and 4096"),
    (["--adapters", "lora-a", "--prompt", "hi", "--temperature", "-1"], "--temperature must be 0 (greedy)"),
])
def test_bad_input_is_refused_with_one_line_naming_it(project, capsys, argv, message):
    code, out, err = compare(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("peft-studio compare: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Loading" not in err  # refused before any model loads


def test_without_project_several_projects_or_none_say_what_to_do(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(tmp_path))
    code, _, err = compare(capsys, "--prompt", "hi")
    assert code == 2 and "there is no project yet" in err
    db = Database()
    create_project(db, "one")
    create_project(db, "two")
    code, _, err = compare(capsys, "--prompt", "hi")
    assert code == 2 and "there are 2 projects ('one', 'two'): say which one with --project NAME" in err
