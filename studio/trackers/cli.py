"""``peft-studio runs export --tracker mlflow|tensorboard``: existing runs' metrics and configs
copied into a tracker. (Being built for issue 19.)"""

from __future__ import annotations

import argparse


def add_export_parser(runs_sub: argparse._SubParsersAction) -> None:
    runs_sub.add_parser("export", help="copy runs' metrics and configs into an experiment tracker")
