"""``peft-studio compare``: one prompt answered by the base and chosen adapters side by side, as
the Compare tab does, with ``--json`` output. (Being built for issue 19.)"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("compare", help="answer a prompt with the base model and adapters side by side")
