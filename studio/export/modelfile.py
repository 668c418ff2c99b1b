"""The Ollama ``Modelfile`` written beside every GGUF export, and reading one back.

The most repeated export complaint is a GGUF that "babbles" or never stops in Ollama because
the chat template or the stop token did not travel with it. The Modelfile carries both:

* ``FROM ./<file>.gguf`` (relative: the folder can be moved or shared);
* ``TEMPLATE``: the tokenizer's chat template translated by ``ollama_template`` (measured and
  re-rendered, never guessed); when it cannot be expressed, no TEMPLATE and comments saying why
  and what to do (Ollama then falls back to the template it recognises in the GGUF, if any);
* ``SYSTEM``: the run's system prompt (``run_system_prompt``), else the template's built-in
  default (SmolLM2, Qwen2), so a conversation without one renders as it did in training;
* ``PARAMETER stop`` for every end-of-turn / EOS string (tokenizer, generation_config, the
  special tokens the template writes after an assistant turn), and temperature, top_p and a
  ``num_ctx`` bounded by the model's context.

``parse_modelfile`` reads Ollama's syntax (instructions case-insensitive, ``#`` comments,
``\"\"\"...\"\"\"`` multi-line and ``"..."`` quoted values) for tests and the export card.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from studio.export.ollama_template import (Pieces, TemplateNotExpressible, go_template, measure,
                                           printable, strip_bos)

FILENAME = "Modelfile"
TEMPERATURE, TOP_P = 0.7, 0.9  # used when the model's generation_config recommends none
NUM_CTX_MAX = 4096  # Ollama's KV cache is sized by num_ctx: a laptop-sized default, never above the model's
TEMPLATE_DOCS = "https://github.com/ollama/ollama/blob/main/docs/template.md"

log = logging.getLogger(__name__)


def _quoted_ok(text: str) -> bool:
    """Whether Ollama's parser reads ``text`` back unchanged inside triple quotes: it ends the
    value at a triple quote and drops characters Go does not call printable."""
    return ('"""' not in text and not text.startswith('"') and not text.endswith('"')
            and all(printable(ch) or ch in "\t\r\n" for ch in text))


