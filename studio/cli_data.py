"""``peft-studio data``: import a dataset file (or a sample task) into a project and list a
project's datasets, as the Data tab does, with ``--json`` output.

    peft-studio data import qa.csv --map question=prompt --map answer=completion --eval-ratio 0.2
    peft-studio data sample dates --project demo
    peft-studio data list --json

The import is the Data tab's own call (``studio.data.import_dataset``) with the tab's defaults
(eval share 0.1, invalid rows dropped, rows longer than a run's default max length counted with
the project model's tokenizer and kept), so a file is refused here exactly when it is refused
there, with the same message: a missing file, a format that does not exist, a mapping naming a
column the file lacks or a field the format does not use, a bad eval share. A refusal is one
line on stderr and exit code 2; the import is atomic (``studio.data.store``), so nothing is
left half-created.

``--map COLUMN=FIELD`` maps one of the file's columns to a field of the format (the tab's column
drop-downs): ``instruction``/``input``/``output``/``system`` (alpaca), ``messages``/``system``
(messages), ``prompt``/``completion``/``system`` (prompt_completion), ``text`` (text), or the
generic ``user``/``assistant``. Without ``--format`` the layout is detected, as Inspect does.
"""

from __future__ import annotations

import argparse
from typing import Any

from studio.cli_projects import ProjectChoiceError, emit, fail, plain, resolve_project


def parse_mapping(items: list[str]) -> dict[str, str] | None:
    """``["question=prompt", ...]`` as the import's ``{field: column}``; ValueError names the bad
    item. The last ``=`` splits, so a column name may itself hold one (a field never does)."""
    mapping: dict[str, str] = {}
    for item in items:
        column, sep, field = item.rpartition("=")
        column, field = column.strip(), field.strip()
        if not sep or not column or not field:
            raise ValueError(f"--map expects COLUMN=FIELD (e.g. question=prompt), got {item!r}")
        if field in mapping:
            raise ValueError(f"--map: field {field!r} is mapped twice ({mapping[field]!r} and {column!r})")
        mapping[field] = column
    return mapping or None


# The import's keyword -> this command's flag, in the import's own messages.
FLAGS = {"eval_ratio": "--eval-ratio", "text_mode": "--text-mode", "on_invalid": "--on-invalid",
         "on_long": "--on-long", "max_tokens": "--max-tokens"}


def _flag_names(message: str) -> str:
    for keyword, flag in FLAGS.items():
        if message.startswith(keyword):
            return flag + message[len(keyword):]
    return message


def _lazy_counter(model_source: str):
    """The Data tab's token counter (the project model's real tokenizer), loaded on first use:
    every check that needs no tokenizer (the file, the format, the mapping) answers first."""
    tokenizer = None

    def count(texts: list[str]) -> list[int]:
        nonlocal tokenizer
        if tokenizer is None:
            from studio.models import load_tokenizer

            tokenizer = load_tokenizer(model_source)
        return [len(ids) for ids in tokenizer(texts)["input_ids"]]
    return count


def dataset_dict(row) -> dict[str, Any]:
    stats = row.stats or {}
    return {"id": row.id, "name": row.name, "format": row.format, "mapping": row.mapping,
            "rows": row.num_rows, "train": row.num_train, "eval": row.num_eval,
            "kind": stats.get("kind"), "invalid_rows": stats.get("invalid_rows"),
            "source": row.source_path, "folder": row.folder, "created_at": row.created_at.isoformat()}


def _report(command: str, args: argparse.Namespace, project, result) -> int:
    from studio.ui.labels import DATA

    row = result.dataset
    head = DATA["imported"].format(how=DATA["reused"] if result.reused else DATA["new"], name=row.name,
                                   train=row.num_train, eval=row.num_eval, format=row.format)
    text = "\n".join([plain(head), *([result.report.summary()] if result.report else [])])
    emit(args, {"project": project.name, "reused": result.reused, "dataset": dataset_dict(row),
                "validation": result.report.to_dict() if result.report else None}, text)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from studio.data import DataError, import_dataset
    from studio.db import Database
    from studio.models import ModelSourceError

    _quiet_progress()
    db = Database()
    try:
        project = resolve_project(db, args.project)
        mapping = parse_mapping(args.map)
        if args.max_tokens < 0:
            raise ValueError(f"--max-tokens must be 0 (no token check) or more, not {args.max_tokens}")
        counter = _lazy_counter(project.model_source) if args.max_tokens else None
        result = import_dataset(db, project, args.file, name=args.name, format=args.format, mapping=mapping,
                                text_mode=args.text_mode, on_invalid=args.on_invalid,
                                eval_ratio=args.eval_ratio, max_tokens=args.max_tokens or None,
                                token_counter=counter, on_long=args.on_long)
    except (DataError, ProjectChoiceError) as exc:
        return fail("data import", str(exc))
    except ModelSourceError as exc:
        return fail("data import", f"cannot count tokens with the project's model: {exc} "
                                   "(--max-tokens 0 skips the token check)")
    except ValueError as exc:  # the import's own argument checks, named as the flags they came from
        return fail("data import", _flag_names(str(exc)))
    return _report("data import", args, project, result)


