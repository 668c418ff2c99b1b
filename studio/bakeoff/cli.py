"""``peft-studio bakeoff``: queue a bake-off from the command line, follow it, write its table.

The runs train in worker processes exactly as from the UI, and the queue advances by itself;
``--no-wait`` returns at once (the bake-off completes anyway), otherwise the command polls,
prints each run as it ends and writes the table (``--csv``, ``--markdown``) at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from studio.bakeoff.core import DEFAULT_METHODS, Budget

    b = Budget()
    p = sub.add_parser("bakeoff", help="train several methods on the same data and budget; one table")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--task", help="a sample task: dates, json_fields, sentiment")
    data.add_argument("--dataset-id", type=int, help="a dataset of the project (its id)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated method names (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--project", default="Bake-offs", help="project to record it in (created if new)")
    p.add_argument("--model", default=None, help="model source for a new project (default: the embedded one)")
    p.add_argument("--steps", type=int, default=b.max_steps)
    p.add_argument("--batch-size", type=int, default=b.batch_size)
    p.add_argument("--max-length", type=int, default=b.max_length)
    p.add_argument("--eval-rows", type=int, default=b.eval_rows, help="eval rows scored by exact match")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="one rate for all methods (default: each method's usual rate)")
    p.add_argument("--name", default=None)
    p.add_argument("--no-wait", action="store_true", help="queue it and return")
    p.add_argument("--csv", default=None, help="write the table as CSV here when done")
    p.add_argument("--markdown", default=None, help="write the table as Markdown here when done")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from studio import config, projects
    from studio.bakeoff import core, table
    from studio.db import Database, RunStatus
    from studio.runs import launch

    db = Database()
    try:  # get-or-create in one transaction: two bake-offs naming a new project both get it
        project = projects.get_or_create_project(
            db, args.project, **({"model_source": args.model} if args.model else {}))
    except ValueError as exc:  # an empty or too long name
        print(f"peft-studio bakeoff: --project: {exc}", file=sys.stderr)
        return 2
    budget = core.Budget(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         eval_rows=args.eval_rows, learning_rate=args.learning_rate)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        row = core.start_bakeoff(db, project.id, methods, budget, sample_task=args.task,
                                 dataset_id=args.dataset_id, name=args.name)
    except (ValueError, LookupError) as exc:
        print(f"peft-studio bakeoff: {exc}", file=sys.stderr)
        return 2
    print(f"bake-off {row.id} queued in project '{project.name}': runs {row.run_ids} "
          f"({', '.join(row.methods)}); model {row.model}; home {config.projects_dir()}", flush=True)
    if args.no_wait:
        return 0
    started, reported = time.monotonic(), set()
    while True:
        launch.dispatch(db)  # after a crash nobody else would advance the queue
        rows = table.refresh(db, row.id)
        for r in rows:
            done = r["status"] not in (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
            if done and r["run_id"] not in reported:
                reported.add(r["run_id"])
                print(f"[{time.monotonic() - started:7.0f} s] {r['method']}: {r['status']}; "
                      f"exact match {r['exact_match']}, eval loss {r['eval_loss']}, "
                      f"train {r['train_s']} s", flush=True)
        if core.is_finished(db, db.get_bakeoff(row.id)):
            break
        time.sleep(2.0)
    text = table.to_markdown(rows)
    print(f"\nbake-off {row.id} finished in {time.monotonic() - started:.0f} s\n\n{text}", flush=True)
    if args.csv:
        Path(args.csv).write_text(table.to_csv(rows), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0 if all(r["status"] == RunStatus.COMPLETED.value for r in rows) else 1
