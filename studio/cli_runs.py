"""``peft-studio runs``: list, show, stop and resume a project's runs, as the History and Train
tabs do, with ``--json`` output; ``runs export`` copies runs into an experiment tracker
(``studio.trackers.cli``).

(Being built for issue 19.)
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="list, show, stop, resume runs; copy them into a tracker")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    from studio.trackers.cli import add_export_parser

    add_export_parser(runs_sub)  # runs export --tracker ...
