"""GGUF exports checked in llama.cpp, and made by its quantiser (issue 19, part 2).

One LoRA run on a copy of the tiny chat model, shared by the module. A random model never says
its end-of-turn token by itself, so the fixture makes it: after training it swaps, in the base's
output layer (LoRA does not train it), the rows of ``<|im_end|>`` and of a token the trained
model says early in its answer to the first eval prompt. That answer now ends there, in
transformers (whose generation config stops at ``<|im_end|>``) and, if the export carries the
end-of-turn token, in llama.cpp: a file that lost it would run on, and the test would fail.

Exports cost a transformers reload each (~10 s: its GGUF reader converts the 49k-token
vocabulary), so the f16 export is made once, with llama.cpp switched off by the studio's own
``PEFT_STUDIO_NO_LLAMACPP`` (what the result says without it, tested everywhere), and its file
is then checked by the llama.cpp verifier directly; the q8_0 and Q4_K_M exports run the whole
path with llama.cpp. The f16 check and Q4_K_M skip where llama-cpp-python is not installed; the
q8_0 export then runs with transformers alone.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import module_home

from studio.db import Database
from studio.export import ExportError, export_run, llamacpp
from studio.projects import create_project
from studio.runs import launch
from studio.runspec import RunSpec
from studio.worker.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Where llama-cpp-python is installed (and not switched off: PEFT_STUDIO_NO_LLAMACPP=1 runs this
# file as a machine without it would).
needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")
END = 2  # <|im_end|> in the SmolLM2 tokenizer: its chat template's end-of-turn and its eos


@pytest.fixture(scope="module", autouse=True)
def studio_home(tmp_path_factory):
    yield from module_home(tmp_path_factory, "llamacpp-home")


def _greedy_first_answer(spec: RunSpec, adapter: Path) -> list[int]:
    from studio import models
    from studio.export.build import _prompts
    from studio.export.load import load_trained
    from studio.export.verify import reference_outputs

    model = load_trained(spec, adapter, "float32")
    tokenizer = models.load_tokenizer(spec.model)
    return reference_outputs(model, tokenizer, _prompts(spec, tokenizer, limit=1))[0][1].tolist()


def _swap_output_rows(model_dir: Path, a: int, b: int) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    head = weights["lm_head.weight"]
    head[[a, b]] = head[[b, a]]
    save_file(weights, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def stopping_run(studio_home, tiny_chat_model, tmp_path_factory) -> tuple[int, list[int]]:
    """(run id, the trained model's greedy answer to the first eval prompt before the swap)."""
    base = tmp_path_factory.mktemp("eot-model") / "model"
    shutil.copytree(tiny_chat_model, base)
    db = Database()
    project = create_project(db, "gguf")
    spec = RunSpec(model=str(base), method="lora", sample_task="dates", max_steps=3, batch_size=2, max_length=64,
                   learning_rate=5e-3, eval_steps=0, save_steps=0, exact_match_limit=0,
                   precision="fp32")  # not "auto": the same trained model on a busy machine or an idle one
    run = launch.create_run(db, project.id, spec)
    assert train(db, run.id) == "completed", db.get_run(run.id).error
    gc.collect()
    answer = _greedy_first_answer(spec, launch.run_folder(db, db.get_run(run.id)) / "adapter")
    # The first token after the first that the answer has not said yet: swapped with the end of turn,
    # the answer ends there (a repeated token would end it earlier).
    k = next(i for i in range(1, len(answer)) if answer[i] not in answer[:i])
    assert END not in answer[:k + 1], answer
    _swap_output_rows(base, END, answer[k])
    return run.id, answer


@pytest.fixture(scope="module")
def f16_without_llamacpp(stopping_run):
    """An f16 export made with llama.cpp switched off, and the refusal of a k-quant meanwhile."""
    db = Database()
    project_id = db.get_run(stopping_run[0]).project_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(llamacpp.DISABLE_ENV, "1")
        before = len(db.list_exports(project_id))
        with pytest.raises(ExportError) as refused:
            export_run(db, stopping_run[0], "gguf", "Q5_K_M")
        refused_rows = len(db.list_exports(project_id)) - before
        export = export_run(db, stopping_run[0], "gguf", "f16")
    return export, str(refused.value), refused_rows


def test_without_llamacpp_the_export_says_what_is_not_verified(f16_without_llamacpp):
    from studio.ui.export_tab import export_message, ollama_hint

    export, refusal, refused_rows = f16_without_llamacpp
    assert "Q5_K_M is made by llama.cpp's own quantiser" in refusal and "f16 or q8_0" in refusal
    assert "pip install 'peft-studio[llamacpp]'" in refusal
    assert refused_rows == 0  # refused before anything was recorded or loaded
    v = export.verification
    assert export.status == "verified" and v["verifiers"] == ["transformers"] and "llama_cpp" not in v
    assert v["greedy_agreement"] >= 0.75 and v["studio_imported_by_loader"] == []
    assert v["not_verified"].startswith("Not verified: loading in llama.cpp and stopping at the end-of-turn token")
    assert "pip install 'peft-studio[llamacpp]'" in v["not_verified"]
    assert v["end_of_turn_marked"] and v["marked_end_ids"]["eot"] == END  # the file itself, read by gguf
    assert _modelfile_from(export.path) == "./model-f16.gguf"
    shown = export_message({"status": export.status, "path": export.path, "size_bytes": export.size_bytes,
                            "verification": json.loads(json.dumps(v))})
    assert "Not verified: loading in llama.cpp" in shown
    # the Export tab says how to run it in Ollama, with the name the export's card uses
    hint = ollama_hint(export.path, "Dates: v2")
    assert f"cd {export.path}" in hint and "ollama create dates-v2 -f Modelfile" in hint
    assert ollama_hint(str(Path(export.path).parent), "x") == ""  # no Modelfile there: nothing said


def _modelfile_from(folder: str) -> str:
    """The FROM of the export's Ollama Modelfile (part 1's parser): the file it runs."""
    from studio.export.modelfile import parse_modelfile

    return parse_modelfile((Path(folder) / "Modelfile").read_text(encoding="utf-8"))["from"]


def _assert_same_answers_and_stop(lc: dict, dtype: str) -> None:
    """f16: the same tokens on every prompt, and the first answer stopped at the swapped-in end of
    turn. q8_0 rounds llama.cpp's activations to 8 bits too: a prompt may leave transformers'
    answer at a near-tie (listed), never by more, and no answer runs past its end of turn."""
    assert lc["ok"] and lc["prompts"] == 4, lc
    ties = len(lc.get("near_ties", []))
    assert lc["greedy_agreement"] == 1.0 if dtype == "f16" else lc["greedy_agreement"] + ties / 4 == 1.0, lc
    assert lc["stopped_there"] == lc["answers_ending_at_end_of_turn"] >= (1 if dtype == "f16" else 0), lc
    assert lc["end_ids_are_end_of_generation"] == {str(END): True} and lc["tokenization_agreement"] == 1.0


@needs_llamacpp
def test_the_f16_file_answers_in_llamacpp_as_the_trained_model_and_stops_at_end_of_turn(f16_without_llamacpp,
                                                                                         stopping_run):
    """The f16 file written above, checked by the llama.cpp verifier itself."""
    from studio import models
    from studio.export.build import _prompts
    from studio.export.gguf_export import end_of_turn_token
    from studio.export.load import load_trained
    from studio.export.verify import reference_outputs

    db = Database()
    run = db.get_run(stopping_run[0])
    spec = RunSpec.from_dict(run.spec)
    tokenizer = models.load_tokenizer(spec.model)
    texts = _prompts(spec, tokenizer)
    reference = reference_outputs(load_trained(spec, launch.run_folder(db, run) / "adapter", "float32"),
                                  tokenizer, texts)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    lc = llamacpp.verify(Path(f16_without_llamacpp[0].path) / "model-f16.gguf", "f16", texts, ids, reference,
                         end_of_turn_token(tokenizer), tokenizer.eos_token_id)
    _assert_same_answers_and_stop(lc, "f16")


def test_a_q8_0_export_is_verified_by_transformers_and_llamacpp(stopping_run):
    """Runs everywhere (it replaces test_export's GGUF test): with llama.cpp where it is installed."""
    export = export_run(Database(), stopping_run[0], "gguf", "q8_0")
    v = export.verification
    assert export.status == "verified", v
    assert v["greedy_agreement"] >= 0.75 and v["studio_imported_by_loader"] == []  # transformers' verdict
    if llamacpp.available():
        from studio.ui.export_tab import export_message

        assert v["verifiers"] == ["transformers", "llama.cpp"]
        _assert_same_answers_and_stop(v["llama_cpp"], "q8_0")
        shown = export_message({"status": export.status, "path": export.path, "size_bytes": export.size_bytes,
                                "verification": v})
        assert "llama.cpp: greedy agreement" in shown and "over 4 prompts" in shown
    else:
        assert v["verifiers"] == ["transformers"] and v["not_verified"].startswith("Not verified")
    assert v["marked_end_ids"]["eot"] == END
    assert sorted(os.listdir(export.path)) == sorted(["model-q8_0.gguf", "README.md", "Modelfile",
                                                      ".peft-studio-export.json"])
    assert _modelfile_from(export.path) == "./model-q8_0.gguf"


@needs_llamacpp
def test_a_file_llamacpp_cannot_load_is_its_error_not_the_studios(f16_without_llamacpp, tmp_path):
    """llama.cpp runs in a child: a broken file is an error naming the file, and this process lives on."""
    whole = (Path(f16_without_llamacpp[0].path) / "model-f16.gguf").read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(whole[: len(whole) // 2])  # the tensors cut off halfway
    with pytest.raises(llamacpp.LlamaCppError, match="llama.cpp failed loading broken.gguf"):
        llamacpp.verify(broken, "f16", ["hi"], [[1, 2]], [], END, END)


@needs_llamacpp
def test_the_end_of_turn_id_the_writer_marks_is_what_makes_llamacpp_stop(tiny_chat_model, tmp_path):
    """The "never stops" bug itself: a chat template whose turns end with a token that is not the
    end-of-sequence token (here <file_sep>, which llama.cpp does not recognise by its text). The
    untrained model is made to say it second; the file marked with it stops there, the same file
    without the mark runs on, and the verifier says so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.export.gguf_export import end_of_turn_token, write_gguf
    from studio.export.verify import reference_outputs

    base = tmp_path / "model"
    shutil.copytree(tiny_chat_model, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content'] + '<|im_end|>'", "message['content'] + ('<file_sep>' if message['role'] == "
                                             "'assistant' else '<|im_end|>')")
    tokenizer.save_pretrained(base)
    turn_end = end_of_turn_token(tokenizer)
    assert tokenizer.convert_ids_to_tokens(turn_end) == "<file_sep>" != tokenizer.eos_token
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                           add_generation_prompt=True)]
    ids = [tokenizer(texts[0], add_special_tokens=False)["input_ids"]]
    answer = reference_outputs(AutoModelForCausalLM.from_pretrained(base), tokenizer, texts)[0][1].tolist()
    k = next(i for i in range(1, len(answer)) if answer[i] not in answer[:i])
    _swap_output_rows(base, turn_end, answer[k])
    reference = reference_outputs(AutoModelForCausalLM.from_pretrained(base), tokenizer, texts)
    assert reference[0][1].tolist()[k] == turn_end  # transformers does not stop there: its eos is <|im_end|>

    marked = write_gguf(base, tmp_path / "marked.gguf", "f16", end_of_turn=turn_end)
    lc = llamacpp.verify(marked, "f16", texts, ids, reference, turn_end, tokenizer.eos_token_id)
    assert lc["ok"] and lc["answers_ending_at_end_of_turn"] == lc["stopped_there"] == 1, lc
    unmarked = write_gguf(base, tmp_path / "unmarked.gguf", "f16")
    lc = llamacpp.verify(unmarked, "f16", texts, ids, reference, turn_end, tokenizer.eos_token_id)
    assert not lc["ok"] and lc["ran_past_end_of_turn"] == [0], lc
    assert lc["end_ids_are_end_of_generation"][str(turn_end)] is False


@needs_llamacpp
def test_q4_k_m_is_made_by_llamacpp_and_its_agreement_stated(stopping_run):
    import gguf

    export = export_run(Database(), stopping_run[0], "gguf", "Q4_K_M")
    v = export.verification
    assert export.status == "verified", v
    files = os.listdir(export.path)
    assert "model-Q4_K_M.gguf" in files and not any("f16" in f for f in files)  # the intermediate removed
    assert _modelfile_from(export.path) == "./model-Q4_K_M.gguf"
    reader = gguf.GGUFReader(str(Path(export.path) / "model-Q4_K_M.gguf"))
    assert int(reader.get_field(gguf.Keys.General.FILE_TYPE).contents()) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert v["verifiers"] == ["llama.cpp"] and v["loader"] == "llama.cpp"
    assert 0.0 <= v["greedy_agreement"] <= 1.0 and v["llama_cpp"]["required"] == "agreement stated, not required"
    # A 64-wide model has no row of 256 values: llama.cpp falls back from Q4_K to other types, and says so.
    types = v["quantiser"]["tensor_types"]
    assert sum(types.values()) == len(reader.tensors) and "Q4_K" not in types
    assert v["quantiser"]["note"].startswith("no tensor of this model could take Q4_K")
    assert v["llama_cpp"]["stopped_there"] == v["llama_cpp"]["answers_ending_at_end_of_turn"]


def _peaked(token: int):
    """First-token logits over a vocabulary of 8 whose greedy pick is ``token``."""
    import torch

    logits = torch.arange(8, dtype=torch.float32) / 10
    logits[token] = 5.0
    return logits


def test_the_verdict_fails_an_answer_that_runs_past_the_end_of_turn():
    """The rule itself, on llama.cpp answers as the child reports them: stopping is required."""
    import torch

    reference = [(_peaked(5).expand(3, 8), torch.tensor([5, 6, END]))]
    answer = {"tokens": [5, 6, END], "stopped": True, "completion_finish": "stop", "tokenized": [1, 2, 3],
              "first_logits": _peaked(5).tolist(), "departure": None}
    got = {"answers": [answer], "is_eog": {str(END): True}, "eos": END, "eot": END}
    assert llamacpp.judge(got, "f16", [[1, 2, 3]], reference, [END], END)["ok"]
    ran_on = {**got, "answers": [{**answer, "tokens": [5, 6, END, 7, 8], "stopped": False,
                                  "completion_finish": "length"}]}
    verdict = llamacpp.judge(ran_on, "f16", [[1, 2, 3]], reference, [END], END)
    assert not verdict["ok"] and verdict["ran_past_end_of_turn"] == [0]
    unmarked = {**got, "is_eog": {str(END): False}}
    assert not llamacpp.judge(unmarked, "q8_0", [[1, 2, 3]], reference, [END], END)["ok"]


def test_the_verdict_allows_a_near_tie_only_and_requires_the_same_tokenization():
    import torch

    reference = [(_peaked(5).expand(3, 8), torch.tensor([5, 6, END]))]
    answer = {"tokens": [5, 7, 9], "stopped": False, "completion_finish": None, "tokenized": [1, 2, 3],
              "first_logits": _peaked(5).tolist(), "departure": {"at": 1, "margin": 5e-4}}
    got = {"answers": [answer], "is_eog": {str(END): True}, "eos": END, "eot": END}
    tie = llamacpp.judge(got, "q8_0", [[1, 2, 3]], reference, [END], END)
    assert tie["ok"] and tie["greedy_agreement"] == 0.0 and tie["near_ties"] == [{"prompt": 0, "at_token": 1,
                                                                                   "margin": 5e-4}]
    far = {**got, "answers": [{**answer, "departure": {"at": 1, "margin": 0.5}}]}
    assert llamacpp.judge(far, "q8_0", [[1, 2, 3]], reference, [END], END)["different_answers"] == [0]
    assert not llamacpp.judge(far, "f16", [[1, 2, 3]], reference, [END], END)["ok"]
    assert llamacpp.judge(far, "Q4_K_M", [[1, 2, 3]], reference, [END], END)["ok"]  # 4-bit: stated only
    # A broken file: its logits far from the reference's, its first token not in their top 5. The
    # tie tolerance (twice the logit difference) is capped, and the top-5 check fails it anyway.
    broken = {**got, "answers": [{**answer, "first_logits": (_peaked(0) * 40).tolist(),
                                  "departure": {"at": 0, "margin": 0.4}}]}
    verdict = llamacpp.judge(broken, "q8_0", [[1, 2, 3]], reference, [END], END)
    assert not verdict["ok"] and verdict["near_tie_tolerance"] == llamacpp.NEAR_TIE_CAP
    assert verdict["first_token_in_top5"] == 0.0
    split_apart = {**got, "answers": [{**answer, "tokenized": [1, 2, 4]}]}
    verdict = llamacpp.judge(split_apart, "f16", [[1, 2, 3]], reference, [END], END)
    assert not verdict["ok"] and verdict["tokenization_agreement"] == 0.0
