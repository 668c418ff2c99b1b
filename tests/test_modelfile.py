"""The Ollama Modelfile of a GGUF export (studio/export/modelfile.py): read back the way Ollama
reads it, its TEMPLATE executed by a Go-template evaluator (tests/go_template.py) over the
messages Ollama would pass, compared with Hugging Face's own chat template; the refusal of a
template that cannot be expressed; the run's system prompt from a real imported dataset; the
export card's Ollama section."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from chat_templates import FAMILIES, MISTRAL_V3, NO_SYSTEM, QWEN2
from go_template import execute
from ollama_helpers import ollama_inputs, ollama_prompt, read_modelfile

from studio.export.card import model_card
from studio.export.modelfile import parse_modelfile, run_system_prompt, write_modelfile
from studio.runspec import RunSpec

# contents that a naive translation gets wrong: quotes, braces, newlines, non-ASCII
QUESTION = 'What does {{ .System }} print?\nAnswer "exactly", s\'il vous plaît: 2 + 2 = ?'
SYSTEM = "You are terse.\nReply in one line."


@pytest.fixture(scope="module")
def base_tokenizer():
    """The tiny test model's tokenizer (conftest's ``tiny_chat_model`` saves this one), loaded
    without building the model: the embedded SmolLM2 tokenizer and chat template."""
    from transformers import AutoTokenizer

    from studio.models import tokenizer_folder

    return AutoTokenizer.from_pretrained(str(tokenizer_folder("default")))


def family_tokenizer(base, template: str, bos: str | None, eos: str, extra: list[str], folder):
    """The tiny model's tokenizer given a family's special tokens and chat template."""
    tokenizer = copy.deepcopy(base)
    tokens = {"eos_token": eos, "additional_special_tokens": extra, **({"bos_token": bos} if bos else {})}
    tokenizer.add_special_tokens(tokens)
    tokenizer.chat_template = template
    tokenizer.name_or_path = str(folder)  # no generation_config.json there: only the family's tokens
    return tokenizer


def conversation(system: bool, turns: int) -> list[dict[str, str]]:
    chat = [{"role": "system", "content": SYSTEM}] if system else []
    for i in range(turns):
        chat.append({"role": "user", "content": f"{QUESTION} ({i})"})
        if i < turns - 1:
            chat.append({"role": "assistant", "content": f"Réponse {i}: \"{{{{ end }}}}\"\n- done"})
    return chat


def hugging_face(tokenizer, chat) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def written(folder, tokenizer, system_prompt=None, context_length=None) -> str:
    path = write_modelfile(folder, "model-f16.gguf", tokenizer, system_prompt, context_length)
    assert path == folder / "Modelfile"
    return path.read_text(encoding="utf-8")


def read_back(text: str) -> dict:
    """Our parser and Ollama's rules agree on every instruction."""
    ours, ollama = parse_modelfile(text), read_modelfile(text)
    assert ours["from"] == dict(ollama)["model"]
    assert ours["template"] == dict(ollama).get("template")
    assert ours["system"] == dict(ollama).get("system")
    assert ours["parameters"] == [(k, v) for k, v in ollama if k not in ("model", "template", "system")]
    return ours


@pytest.mark.parametrize("family", ["tiny model (SmolLM2)", *FAMILIES])
def test_template_renders_the_hugging_face_prompt(family, base_tokenizer, tmp_path):
    if family in FAMILIES:
        template, bos, eos, extra, stops = FAMILIES[family]
        tokenizer = family_tokenizer(base_tokenizer, template, bos, eos, extra, tmp_path)
    else:
        tokenizer, stops = base_tokenizer, ["<|im_end|>", "<|im_start|>"]
    parsed = read_back(written(tmp_path, tokenizer))
    assert parsed["from"] == "./model-f16.gguf"
    assert parsed["template"] is not None, parsed["comments"]
    assert [v for k, v in parsed["parameters"] if k == "stop"] == stops
    compared = 0
    for system in (False, True):
        for turns in (1, 3):
            chat = conversation(system, turns)
            try:
                expected = hugging_face(tokenizer, chat)
            except Exception:  # noqa: BLE001 - the family's template refuses a system role
                assert system and family == "mistral"
                continue
            assert ollama_prompt(written(tmp_path, tokenizer), chat) == expected, (family, system, turns)
            compared += 1
    assert compared == (2 if family == "mistral" else 4)
    assert any("no system role" in c for c in parsed["comments"]) == (family in NO_SYSTEM)


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (Debian: apt-get install golang-go)")
def test_go_itself_renders_the_same(base_tokenizer, tmp_path):
    """Go's own text/template (tests/assets/gotemplate) gives exactly what the test evaluator
    gives, and so Hugging Face's prompt, for every family's TEMPLATE; also for a conversation
    ending in an assistant turn (Ollama's continuation), where no generation prompt follows."""
    program = tmp_path / "gotemplate"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOTOOLCHAIN": "local"}  # never the network
    subprocess.run(["go", "build", "-o", str(program), "."], cwd=Path(__file__).parent / "assets" / "gotemplate",
                   env=env, check=True, capture_output=True, timeout=120)
    requests, expected = [], []
    for template, bos, eos, extra, _ in FAMILIES.values():
        tokenizer = family_tokenizer(base_tokenizer, template, bos, eos, extra, tmp_path)
        text = written(tmp_path, tokenizer, system_prompt=SYSTEM)
        for chat in (conversation(False, 1), conversation(False, 3), conversation(True, 2)):
            for messages in (chat, chat + [{"role": "assistant", "content": "Partial"}]):
                template, data = ollama_inputs(text, messages)
                requests.append({"Template": template, "System": data["System"], "Messages": data["Messages"]})
                expected.append(execute(template, data))
    done = subprocess.run([str(program)], input=json.dumps(requests), capture_output=True, text=True,
                          check=True, timeout=60)
    assert json.loads(done.stdout) == expected
    assert expected[0].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # llama3
    assert expected[1].endswith("Partial")  # a continuation: no end of turn, no new header


