"""``peft-studio data``: import a dataset file into a project and list a project's datasets, as
the Data tab does (same validation, same errors), with ``--json`` output.

(Being built for issue 19: ``import`` and ``list``.)
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="import a dataset into a project; list a project's datasets")
    data.add_subparsers(dest="data_command", required=True)