def _generation_config(tokenizer: Any) -> dict[str, Any]:
    """generation_config.json beside the tokenizer's files, when they came from a local folder."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not folder.is_absolute():  # a hub id, or nothing: never read relative to the working folder
        return {}
    try:
        return json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _render(tokenizer: Any):
    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


def _adds_bos(tokenizer: Any) -> str | None:
    """The BOS text when encoding adds it (llama.cpp then adds it too, from the GGUF's flag)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer.bos_token if ids[:1] == [bos_id] and plain[:1] != [bos_id] else None


def stop_strings(tokenizer: Any, pieces: Pieces | None, generation: dict[str, Any]) -> list[str]:
    """End-of-turn and EOS strings: the tokenizer's EOS, generation_config's eos_token_id(s), and
    the special tokens the template writes after an assistant turn (``<|im_end|>``, ``<|eot_id|>``)."""
    stops: list[str] = []
    if getattr(tokenizer, "eos_token", None):
        stops.append(tokenizer.eos_token)
    ids = generation.get("eos_token_id")
    for index in ids if isinstance(ids, list) else [ids] if ids is not None else []:
        token = tokenizer.convert_ids_to_tokens(int(index))
        if token:
            stops.append(token)
    if pieces is not None:
        after = pieces.gaps.get(("assistant", "user"), "")
        special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        special += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
        found = sorted({t for t in special if t in after}, key=after.find)
        stops += found
    unique = []
    for stop in stops:
        if stop not in unique and stop.strip() and '"' not in stop and "\n" not in stop:
            unique.append(stop)
    return unique


def _num_ctx(tokenizer: Any, context_length: int | None) -> int | None:
    limit = context_length
    if limit is None:
        length = getattr(tokenizer, "model_max_length", None)
        limit = length if isinstance(length, int) and 0 < length < 10**7 else None
    return min(int(limit), NUM_CTX_MAX) if limit else None


def modelfile_text(gguf_name: str, tokenizer: Any, system_prompt: str | None,
                   context_length: int | None = None) -> str:
    """The Modelfile for ``gguf_name`` (a file name in the same folder)."""
    if "/" in gguf_name or "\\" in gguf_name or "\n" in gguf_name or not gguf_name.endswith(".gguf"):
        raise ValueError(f"not a .gguf file name in the export folder: {gguf_name!r}")
    generation = _generation_config(tokenizer)
    comments = ["Ollama Modelfile written by PEFT Studio.",
                "Create and run the model:  ollama create NAME -f Modelfile  then  ollama run NAME"]
    pieces = None
    template = None
    if getattr(tokenizer, "chat_template", None):
        try:
            pieces = measure(_render(tokenizer))
            strip_bos(pieces, _adds_bos(tokenizer))
            template = go_template(pieces)
        except TemplateNotExpressible as exc:
            log.warning("no Ollama TEMPLATE: %s (%s)", exc, exc.detail[:2000])
            pieces = None
            comments += [f"No TEMPLATE: this model's chat template cannot be written in Ollama's syntax "
                         f"without changing the prompt: {exc}.",
                         "Ollama uses the template it recognises in the GGUF's metadata, if any; otherwise",
                         f"write a TEMPLATE by hand (see {TEMPLATE_DOCS}) before `ollama create`."]
    else:
        comments += ["No TEMPLATE: the tokenizer has no chat template (a plain text model)."]
    if pieces is not None:
        comments += [f"Note: {note}." for note in pieces.notes]
        if pieces.bos_removed:
            comments.append(f"The template's {pieces.bos_removed} is left out: llama.cpp adds it itself.")
    system = system_prompt if system_prompt and system_prompt.strip() else None
    origin = "the run's system prompt (shared by every training example)"
    if system and pieces is not None and not pieces.system:
        comments.append("No SYSTEM: the run had a system prompt but the chat template has no system role.")
        system = None
    if system is None and pieces is not None and pieces.default_system:
        system, origin = pieces.default_system, "the chat template's default system prompt"
    if system is not None and not _quoted_ok(system):
        comments.append(f"No SYSTEM: {origin} contains triple quotes, starts or ends with a quote, or "
                        "holds characters Ollama's parser drops (control or invisible ones), so a Modelfile "
                        "cannot carry it unchanged. Pass it as a system message instead.")
        system = None
    # one line each: a newline in a reason (a template's own error text) must not start an instruction
    lines = [f"# {' '.join(c.split())}" for c in comments] + ["", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    if system is not None:
        lines += [f"# SYSTEM is {origin}.", f'SYSTEM """{system}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_strings(tokenizer, pieces, generation)]
    temperature = generation.get("temperature") if generation.get("do_sample") else None
    top_p = generation.get("top_p") if generation.get("do_sample") else None
    lines.append(f"PARAMETER temperature {temperature if temperature is not None else TEMPERATURE}")
    lines.append(f"PARAMETER top_p {top_p if top_p is not None else TOP_P}")
    num_ctx = _num_ctx(tokenizer, context_length)
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer: Any, system_prompt: str | None,
                    context_length: int | None = None) -> Path:
    """Write ``folder/Modelfile`` for the GGUF file ``gguf_name`` in ``folder``; returns its path."""
    path = Path(folder) / FILENAME
    path.write_text(modelfile_text(gguf_name, tokenizer, system_prompt, context_length), encoding="utf-8")
    return path


_INSTRUCTION = re.compile(r"[ \t]*([A-Za-z]+)[ \t]+")
_VALUED = ("from", "template", "system", "adapter", "license")


def parse_modelfile(text: str) -> dict[str, Any]:
    """``{"from", "template", "system", "adapter", "license", "parameters": [(name, value)],
    "messages": [(role, text)], "comments": [...]}`` from a Modelfile's text (absent keys: None)."""
    out: dict[str, Any] = {key: None for key in _VALUED}
    out.update(parameters=[], messages=[], comments=[])
    pos, number = 0, 0
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        line, number = text[pos:end], number + 1
        stripped = line.strip()
        match = _INSTRUCTION.match(line)
        if not stripped or stripped.startswith("#"):
            if stripped:
                out["comments"].append(stripped[1:].strip())
            pos = end + 1
            continue
        if not match:
            raise ValueError(f"Modelfile line {number}: not an instruction: {stripped[:80]!r}")
        name, start = match.group(1).lower(), pos + match.end()
        if text.startswith('"""', start):  # a multi-line value, up to the next triple quote
            close = text.find('"""', start + 3)
            if close < 0:
                raise ValueError(f"Modelfile line {number}: the triple-quoted {name.upper()} is never closed")
            value = text[start + 3:close]
            number += value.count("\n")
            end = text.find("\n", close)
            end = len(text) if end < 0 else end
        else:
            value = text[start:end].strip()
        pos = end + 1
        if name == "parameter":
            key, _, raw = value.partition(" ")
            raw = raw.strip()
            out["parameters"].append((key, raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw))
        elif name == "message":
            role, _, said = value.partition(" ")
            out["messages"].append((role, said.strip()))
        elif name in _VALUED:
            out[name] = value
        else:
            raise ValueError(f"Modelfile line {number}: unknown instruction {name.upper()}")
    return out


def ollama_name(run_name: str) -> str:
    """A name ``ollama create`` accepts, from the run's name (lowercase letters, digits, dashes)."""
    from studio.config import slugify

    return slugify(run_name)


def run_system_prompt(db: Any, run: Any) -> str | None:
    """The run's system prompt: the system message every training example starts with, when
    they all share one (a dataset mapping a system column, or conversations carrying one);
    None when rows differ, have none, or the run has no imported dataset."""
    dataset_id = getattr(run, "dataset_id", None) or (getattr(run, "spec", None) or {}).get("dataset_id")
    if not dataset_id:
        return None
    import pyarrow.compute as pc

    from studio.data.store import load_dataset_split

    try:
        table = load_dataset_split(db, int(dataset_id), "train").data.table
    except (LookupError, OSError, ValueError) as exc:
        log.warning("run %s: its dataset %s could not be read for the system prompt: %s",
                    getattr(run, "id", "?"), dataset_id, exc)
        return None
    if "messages" not in table.column_names or table.num_rows == 0:
        return None
    messages = table.column("messages")
    if pc.min(pc.list_value_length(messages)).as_py() == 0:
        return None
    first = pc.list_element(messages, 0)
    if not pc.all(pc.equal(pc.struct_field(first, "role"), "system")).as_py():
        return None
    contents = pc.unique(pc.struct_field(first, "content"))
    return contents[0].as_py() if len(contents) == 1 else None
