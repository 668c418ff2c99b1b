"""The Data tab: import a dataset (or a sample task), check what was detected and fix the column
mapping, read the validation report, and preview rows exactly as training will see them, with
the tokens that count in the loss highlighted and token-length statistics."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from studio.db import Database
from studio.runspec import RunSpec
from studio.samples import SAMPLE_TASKS
from studio.ui import labels

TXT = labels.DATA

SLOT_COUNT = 4  # alpaca has the most slots: instruction, input, output, system
STATS_SAMPLE = 2000  # rows tokenised for the statistics; enough for stable percentiles
PREVIEW_ROWS = 3
# One max length everywhere a newcomer meets one: the preview and the import's token check use
# the run's own default, so "rows longer than N tokens" means the rows a default run would cut.
MAX_LENGTH = RunSpec().max_length


def _slots(fmt: str) -> list[str]:
    from studio.data.detect import SLOTS

    return list(SLOTS.get(fmt, {"user": (), "assistant": (), "system": ()}))


def _slot_updates(fmt: str, columns: list[str], mapping: dict[str, str]) -> list[Any]:
    slots = _slots(fmt)
    updates = []
    for i in range(SLOT_COUNT):
        if i < len(slots):
            slot = slots[i]
            updates.append(gr.update(visible=True, label=f"column for '{slot}'", choices=[""] + columns,
                                     value=mapping.get(slot, "")))
        else:
            updates.append(gr.update(visible=False, value=""))
    return updates


def _datasets(db: Database, project_id: int | None) -> list[tuple[str, int]]:
    if project_id is None:
        return []
    return [(f"{d.name} ({d.num_train} train / {d.num_eval} eval, {d.format})", d.id)
            for d in db.list_datasets(project_id)]


def _tokenizer(db: Database, project_id: int | None):
    from studio.models import load_tokenizer

    project = db.get_project(project_id) if project_id is not None else None
    return load_tokenizer(project.model_source if project else "default")


def _cleared(message: str, failed: str = "") -> list[Any]:
    # A failed Inspect clears the previous file's rows and column mapping: left on screen they
    # looked like the mapping Import would use.
    hidden = [gr.update(visible=False, choices=[""], value="") for _ in range(SLOT_COUNT)]
    return [message, pd.DataFrame(), gr.update(), *hidden, {"failed": failed} if failed else {}]


def inspect(source_file: str | None, source_path: str, text_mode: str):
    """Read the first rows and detect the layout: (message, raw rows, format, slots..., state).
    A typed path wins over the uploaded file: an upload clears the path (``build``), so a path
    that is there was typed after it (it used to be ignored while the upload stayed)."""
    from studio.data import DataError, inspect_source

    source = (source_path or "").strip() or source_file
    if not source:
        return _cleared(TXT["choose_first"])
    try:
        preview = inspect_source(source, text_mode=text_mode)
    except DataError as exc:
        return _cleared(TXT["cannot_read"].format(reason=exc), failed=str(exc))
    det = preview.detection
    lines = [TXT["detected"].format(format=det.format, confidence=det.confidence, evidence=det.evidence),
             TXT["file_kind"].format(kind=preview.file_kind, columns=", ".join(preview.columns))]
    if preview.note:
        lines.append(preview.note)
    for problem in preview.problems[:5]:
        lines.append(f"- {problem}")
    fmt = det.format if det.format != "unknown" else "prompt_completion"
    rows = pd.DataFrame([{k: str(v)[:200] for k, v in row.items()} for row in preview.rows[:10]])
    state = {"source": source, "columns": preview.columns}
    return ["  \n".join(lines), rows, gr.update(value=fmt),
            *_slot_updates(fmt, preview.columns, det.mapping), state]


def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown) -> None:
    state = gr.State({})
    gr.Markdown(TXT["train_at_once"], elem_id="data-intro")
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown(TXT["samples"])
            with gr.Row():
                samples = {name: gr.Button(task.title, size="sm", elem_id=f"sample-{name}")
                           for name, task in SAMPLE_TASKS.items()}
            # Next to the buttons that cause it: the import report further down was below the fold.
            sample_report = gr.Markdown(elem_id="data-sample-report")
            upload = gr.File(label=TXT["upload"], type="filepath",
                             file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"],
                             elem_id="data-upload")
            path = gr.Textbox(label=TXT["path"],
                              elem_id="data-path")
            text_mode = gr.Radio(["line", "block"], value="line", label=TXT["text_mode"],
                                 info=TXT["text_mode_help"])
            inspect_btn = gr.Button(TXT["inspect"], variant="secondary", elem_id="data-inspect")
            detected = gr.Markdown(elem_id="data-detected")
            raw = gr.Dataframe(label=TXT["raw"], interactive=False, elem_id="data-raw", wrap=True)
            fmt = gr.Dropdown(["alpaca", "messages", "prompt_completion", "text"], value="alpaca",
                              label=TXT["format"], info=TXT["format_help"], elem_id="data-format")
            slots = [gr.Dropdown(choices=[""], value="", visible=False, allow_custom_value=False,
                                 elem_id=f"data-slot-{i}") for i in range(SLOT_COUNT)]
            with gr.Accordion(TXT["options"], open=False):
                name = gr.Textbox(label=TXT["name"])
                eval_ratio = gr.Slider(0.0, 0.5, value=0.1, step=0.01, label=TXT["eval_ratio"])
                on_invalid = gr.Radio(["drop", "refuse"], value="drop", label=TXT["invalid"],
                                      info=TXT["invalid_help"])
                max_tokens = gr.Number(value=MAX_LENGTH, precision=0, label=TXT["max_tokens"],
                                       info=TXT["max_tokens_help"])
                on_long = gr.Radio(["keep", "truncate", "drop"], value="keep", label=TXT["long"])
            import_btn = gr.Button(TXT["import"], variant="primary", elem_id="data-import")
            report = gr.Markdown(elem_id="data-report")
        with gr.Column(scale=3):
            dataset = gr.Dropdown(label=TXT["dataset"], choices=[], elem_id="data-dataset")
            with gr.Row():
                max_len = gr.Number(value=MAX_LENGTH, precision=0, label=TXT["max_len"])
                loss_on = gr.Radio(["assistant", "all"], value="assistant", label=TXT["loss_on"])
            preview = gr.HTML(elem_id="data-preview")
            stats = gr.Markdown(elem_id="data-stats")
            hist = gr.BarPlot(x="tokens", y="rows", label=TXT["lengths"], elem_id="data-hist", height=220,
                              sort=None, y_axis_format="~g")  # counts: "2", never "2.000000"

    def refresh_list(project_id, select=None):
        choices = _datasets(db, project_id)
        value = select if select is not None else (choices[0][1] if choices else None)
        return gr.update(choices=choices, value=value)

    def on_import(project_id, st, fmt_value, *rest):
        from studio.data import DataError, import_dataset

        slot_values, (name_v, ratio, invalid, max_tok, long_rows) = rest[:SLOT_COUNT], rest[SLOT_COUNT:]
        if project_id is None:
            return TXT["no_project"], gr.update()
        if st.get("failed"):
            return TXT["inspect_failed"].format(reason=st["failed"]), gr.update()
        if not st.get("source"):
            return TXT["inspect_first"], gr.update()
        mapping = {slot: col for slot, col in zip(_slots(fmt_value), slot_values) if col}
        counter = None
        if max_tok:  # count with the project model's real tokenizer, not a character estimate
            tokenizer = _tokenizer(db, project_id)
            counter = lambda texts: [len(ids) for ids in tokenizer(texts)["input_ids"]]  # noqa: E731
        try:
            result = import_dataset(db, project_id, st["source"], name=name_v or None, format=fmt_value,
                                    mapping=mapping or None, on_invalid=invalid, eval_ratio=float(ratio),
                                    max_tokens=int(max_tok) if max_tok else None, on_long=long_rows,
                                    token_counter=counter)
        except (DataError, ValueError) as exc:
            return TXT["refused"].format(reason=exc), gr.update()
        return _report_text(result), refresh_list(project_id, result.dataset.id)

    def on_sample(project_id, task_name):
        from studio.data import import_sample_task

        if project_id is None:
            return TXT["no_project"], gr.update()
        result = import_sample_task(db, project_id, task_name)
        return _report_text(result), refresh_list(project_id, result.dataset.id)

    def on_preview(project_id, dataset_id, length, loss):
        if dataset_id is None:
            return "", "", histogram_update(empty_histogram())
        html, text, frame = render_dataset(db, project_id, dataset_id, int(length or MAX_LENGTH), loss)
        return html, text, histogram_update(frame)

    slot_and_state = [*slots, state]
    inspect_btn.click(inspect, [upload, path, text_mode], [detected, raw, fmt, *slot_and_state],
                      api_name=False)
    upload.upload(lambda file, mode: ["", *inspect(file, "", mode)], [upload, text_mode],
                  [path, detected, raw, fmt, *slot_and_state], api_name=False)
    fmt.input(lambda f, st: _slot_updates(f, st.get("columns", []), {}), [fmt, state], slots, api_name=False)
    import_btn.click(on_import, [picker, state, fmt, *slots, name, eval_ratio, on_invalid, max_tokens, on_long],
                     [report, dataset], api_name=False)
    for task_name, button in samples.items():
        button.click(lambda pid, t=task_name: on_sample(pid, t), [picker], [sample_report, dataset],
                     api_name=False)
    preview_inputs = [picker, dataset, max_len, loss_on]
    for trigger in (dataset.change, max_len.submit, loss_on.change):
        trigger(on_preview, preview_inputs, [preview, stats, hist], api_name=False)
    picker.change(refresh_list, [picker], [dataset], api_name=False)
    demo.load(refresh_list, [picker], [dataset], api_name=False)


def empty_histogram() -> pd.DataFrame:
    # Typed even when empty: the plot keeps the axis types of the first frame it receives.
    return pd.DataFrame({"tokens": pd.Series(dtype=str), "rows": pd.Series(dtype=float)})


def histogram_update(frame: pd.DataFrame) -> dict:
    """The histogram with its bars measured from 0 (the plot's own domain started at the smallest
    count, so bars misled and two equal rows drew no bar at all)."""
    top = float(frame["rows"].max()) if len(frame) else 0.0
    return gr.update(value=frame, y_lim=[0.0, max(1.0, top * 1.1)])


def _report_text(result) -> str:
    row = result.dataset
    head = TXT["imported"].format(how=TXT["reused"] if result.reused else TXT["new"], name=row.name,
                                  train=row.num_train, eval=row.num_eval, format=row.format)
    parts = [head]
    if result.report is not None:
        parts.append(result.report.summary())
    return "\n\n".join(parts)


def render_dataset(db: Database, project_id: int | None, dataset_id: int, max_length: int, loss_on: str):
    """(preview HTML of the first rows, statistics text, histogram frame) for a dataset."""
    from studio.data import load_dataset_split
    from studio.data.tokenize import length_stats, preview_html, render_preview, token_lengths

    tokenizer = _tokenizer(db, project_id)
    train = load_dataset_split(db, dataset_id, "train")
    blocks = []
    for row in train.select(range(min(PREVIEW_ROWS, len(train)))):
        segments = (render_preview(tokenizer, row["messages"], max_length=max_length, loss_on=loss_on)
                    if "messages" in row else [(row["text"], True)])
        blocks.append(preview_html(segments))
    legend = ('<p><mark class="loss">highlighted</mark> tokens count in the loss; the rest is '
              'context the model reads but is not trained to produce.</p>')
    html = legend + "<hr>".join(blocks)
    sample = train.select(range(min(STATS_SAMPLE, len(train))))
    lengths = token_lengths(tokenizer, list(sample))
    s = length_stats(lengths)
    over = sum(length > max_length for length in lengths)
    sampled = TXT["sampled"].format(n=len(lengths), total=len(train)) if len(lengths) < len(train) else ""
    text = TXT["length_stats"].format(sampled=sampled, over=over, max_length=max_length, **s)
    edges, counts = s["histogram"]["edges"], s["histogram"]["counts"]
    digits = 0 if len(edges) < 2 or edges[1] - edges[0] >= 2 else 1
    bins = [f"{edges[i]:.{digits}f}–{edges[i + 1]:.{digits}f}" for i in range(len(counts))]
    # Floats: Gradio's BarPlot reads an int column as categories. The bins keep their order
    # through ``sort`` below (by position), not alphabetically ("95–100" after "100–120").
    frame = pd.DataFrame({"tokens": bins, "rows": [float(c) for c in counts]})
    return html, text, frame
