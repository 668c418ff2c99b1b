"""The Compare tab's session state and what it draws from it: pure functions, no Gradio events.

State (one per browser session, a plain dict so ``gr.State`` can deep-copy it):
``columns`` — column labels in slot order (slot 0 is always the base model);
``histories`` — label → the column's conversation as chat messages;
``stats`` — label → the last answer's one-line figures.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from studio.compare.settings import ColumnAnswer, GenerationSettings
from studio.methods import get_method
from studio.ui import data_choice, labels_compare

SLOTS = 7  # the base + up to six adapters (studio.compare.engine.MAX_ADAPTERS)
TXT = labels_compare.COMPARE
BASE_LABEL = TXT["base_column"]
ENGINE_BASE = "__base__"  # studio.compare.engine.BASE, repeated here so this module needs no torch
SETTING_COLUMNS = ["column", "decoding", "temperature", "top_p", "max_new_tokens", "seed"]
ROWS_SHOWN = 20  # per-row answers shown under the exact-match table (the first rows)
CELL_CHARS = 160  # a long answer is cut in the table; the score used all of it


def empty_state() -> dict[str, Any]:
    return {"columns": [BASE_LABEL], "histories": {BASE_LABEL: []}, "stats": {}}


def to_engine(label: str) -> str:
    return ENGINE_BASE if label == BASE_LABEL else label


def to_label(column: str) -> str:
    return BASE_LABEL if column == ENGINE_BASE else column


def column_choices(st: dict[str, Any]) -> list[str]:
    return list(st["columns"])


def with_column(st: dict[str, Any], label: str) -> dict[str, Any]:
    st = copy.deepcopy(st)
    st["columns"].append(label)
    st["histories"][label] = []
    return st


def disk_column(folder: str, st: dict[str, Any]) -> tuple[str, Path, None]:
    """(label, folder, method=None: detected) for an adapter folder typed by the user."""
    path = Path(folder).expanduser()
    label, n = f"folder {path.name or path}", 2
    while label in st["columns"]:
        label, n = f"folder {path.name} ({n})", n + 1
    return label, path, None


def engine_columns(st: dict[str, Any], visible: list[str]) -> list[str]:
    return [to_engine(c) for c in st["columns"] if c in (visible or [])]


def slot_updates(st: dict[str, Any], visible: list[str], engine: Any) -> list[Any]:
    """Visibility of each slot's column, then each slot's chat label (name, method, path)."""
    columns, labels = [], []
    for i in range(SLOTS):
        label = st["columns"][i] if i < len(st["columns"]) else None
        columns.append(gr.update(visible=label is not None and label in (visible or [])))
        labels.append(gr.update(label=_slot_title(label, engine)) if label else gr.update())
    return columns + labels


def _slot_title(label: str, engine: Any) -> str:
    if engine is None:
        return label
    column = to_engine(label)
    path = engine.path(column)
    how = TXT["paths"][path]
    if column == ENGINE_BASE:
        return f"{label} · {how}"
    return f"{label} · {engine.adapters[column].method} · {how}"


def settings_from(mode: str, temperature: Any, top_p: Any, max_new: Any, seed: Any) -> GenerationSettings:
    try:
        return GenerationSettings(sample=mode == "sampling", temperature=float(temperature), top_p=float(top_p),
                                  max_new_tokens=int(max_new), seed=int(seed)).validated()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"generation settings: {exc}") from exc


def settings_table(visible: list[str], shared: GenerationSettings) -> pd.DataFrame:
    rows = [[label, "sampling" if shared.sample else "greedy", shared.temperature, shared.top_p,
             shared.max_new_tokens, shared.seed] for label in visible or []]
    return pd.DataFrame(rows, columns=SETTING_COLUMNS)


def per_column_settings(visible: list[str], shared: GenerationSettings,
                        table: pd.DataFrame | None) -> dict[str, GenerationSettings]:
    """Engine column → settings: the shared ones, or each row of the per-column table."""
    settings = {to_engine(label): shared for label in visible or []}
    if table is None or len(table) == 0:
        return settings
    for i, row in enumerate(table.to_dict("records"), start=1):
        label = str(row.get("column", ""))
        if label not in (visible or []):
            continue
        decoding = str(row.get("decoding", "greedy")).strip().lower()
        if decoding not in ("greedy", "sampling"):
            raise ValueError(f"settings row {i} ({label}): decoding must be greedy or sampling, got {decoding!r}")
        try:
            settings[to_engine(label)] = settings_from(decoding, row["temperature"], row["top_p"],
                                                       row["max_new_tokens"], row["seed"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"settings row {i} ({label}): {exc}") from exc
    return settings


def with_user_message(st: dict[str, Any], visible: list[str], message: str):
    """(state with the message added to each shown column, engine column → conversation)."""
    st = copy.deepcopy(st)
    conversations = {}
    for label in st["columns"]:
        if label in (visible or []):
            st["histories"][label].append({"role": "user", "content": message})
            conversations[to_engine(label)] = list(st["histories"][label])
    return st, conversations


def with_answers(st: dict[str, Any], answers: dict[str, ColumnAnswer]) -> dict[str, Any]:
    st = copy.deepcopy(st)
    for column, answer in answers.items():
        label = to_label(column)
        st["histories"][label].append({"role": "assistant", "content": answer.text})
        st["stats"][label] = stats_line(answer)
    return st


def stats_line(answer: ColumnAnswer) -> str:
    stopped = TXT["stopped"] if answer.stopped else ""
    return TXT["stats"].format(path=TXT["paths"][answer.path], tokens=answer.tokens, seconds=answer.seconds,
                               speed=answer.tokens_per_second, stopped=stopped)


def chat_frames(st: dict[str, Any], partial: dict[str, str] | None = None) -> list[list[dict[str, str]]]:
    frames = []
    for i in range(SLOTS):
        label = st["columns"][i] if i < len(st["columns"]) else None
        history = list(st["histories"].get(label, [])) if label else []
        if partial is not None and label and to_engine(label) in partial:
            history.append({"role": "assistant", "content": partial[to_engine(label)] or "…"})
        frames.append(history)
    return frames


def stats_texts(st: dict[str, Any], answers: dict[str, ColumnAnswer]) -> list[Any]:
    out = []
    for i in range(SLOTS):
        label = st["columns"][i] if i < len(st["columns"]) else None
        out.append(st["stats"].get(label, "") if label and to_engine(label) in answers else gr.update())
    return out


def cleared(st: dict[str, Any]) -> dict[str, Any]:
    return {"columns": list(st["columns"]), "histories": {c: [] for c in st["columns"]}, "stats": {}}


def status_text(engine: Any) -> str:
    params = sum(p.numel() for p in engine.base.parameters())
    device = next(engine.base.parameters()).device
    dtype = next(engine.base.parameters()).dtype
    lines = [TXT["loaded"].format(source=engine.source, millions=params / 1e6, device=device,
                                  dtype=str(dtype).replace("torch.", ""), mib=engine.resident_bytes() / 2**20)]
    batched = [n for n, a in engine.adapters.items() if a.path == "batched"]
    switched = [n for n, a in engine.adapters.items() if a.path == "switched"]
    if batched:
        lines.append(TXT["batched"].format(names=", ".join(batched)))
    if switched:
        lines.append(TXT["switched"].format(names=", ".join(switched)))
    quantized = [n for n, a in engine.adapters.items() if _trained_quantized(a.method)]
    if quantized:
        lines.append(TXT["quantized"].format(names=", ".join(quantized)))
    return "  \n".join(lines)


def _trained_quantized(method: str) -> bool:
    """Whether the adapter was trained over a quantised base (the method says, e.g. QLoRA)."""
    try:
        return get_method(method).quantized
    except ValueError:  # "base", or a folder whose method this version does not know
        return False


def note_table(text: str) -> pd.DataFrame:
    return pd.DataFrame({"note": [text]})


def eval_scores(engine: Any, db: Any, columns: list[str], eval_set: str | None,
                limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each column's exact match, the first rows' answers) on an eval set: ``sample:<task>``
    (the task's own scoring) or ``dataset:<id>``, an imported dataset's eval split (its final
    assistant turns, compared after whitespace normalisation; see ``studio.evaluate``). A set with
    nothing to score says why, with an empty answers table."""
    try:
        choice = data_choice.decode(eval_set)
    except ValueError:
        choice = data_choice.DataChoice()
    if choice.sample_task is not None:
        from studio.samples import load_rows, prompt_text
        from studio.samples.scoring import exact_match

        task = choice.sample_task
        rows = load_rows(task, "eval")[:limit]
        results = engine.score(columns, task, limit)
        return score_table(engine, results), answers_table(
            [prompt_text(r) for r in rows], [r["output"] for r in rows], results,
            lambda answer, expected: exact_match(task, answer, expected))
    if choice.dataset_id is None:
        return note_table(TXT["pick_eval"]), pd.DataFrame()
    value = choice.dataset_id
    from studio.data.store import load_dataset_split
    from studio.evaluate import eval_examples, normalise_answer

    if db.get_dataset(value) is None:
        return note_table(TXT["eval_gone"].format(id=value)), pd.DataFrame()
    examples = eval_examples(load_dataset_split(db, value, "eval"), engine.tokenizer, limit)
    if not examples.references:
        return note_table(TXT["nothing_to_score"].format(reason=examples.reason)), pd.DataFrame()
    results = engine.score_examples(columns, examples)
    prompts = [next((m["content"] for m in reversed(c) if m["role"] == "user"), "") for c in examples.conversations]
    return score_table(engine, results), answers_table(
        prompts, examples.references, results,
        lambda answer, expected: normalise_answer(answer) == normalise_answer(expected))