def test_default_system_prompt_kept_and_run_prompt_wins(base_tokenizer, tmp_path):
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert read_back(written(tmp_path, base_tokenizer))["system"] == default
    for family in ("qwen2", "llama3", "gemma3"):
        template, bos, eos, extra, _ = FAMILIES[family]
        tokenizer = family_tokenizer(base_tokenizer, template, bos, eos, extra, tmp_path)
        assert read_back(written(tmp_path, tokenizer))["system"] == (
            "You are a helpful assistant." if family == "qwen2" else None)
    # the run's system prompt replaces the default: a conversation without one gets it, as in training
    text = written(tmp_path, base_tokenizer, system_prompt=SYSTEM)
    assert read_back(text)["system"] == SYSTEM
    chat = conversation(False, 2)
    assert ollama_prompt(text, chat) == hugging_face(base_tokenizer, conversation(True, 2))
    assert ollama_prompt(text, conversation(True, 1)) == hugging_face(base_tokenizer, conversation(True, 1))


def test_inexpressible_template_written_without_template(base_tokenizer, tmp_path):
    tokenizer = family_tokenizer(base_tokenizer, MISTRAL_V3, "<s>", "</s>", [], tmp_path)
    text = written(tmp_path, tokenizer, system_prompt=SYSTEM)
    parsed = read_back(text)
    assert parsed["template"] is None
    assert any(c.startswith("No TEMPLATE") for c in parsed["comments"])
    assert any("write a TEMPLATE by hand" in c for c in parsed["comments"])
    assert parsed["system"] == SYSTEM and ("stop", "</s>") in parsed["parameters"]
    card = card_for("Mistral run", "gguf", text)
    assert "**no `TEMPLATE`**: this model's chat template cannot be written in Ollama's syntax" in card
    assert "system prompt placed in the last user turn" in card and "write a TEMPLATE by hand" in card
    # a template with no chat template at all: a plain text model
    tokenizer.chat_template = None
    assert any("no chat template" in c for c in read_back(written(tmp_path, tokenizer))["comments"])


def test_characters_ollama_would_drop_survive(base_tokenizer, tmp_path):
    """Ollama's parser drops non-printable characters: the TEMPLATE escapes them, a SYSTEM that
    holds one is left out with the reason."""
    header = "<|im_start|>' + message['role'] + '"
    template = QWEN2.replace(header + "\n'", header + "\u00a0\u200d\n'")  # a no-break space, a joiner
    tokenizer = family_tokenizer(base_tokenizer, template, None, "<|im_end|>", ["<|im_start|>"], tmp_path)
    chat = conversation(True, 2)
    assert "\u200d" in hugging_face(tokenizer, chat)
    text = written(tmp_path, tokenizer, system_prompt="Be\u200bterse.")
    assert ollama_prompt(text, chat) == hugging_face(tokenizer, chat)
    parsed = read_back(text)
    assert parsed["system"] is None
    assert any(c.startswith("No SYSTEM: the run's system prompt") for c in parsed["comments"])


def test_a_failing_template_cannot_write_instructions(base_tokenizer, tmp_path):
    tokenizer = family_tokenizer(base_tokenizer, "{{ raise_exception('broken\\nFROM /etc/passwd') }}",
                                 None, "<|im_end|>", [], tmp_path)
    parsed = read_back(written(tmp_path, tokenizer))
    assert parsed["from"] == "./model-f16.gguf" and parsed["template"] is None
    assert any("fails on a plain user/assistant conversation" in c for c in parsed["comments"])


def test_bos_the_tokenizer_adds_is_left_out(base_tokenizer, tmp_path):
    from tokenizers import processors

    template, bos, eos, extra, _ = FAMILIES["llama3"]
    tokenizer = family_tokenizer(base_tokenizer, template, bos, eos, extra, tmp_path)
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    assert tokenizer("hi")["input_ids"][0] == bos_id  # llama.cpp would add it too (GGUF add_bos)
    text = written(tmp_path, tokenizer)
    parsed = read_back(text)
    assert bos not in parsed["template"]
    assert any(f"{bos} is left out" in c for c in parsed["comments"])
    chat = conversation(True, 3)
    assert bos + ollama_prompt(text, chat) == hugging_face(tokenizer, chat)


