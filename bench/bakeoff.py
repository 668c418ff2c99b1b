"""The method bake-off of docs/bakeoff.md: nine methods, one sample task, one budget.

    python bench/bakeoff.py [--home DIR] [--task dates] [--steps 50] [--batch-size 4]
                            [--max-length 128] [--eval-rows 50] [--methods lora,dora,...]

Runs ``peft-studio bakeoff`` (the same queue and workers as the UI) in its own studio home, so
the figures come from a history nobody else writes to, and the embedded model is converted
before the clock starts. Prints the machine, the budget, each run as it ends, the table and the
wall time; writes bakeoff.csv and bakeoff.md into the home folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default="/tmp/peft-studio-bakeoff")
    parser.add_argument("--task", default="dates")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=50)
    parser.add_argument("--methods", default=None)
    args = parser.parse_args()

    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PEFT_STUDIO_HOME"] = str(home)  # before any studio import reads it

    import psutil
    import torch

    from studio import cli
    from studio.models import resolve_source

    started = time.perf_counter()
    resolve_source("default")
    print(f"embedded model ready in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} logical CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}",
          flush=True)
    argv = ["bakeoff", "--task", args.task, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--eval-rows", str(args.eval_rows),
            "--project", f"Bake-off {time.strftime('%Y-%m-%d %H:%M')}",
            "--csv", str(home / "bakeoff.csv"), "--markdown", str(home / "bakeoff.md")]
    if args.methods:
        argv += ["--methods", args.methods]
    started = time.perf_counter()
    code = cli.main(argv)
    print(f"wall time {time.perf_counter() - started:.0f} s; load average now "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