def answers_table(prompts: list[str], expected: list[str], results: dict[str, Any],
                  matches: Any) -> pd.DataFrame:
    """One row per eval row (the first ``ROWS_SHOWN``): the prompt, the expected answer, and each
    column's answer marked ✓ or ✗ by the same rule as the score, so a percentage can be read."""
    def cut(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"

    frame: dict[str, list[str]] = {TXT["row_prompt"]: [cut(p) for p in prompts[:ROWS_SHOWN]],
                                   TXT["row_expected"]: [cut(e) for e in expected[:ROWS_SHOWN]]}
    for column, score in results.items():
        answers = list(score.predictions)[:ROWS_SHOWN]
        frame[to_label(column)] = [("✓ " if matches(a, e) else "✗ ") + cut(a) for a, e in zip(answers, expected)]
    return pd.DataFrame(frame)


def score_table(engine: Any, results: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for column, score in results.items():
        method = "base" if column == ENGINE_BASE else engine.adapters[column].method
        rows.append({"column": to_label(column), "method": method, "exact match": f"{score.exact_match:.0%}",
                     "correct": score.correct, "examples": score.examples, "seconds": round(score.seconds, 1)})
    return pd.DataFrame(rows, columns=["column", "method", "exact match", "correct", "examples", "seconds"])
