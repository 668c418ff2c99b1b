"""The Compare tab: the base model and up to six adapters answering the same message side by side.

The widgets only; the models live in ``studio.compare.engine`` (one ``ChatEngine`` per app process, loaded
when the user asks, so the UI process imports torch only once this tab is used). Each browser
session keeps its own conversations in a ``gr.State``.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from studio.compare.sources import chat_memory_refusal, project_adapters
from studio.db import Database
from studio.ui import compare_view as view
from studio.ui import data_choice, labels_compare
from studio.ui.compare_view import BASE_LABEL, SLOTS

TXT = labels_compare.COMPARE
_engine: dict[str, Any] = {}  # "engine": the ChatEngine of this app process


def engine():
    return _engine.get("engine")


def _adapter_sources(db: Database, project_id: int | None):
    from studio.runs.launch import run_folder

    if project_id is None:
        return []
    return project_adapters(db, project_id, lambda run: run_folder(db, run))


def build(demo: gr.Blocks, db: Database, picker: gr.Dropdown, tab: gr.Tab | None = None) -> None:
    """Render the tab. ``tab``: the tab itself; opening it re-lists the adapters and eval sets
    (runs finish and datasets are imported in other tabs), keeping what is picked."""
    gr.Markdown(TXT["intro"])
    with gr.Row():
        source = gr.Textbox(label=TXT["model"], scale=3, elem_id="compare-model",
                            info=TXT["model_help"])
        load = gr.Button(TXT["load"], scale=1, elem_id="compare-load")
    status = gr.Markdown(TXT["no_model"], elem_id="compare-status")
    with gr.Row():
        picked = gr.Dropdown(label=TXT["adapters"], multiselect=True,
                             choices=[], scale=3, elem_id="compare-adapters")
        folder = gr.Textbox(label=TXT["folder"], scale=2, elem_id="compare-folder")
        attach = gr.Button(TXT["attach"], scale=1, elem_id="compare-attach")
    shown = gr.CheckboxGroup(label=TXT["columns"],
                             choices=[], elem_id="compare-columns")
    system = gr.Textbox(label=TXT["system"], elem_id="compare-system")
    with gr.Accordion(TXT["generation"], open=False):
        with gr.Row():
            mode = gr.Radio(["greedy", "sampling"], value="greedy", label=TXT["decoding"], elem_id="compare-mode")
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label=TXT["temperature"])
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label=TXT["top_p"])
            max_new = gr.Number(64, precision=0, minimum=1, maximum=4096, label=TXT["max_new"],
                                elem_id="compare-max-new")
            seed = gr.Number(0, precision=0, label=TXT["seed"])
        per_column = gr.Checkbox(False, label=TXT["per_column"])
        table = gr.Dataframe(headers=view.SETTING_COLUMNS, visible=False, interactive=True,
                             elem_id="compare-per-column")
    slots, stats = [], []
    for row_start in (0, 4):
        with gr.Row():
            for i in range(row_start, min(row_start + 4, SLOTS)):
                with gr.Column(visible=i == 0, min_width=240) as col:
                    chat = gr.Chatbot(label=BASE_LABEL if i == 0 else TXT["column"].format(i=i), height=320,
                                      elem_id=f"compare-chat-{i}")
                    stat = gr.Markdown(elem_id=f"compare-stats-{i}")
                slots.append((col, chat))
                stats.append(stat)
    with gr.Row():
        message = gr.Textbox(label=TXT["message"], placeholder=TXT["message_hint"],
                             scale=4, elem_id="compare-message")
        send = gr.Button(TXT["send"], variant="primary", scale=1, elem_id="compare-send")
        stop = gr.Button(TXT["stop"], variant="stop", scale=1, elem_id="compare-stop")
        clear = gr.Button(TXT["clear"], scale=1, elem_id="compare-clear")
    with gr.Accordion(TXT["eval"], open=False):
        with gr.Row():
            task = gr.Dropdown(data_choice.choices(db, None), value=data_choice.DEFAULT,
                               label=TXT["eval_set"], info=TXT["eval_set_help"], elem_id="compare-task")
            limit = gr.Number(20, precision=0, minimum=1, maximum=400, label=TXT["eval_rows"],
                              elem_id="compare-eval-rows")
            score = gr.Button(TXT["score"], elem_id="compare-eval")
        scores = gr.Dataframe(interactive=False, elem_id="compare-eval-table")
        answers = gr.Dataframe(interactive=False, label=TXT["row_answers"], wrap=True,
                               elem_id="compare-eval-answers")
    state = gr.State(view.empty_state())
    chats = [c for _, c in slots]
    columns = [c for c, _ in slots]

    def layout(st, visible):
        return [*view.slot_updates(st, visible, engine()), gr.update(choices=view.column_choices(st), value=visible)]

    def on_project(project_id):
        """Another project: its model, its adapters (none picked), its eval sets."""
        project = db.get_project(project_id) if project_id is not None else None
        if project is None:  # page load can run before the picker has its value: keep what is shown
            return gr.update(), gr.update(), gr.update()
        return project.model_source, *on_open(project_id, [], None)

    def on_open(project_id, picked_v, task_v):
        """The project's adapters and eval sets as they are now, keeping the picks still offered."""
        if project_id is None or db.get_project(project_id) is None:
            return gr.update(), gr.update()
        choices = [s.label for s in _adapter_sources(db, project_id)]
        sets = data_choice.choices(db, project_id)
        keep_set = data_choice.kept(task_v, sets, sets[0][1])
        return (gr.update(choices=choices, value=[p for p in picked_v or [] if p in choices]),
                gr.update(choices=sets, value=keep_set))

    def on_load(project_id, source_v, progress=gr.Progress()):
        from studio.models import IMPORT_LOCK

        with IMPORT_LOCK:  # transformers' lazy imports race with other tabs' handler threads
            from studio.compare.engine import ChatEngine

        source_v = (source_v or "default").strip()
        refusal = chat_memory_refusal(db, source_v)
        if refusal:
            return (f"**{refusal}**", view.empty_state(), *layout(view.empty_state(), [BASE_LABEL]))
        progress(0.1, desc=TXT["loading"].format(source=source_v))
        _engine.pop("engine", None)  # free the previous model before loading the next
        try:
            _engine["engine"] = ChatEngine.load(source_v)
        except Exception as exc:  # a bad source must not break the tab
            return (TXT["load_failed"].format(source=source_v, reason=exc), view.empty_state(),
                    *layout(view.empty_state(), [BASE_LABEL]))
        st = view.empty_state()
        return view.status_text(engine()), st, *layout(st, [BASE_LABEL])

    def on_attach(project_id, labels_v, folder_v, st, visible):
        if engine() is None:
            return f"**{TXT['load_first']}**", st, *layout(st, visible)
        sources = {s.label: s for s in _adapter_sources(db, project_id)}
        wanted = [(label, sources[label].folder, sources[label].method) for label in labels_v or [] if label in sources]
        if (folder_v or "").strip():
            wanted.append(view.disk_column(folder_v.strip(), st))
        problems = []
        for label, path, method in wanted:
            if label in st["columns"]:
                continue
            try:
                engine().add_adapter(label, path, method)
            except Exception as exc:  # shown beside the others; one bad folder must not stop the rest
                problems.append(f"{label}: {exc}")
                continue
            st = view.with_column(st, label)
            visible = [*visible, label]
        text = view.status_text(engine()) + "".join(TXT["not_attached"].format(problem=p) for p in problems)
        return text, st, *layout(st, visible)

    def on_send(message_v, system_v, visible, st, mode_v, temp_v, top_p_v, max_new_v, seed_v, per_col, table_v):
        if engine() is None or not (message_v or "").strip():
            yield (gr.update(), st, *view.chat_frames(st), *[gr.update()] * SLOTS)
            return
        try:
            shared = view.settings_from(mode_v, temp_v, top_p_v, max_new_v, seed_v)
            settings = view.per_column_settings(visible, shared, table_v if per_col else None)
        except ValueError as exc:
            yield (gr.update(), st, *view.chat_frames(st), gr.update(value=f"**{exc}**"), *[gr.update()] * (SLOTS - 1))
            return
        st, conversations = view.with_user_message(st, visible, message_v.strip())
        try:
            for partial, answers in engine().stream(conversations, settings, (system_v or "").strip() or None):
                frames = view.chat_frames(st, partial)
                if answers is None:
                    yield ("", st, *frames, *[gr.update()] * SLOTS)
                else:
                    st = view.with_answers(st, answers)
                    yield ("", st, *view.chat_frames(st), *view.stats_texts(st, answers))
        except Exception as exc:  # a failed generate is shown in the base slot, the UI stays up
            yield ("", st, *view.chat_frames(st), gr.update(value=TXT["generation_failed"].format(reason=exc)),
                   *[gr.update()] * (SLOTS - 1))

    def on_score(visible, st, task_v, limit_v, progress=gr.Progress()):
        if engine() is None:
            return view.note_table(TXT["load_first"]), pd.DataFrame()
        progress(0.05, desc=TXT["scoring"])
        return view.eval_scores(engine(), db, view.engine_columns(st, visible), task_v, int(limit_v or 20))

    def on_clear(st, visible):
        st = view.cleared(st)
        return (st, *view.chat_frames(st), *[""] * SLOTS)

    slot_outputs = [*columns, *chats, shown]
    picker.change(on_project, [picker], [source, picked, task], api_name=False)
    demo.load(on_project, [picker], [source, picked, task], api_name=False)
    if tab is not None:
        tab.select(on_open, [picker, picked, task], [picked, task], api_name=False)
    # Loading, attaching, answering and scoring use the one engine: they queue behind each other
    # (an Attach clicked while the model loads waits for it instead of finding no model).
    serial = dict(api_name=False, concurrency_id="compare-engine", concurrency_limit=1)
    load.click(on_load, [picker, source], [status, state, *slot_outputs], **serial)
    attach.click(on_attach, [picker, picked, folder, state, shown], [status, state, *slot_outputs], **serial)
    shown.input(lambda st, v: view.slot_updates(st, v, engine()), [state, shown], [*columns, *chats], api_name=False)
    per_column.change(lambda on, v, *s: gr.update(visible=on, value=view.settings_table(v, view.settings_from(*s))),
                      [per_column, shown, mode, temperature, top_p, max_new, seed], [table], api_name=False)
    inputs = [message, system, shown, state, mode, temperature, top_p, max_new, seed, per_column, table]
    send.click(on_send, inputs, [message, state, *chats, *stats], **serial)
    message.submit(on_send, inputs, [message, state, *chats, *stats], **serial)
    stop.click(lambda: engine() and engine().request_stop(), None, None, api_name=False)
    clear.click(on_clear, [state, shown], [state, *chats, *stats], api_name=False)
    score.click(on_score, [shown, state, task, limit], [scores, answers], **serial)
