"""``peft-studio projects``: list, create, rename and delete projects, as the UI's project picker
does (``studio.projects``: the row and the folder made and removed together), with ``--json``.

Also ``resolve_project``: the project a command's ``--project`` names (by name, or by id when no
project has that name); when it is left out and exactly one project exists, that one. The data
and runs commands use it, so every command chooses a project the same way and says the same
thing when it cannot.

A refusal is one line on stderr, ``peft-studio projects <cmd>: <reason>``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


class ProjectChoiceError(ValueError):
    """No project, or no single one, matches what the command was given."""


def resolve_project(db, name: str | None):
    """The project ``--project NAME`` means; with no name, the only project there is."""
    from studio.serve.catalog import CatalogError, find_project

    if name is not None:
        try:
            return find_project(db, name)
        except CatalogError as exc:
            raise ProjectChoiceError(f"--project: {exc}") from None
    found = db.list_projects()
    if len(found) == 1:
        return found[0]
    if not found:
        raise ProjectChoiceError("there is no project yet: create one with `peft-studio projects "
                                 "create NAME` (or in the UI)")
    names = ", ".join(repr(p.name) for p in sorted(found, key=lambda p: p.name.lower()))
    raise ProjectChoiceError(f"there are {len(found)} projects ({names}): say which one with --project NAME")


def fail(command: str, message: str) -> int:
    """The one-line refusal every data/runs/projects command prints; exit code 2."""
    print(f"peft-studio {command}: {message}", file=sys.stderr, flush=True)
    return 2


def emit(args: argparse.Namespace, value: Any, text: str) -> None:
    """One JSON object on stdout with ``--json``, else the text a person reads."""
    print(json.dumps(value, indent=2, default=str) if args.json else text, flush=True)


def plain(markdown: str) -> str:
    """A UI label without its Markdown emphasis, for a terminal."""
    return markdown.replace("**", "").replace("`", "")


def project_dict(project, counts: dict[str, int] | None = None) -> dict[str, Any]:
    from studio.projects import project_dir

    out = {"id": project.id, "name": project.name, "model": project.model_source,
           "folder": str(project_dir(project)), "created_at": project.created_at.isoformat(),
           "last_used": project.updated_at.isoformat()}
    if counts is not None:
        out.update({key: counts.get(key, 0) for key in ("datasets", "runs", "exports")})
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    from studio.db import Database
    from studio.db.summary import project_counts

    db = Database()
    counts = project_counts(db)
    rows = [project_dict(p, counts.get(p.id, {})) for p in db.list_projects()]
    lines = [f"{r['id']:>4}  {r['name']}  (model {r['model']}; {r['datasets']} datasets, "
             f"{r['runs']} runs, {r['exports']} exports)" for r in rows]
    emit(args, {"projects": rows}, "\n".join(lines) or "no projects yet (peft-studio projects create NAME)")
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from studio import projects
    from studio.db import Database
    from studio.models import ModelSourceError, parse_source

    try:  # the model is checked before anything is written: a typo makes no project
        source = parse_source(args.model).ref
    except ModelSourceError as exc:
        return fail("projects create", f"--model: {exc}")
    db = Database()
    try:
        project = projects.create_project(db, args.name, model_source=source)
    except ValueError as exc:  # an empty, too long or taken name (the picker's own messages)
        return fail("projects create", str(exc))
    emit(args, project_dict(project), f"created project {project.name!r} (id {project.id}, model "
                                      f"{project.model_source})")
    return 0


def _cmd_rename(args: argparse.Namespace) -> int:
    from studio.db import Database

    db = Database()
    try:
        project = db.rename_project(resolve_project(db, args.name).id, args.new_name)
    except ValueError as exc:
        return fail("projects rename", str(exc))
    emit(args, project_dict(project), f"renamed to {project.name!r}")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    from studio import projects
    from studio.db import Database
    from studio.runs import launch
    from studio.ui import labels

    db = Database()
    try:
        project = resolve_project(db, args.name)
    except ProjectChoiceError as exc:
        return fail("projects delete", str(exc))
    if not args.yes:  # the picker's confirmation step, as a flag a script must spell out
        return fail("projects delete", plain(labels.delete_warning(project.name)) + " Pass --yes to delete it.")
    launch.reconcile(db)  # a worker that died is not "running" any more
    busy = [r.id for r in db.list_runs(project.id) if r.in_flight]
    if busy:  # its folder holds their checkpoints: removing it under a worker loses the run
        return fail("projects delete", f"run {', '.join(f'#{i}' for i in busy)} of {project.name!r} is "
                                       f"training or queued; stop it first (peft-studio runs stop ID)")
    projects.delete_project(db, project.id)
    emit(args, {"deleted": project_dict(project)}, f"deleted project {project.name!r} and its folder")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("projects", help="list, create, rename and delete projects")
    projects_sub = cmd.add_subparsers(dest="projects_command", required=True)

    ls = projects_sub.add_parser("list", help="every project with its model and counts")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=_cmd_list)

    mk = projects_sub.add_parser("create", help="a new project (its history row and folder)")
    mk.add_argument("name")
    mk.add_argument("--model", default="default",
                    help="the project's model: 'default' (the embedded SmolLM2-135M-Instruct), a "
                         "model folder, a .gguf file or a hub id")
    mk.add_argument("--json", action="store_true", help="print one JSON object")
    mk.set_defaults(handler=_cmd_create)

    mv = projects_sub.add_parser("rename", help="give a project a new name (its folder keeps its name)")
    mv.add_argument("name", help="the project, by name or id")
    mv.add_argument("new_name")
    mv.add_argument("--json", action="store_true", help="print one JSON object")
    mv.set_defaults(handler=_cmd_rename)

    rm = projects_sub.add_parser("delete", help="delete a project: its datasets, runs, checkpoints and "
                                                "exports, from disk and from the history")
    rm.add_argument("name", help="the project, by name or id")
    rm.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    rm.add_argument("--json", action="store_true", help="print one JSON object")
    rm.set_defaults(handler=_cmd_delete)
