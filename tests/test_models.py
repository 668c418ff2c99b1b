"""Model sources: parsing, the embedded GGUF, conversion cache, offline hub errors."""

from __future__ import annotations

import json
import time

import pytest

from studio import models
from studio.models import ModelSourceError, parse_source


def test_parse_source_kinds(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_source("default").kind == "default"
    assert parse_source("").kind == "default"
    assert parse_source(str(folder)).kind == "folder"
    assert parse_source(str(folder / "config.json")) == parse_source(str(folder))
    assert parse_source(str(gguf)).kind == "gguf"
    assert parse_source("HuggingFaceTB/SmolLM2-360M-Instruct").kind == "hub"


@pytest.mark.parametrize("text", ["not a model", "../../no-such-dir", "/no/such/file.gguf"])
def test_parse_source_rejects_nonsense(text):
    with pytest.raises(ModelSourceError):
        parse_source(text)


def test_hub_id_offline_names_the_model_and_the_fix():
    with pytest.raises(ModelSourceError) as err:
        models.resolve_source("someorg/not-cached-model")
    message = str(err.value)
    assert "someorg/not-cached-model" in message and "hf download" in message


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        models.resolve_source(models.ModelSource("folder", str(tmp_path)))


def test_embedded_config_reads_without_converting(studio_home):
    cfg = models.load_config("default")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (576, 30, 3)
    assert not any((studio_home / "projects" / "models").glob("*/model.safetensors"))


@pytest.mark.slow
def test_default_model_converts_once_caches_and_knows_paris(studio_home):
    import torch

    started = time.perf_counter()
    folder = models.resolve_source("default")
    first = time.perf_counter() - started
    assert (folder / "model.safetensors").is_file()
    assert folder.is_relative_to(studio_home / "projects" / "models")
    marker = json.loads((folder / models.CACHE_MARKER).read_text())
    assert marker["file"] == models.EMBEDDED_GGUF

    started = time.perf_counter()
    assert models.resolve_source("default") == folder  # cached: no second conversion
    assert time.perf_counter() - started < first

    tokenizer = models.load_tokenizer("default")
    model = models.load_model("default")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    """A conversion that fails half-way must not leave a folder that looks complete."""
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    dest = tmp_path / "out"
    with pytest.raises(Exception):
        models.convert_gguf(gguf, dest, progress=lambda f, m: None)
    assert not dest.exists()
    assert not list(tmp_path.glob(".out.partial-*"))