def _quiet_progress() -> None:
    """No ``datasets`` progress bars on the terminal: the command's own report says what was
    saved (a script reading stderr expects errors there, not bars)."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def _cmd_sample(args: argparse.Namespace) -> int:
    from studio.data import import_sample_task
    from studio.db import Database
    from studio.samples import SAMPLE_TASKS

    if args.task not in SAMPLE_TASKS:
        return fail("data sample", f"no sample task {args.task!r}; choose one of {', '.join(SAMPLE_TASKS)}")
    _quiet_progress()
    db = Database()
    try:
        project = resolve_project(db, args.project)
    except ProjectChoiceError as exc:
        return fail("data sample", str(exc))
    return _report("data sample", args, project, import_sample_task(db, project, args.task))


def _cmd_list(args: argparse.Namespace) -> int:
    from studio.db import Database

    db = Database()
    try:
        project = resolve_project(db, args.project)
    except ProjectChoiceError as exc:
        return fail("data list", str(exc))
    rows = [dataset_dict(d) for d in db.list_datasets(project.id)]
    lines = [f"{r['id']:>4}  {r['name']}  ({r['format']}, {r['train']} train / {r['eval']} eval)" for r in rows]
    emit(args, {"project": project.name, "datasets": rows},
         "\n".join(lines) or f"project {project.name!r} has no datasets yet (peft-studio data import FILE)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from studio.runspec import RunSpec

    # No ``choices`` here: the import checks these values itself (``store._check_args``, one
    # place), and importing its modules would load ``datasets`` for every command's parser.

    data = sub.add_parser("data", help="import a dataset file or a sample task into a project; list its datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    project_help = "the project, by name or id (default: the only project there is)"

    imp = data_sub.add_parser("import", help="import a dataset file, folder or hub id, as the Data tab does")
    imp.add_argument("file", help="a .jsonl/.json/.csv/.tsv/.parquet/.txt file, a saved dataset folder "
                                  "or a hub dataset id")
    imp.add_argument("--format", default=None, help="alpaca, messages, prompt_completion or text "
                                                    "(default: detected from the file)")
    imp.add_argument("--map", action="append", default=[], metavar="COLUMN=FIELD",
                     help="use the file's COLUMN as the format's FIELD (repeat for each field)")
    imp.add_argument("--eval-ratio", type=float, default=0.1,
                     help="share of rows held out for evaluation, 0 to below 1 (default 0.1)")
    imp.add_argument("--project", default=None, help=project_help)
    imp.add_argument("--name", default=None, help="the dataset's name (default: the file's)")
    imp.add_argument("--text-mode", default="line",
                     help="a .txt file: one example per line, or per blank-line-separated block")
    imp.add_argument("--on-invalid", default="drop",
                     help="drop: leave invalid rows out (and report them); refuse: refuse the file")
    imp.add_argument("--max-tokens", type=int, default=RunSpec().max_length,
                     help="count rows longer than this many tokens with the project's tokenizer "
                          "(default: a run's default max length; 0 skips the check)")
    imp.add_argument("--on-long", default="keep", help="keep, truncate or drop those rows")
    imp.add_argument("--json", action="store_true", help="print one JSON object")
    imp.set_defaults(handler=_cmd_import)

    smp = data_sub.add_parser("sample", help="import a built-in sample task (the Data tab's buttons)")
    smp.add_argument("task", help="the sample task's name, e.g. dates")
    smp.add_argument("--project", default=None, help=project_help)
    smp.add_argument("--json", action="store_true", help="print one JSON object")
    smp.set_defaults(handler=_cmd_sample)

    ls = data_sub.add_parser("list", help="a project's imported datasets")
    ls.add_argument("--project", default=None, help=project_help)
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=_cmd_list)
