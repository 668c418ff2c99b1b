"""``peft-studio runs export --tracker mlflow|tensorboard (RUN_ID ... | --project P | --all)
[--dest DIR] [--json]``: existing runs' metrics and configs copied from the history into a
tracker (``studio.trackers.export``). A refusal (unknown tracker, run or project, the package
missing, a folder it will not replace) is one line on stderr and exit code 2, before anything is
written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.trackers.choice import TRACKERS, VIEW_NOTES, TrackerError, known


def add_export_parser(runs_sub: argparse._SubParsersAction) -> None:
    exp = runs_sub.add_parser(
        "export", help="copy runs' metrics and configs into an experiment tracker",
        description="Copy runs' metrics (every row with its step) and their spec from the studio's "
                    "history into TensorBoard or MLflow. The history stays the source of truth: a second "
                    "export of a run replaces its copy.")
    # Checked by us, not by choices=: the error then names the accepted trackers in our words.
    exp.add_argument("--tracker", required=True, metavar="|".join(TRACKERS), help="where to copy the runs")
    exp.add_argument("run_ids", nargs="*", type=int, metavar="RUN_ID", help="the runs to copy")
    exp.add_argument("--project", help="every run of this project")
    exp.add_argument("--all", action="store_true", dest="every", help="every run of every project")
    exp.add_argument("--dest", type=Path, help="MLflow: the store folder (mlflow.db in it); TensorBoard: a log "
                     "folder (DIR/<project>/<run>). Default: the project's own store / each run's folder")
    exp.add_argument("--json", action="store_true", help="print one JSON object")
    exp.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from studio.db import Database
    from studio.trackers import export

    try:
        tracker = known(args.tracker)
        db = Database()
        runs = export.select(db, args.run_ids, args.project, args.every)
        results = export.export(db, tracker, runs, args.dest)
    except TrackerError as exc:
        print(f"peft-studio runs export: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.json:
        print(json.dumps({"tracker": tracker, "runs": results}, indent=2))
        return 0
    if not results:
        print("no runs to export")
    for r in results:
        if r["action"] == "skipped":
            print(f"run {r['run_id']} ({r['name']}): skipped, {r['reason']}")
        else:
            print(f"run {r['run_id']} ({r['name']}): {r['action']} in {r['tracker']}, "
                  f"{r['metrics']} metric rows: {r['where']}")
    views = dict.fromkeys(r["view"] for r in results if "view" in r)
    for view in views:
        print(f"view: {view}")
    if views and VIEW_NOTES.get(tracker):
        print(f"({VIEW_NOTES[tracker]})")
    return 0