def test_parameters_and_file_name(base_tokenizer, tmp_path):
    params = dict(read_back(written(tmp_path, base_tokenizer, context_length=8192))["parameters"])
    assert params["num_ctx"] == "4096" and params["temperature"] == "0.7" and params["top_p"] == "0.9"
    assert dict(read_back(written(tmp_path, base_tokenizer, context_length=512))["parameters"])["num_ctx"] == "512"
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": [2, 1]}))
    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.name_or_path = str(tmp_path)
    params = read_back(written(tmp_path, tokenizer))["parameters"]
    assert ("temperature", "0.6") in params and ("top_p", "0.95") in params
    assert [v for k, v in params if k == "stop"] == ["<|im_end|>", "<|im_start|>"]  # ids 2, 1
    for bad in ("../model.gguf", "model.bin", "a\nFROM /etc/passwd.gguf"):
        with pytest.raises(ValueError, match="not a .gguf file name"):
            write_modelfile(tmp_path, bad, base_tokenizer, None)


def test_parse_modelfile_reads_ollama_syntax():
    text = ('# a comment\nfrom ./m.gguf\n\nTEMPLATE """{{ .Prompt }}\n\n  indented"""\n'
            'system Be brief.\nPARAMETER stop "<|eot_id|>"\nPARAMETER   num_ctx 2048\n'
            'MESSAGE user Hello there\nLICENSE """MIT"""\n')
    parsed = parse_modelfile(text)
    assert parsed["from"] == "./m.gguf" and parsed["template"] == "{{ .Prompt }}\n\n  indented"
    assert parsed["system"] == "Be brief." and parsed["license"] == "MIT"
    assert parsed["parameters"] == [("stop", "<|eot_id|>"), ("num_ctx", "2048")]
    assert parsed["messages"] == [("user", "Hello there")] and parsed["comments"] == ["a comment"]
    assert dict(read_modelfile(text))["template"] == parsed["template"]
    with pytest.raises(ValueError, match="line 2: unknown instruction TEMPERATURE"):
        parse_modelfile("FROM ./m.gguf\nTEMPERATURE 0.5\n")
    with pytest.raises(ValueError, match="line 2: the triple-quoted SYSTEM is never closed"):
        parse_modelfile('FROM ./m.gguf\nSYSTEM """open\n')


def card_for(run_name: str, kind: str, modelfile: str | None) -> str:
    run = SimpleNamespace(name=run_name, recipe=None)
    return model_card(run=run, spec=RunSpec(sample_task="reverse"), dataset=None, kind=kind, dtype="f16",
                      metrics={}, steps=10, mergeable=True, peft_adapter=True, modelfile=modelfile)


def test_card_says_how_to_run_it_in_ollama(base_tokenizer, tmp_path):
    card = card_for("My run: v2/../x", "gguf", written(tmp_path, base_tokenizer, system_prompt=SYSTEM))
    assert "ollama create my-run-v2-x -f Modelfile\nollama run my-run-v2-x" in card
    assert "`TEMPLATE`: the model's chat template in Ollama's syntax" in card
    assert "`<|im_end|>`, `<|im_start|>`" in card and f"````text\n{SYSTEM}\n````" in card
    assert "`SYSTEM`: the run's system prompt (shared by every training example), below" in card
    assert "as one GGUF file" in card and "library_name: gguf" in card
    assert "ollama" not in card_for("My run", "merged", None)


@pytest.fixture
def db(studio_home):
    """A real history in this test's home; no run here is ever started, so nothing to stop."""
    from studio.db import Database

    database = Database()
    yield database
    database.close()


@pytest.fixture
def project(db):
    from studio.projects import create_project

    return create_project(db, "Modelfile")


def imported_run(db, project, tmp_path, systems: list[str | None]):
    from studio.data import import_dataset

    source = tmp_path / f"rows-{len(systems)}-{systems[-1]}.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}", "system": s or ""}) + "\n"
                              for i, s in enumerate(systems)), encoding="utf-8")
    dataset = import_dataset(db, project, source, eval_ratio=0.0).dataset
    return db.create_run(project.id, f"run {dataset.id}", "lora", {"dataset_id": dataset.id}, dataset_id=dataset.id)


def test_run_system_prompt_from_the_imported_dataset(db, project, tmp_path):
    assert run_system_prompt(db, imported_run(db, project, tmp_path, ["Be kind."] * 5)) == "Be kind."
    assert run_system_prompt(db, imported_run(db, project, tmp_path, ["Be kind."] * 4 + ["Be rude."])) is None
    assert run_system_prompt(db, imported_run(db, project, tmp_path, ["Be kind."] * 4 + [None])) is None
    sample = db.create_run(project.id, "sample", "lora", {"sample_task": "reverse"})
    assert run_system_prompt(db, sample) is None
