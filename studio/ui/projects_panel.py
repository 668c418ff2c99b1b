"""The project picker: choose, create, rename and delete (with confirmation) projects."""

from __future__ import annotations

import gradio as gr

from studio import projects
from studio.db import Database
from studio.ui import labels


def _choices(db: Database) -> list[tuple[str, int]]:
    return [(p.name, p.id) for p in db.list_projects()]


def _ok(message: str) -> str:
    return labels.PROJECT_MSG["done"].format(what=message)


def _error(message: str) -> str:
    return labels.PROJECT_MSG["failed"].format(reason=message)


def build(db: Database) -> tuple[gr.Dropdown, callable]:
    """Render the picker; returns its dropdown (value: current project id) and its page-load handler."""
    with gr.Row(equal_height=True):
        picker = gr.Dropdown(
            choices=_choices(db), label=labels.PROJECT_LABEL, elem_id="project-picker", scale=3,
            interactive=True,
        )
        status = gr.Markdown(elem_id="project-status")
    with gr.Accordion(labels.MANAGE, open=False, elem_id="project-manage"):
        with gr.Row():
            new_name = gr.Textbox(label=labels.NEW_PROJECT, elem_id="project-new-name", scale=3)
            create = gr.Button(labels.CREATE, elem_id="project-create", scale=1)
        with gr.Row():
            rename_to = gr.Textbox(label=labels.RENAME_TO, elem_id="project-rename-to", scale=3)
            rename = gr.Button(labels.RENAME, elem_id="project-rename", scale=1)
        delete = gr.Button(labels.DELETE, variant="stop", elem_id="project-delete")
        with gr.Group(visible=False, elem_id="project-delete-confirm") as confirm_box:
            warning = gr.Markdown()
            with gr.Row():
                confirm = gr.Button(labels.DELETE_CONFIRM, variant="stop", elem_id="project-delete-yes")
                cancel = gr.Button(labels.CANCEL, elem_id="project-delete-no")

    def on_load():
        current = db.list_projects()
        return gr.update(choices=_choices(db), value=current[0].id if current else None)

    def on_create(name: str):
        try:
            project = projects.create_project(db, name)
        except (ValueError, OSError) as exc:
            return gr.update(), _error(str(exc)), gr.update()
        return gr.update(choices=_choices(db), value=project.id), _ok(labels.PROJECT_MSG["created"].format(name=project.name)), ""

    def on_rename(project_id: int | None, name: str):
        if project_id is None:
            return gr.update(), _error(labels.PROJECT_MSG["pick_rename"]), gr.update()
        try:
            project = db.rename_project(project_id, name)
        except ValueError as exc:
            return gr.update(), _error(str(exc)), gr.update()
        return gr.update(choices=_choices(db), value=project.id), _ok(labels.PROJECT_MSG["renamed"].format(name=project.name)), ""

    def on_delete_ask(project_id: int | None):
        project = db.get_project(project_id) if project_id is not None else None
        if project is None:
            return gr.update(visible=False), "", _error(labels.PROJECT_MSG["pick_delete"])
        return gr.update(visible=True), labels.delete_warning(project.name), ""

    def on_delete_confirm(project_id: int | None):
        project = db.get_project(project_id) if project_id is not None else None
        if project is None:
            return gr.update(), gr.update(visible=False), _error(labels.PROJECT_MSG["gone"])
        projects.delete_project(db, project.id)
        remaining = db.list_projects()
        return (
            gr.update(choices=_choices(db), value=remaining[0].id if remaining else None),
            gr.update(visible=False),
            _ok(labels.PROJECT_MSG["deleted"].format(name=project.name)),
        )

    create.click(on_create, [new_name], [picker, status, new_name], api_name="create_project")
    new_name.submit(on_create, [new_name], [picker, status, new_name], api_name=False)
    rename.click(on_rename, [picker, rename_to], [picker, status, rename_to], api_name="rename_project")
    delete.click(on_delete_ask, [picker], [confirm_box, warning, status], api_name=False)
    confirm.click(on_delete_confirm, [picker], [picker, confirm_box, status], api_name="delete_project")
    cancel.click(lambda: gr.update(visible=False), None, [confirm_box], api_name=False)
    picker.change(lambda pid: db.touch_project(pid) if pid is not None else None, [picker], None,
                  api_name=False)
    return picker, on_load
