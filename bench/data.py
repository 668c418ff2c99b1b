"""Data pipeline benchmark: import + validate + tokenise a generated 1,000,000-row JSONL.

    python bench/data.py [--rows 1000000] [--num-proc 1]

Generates Alpaca-style rows (about 150 bytes each) in a temporary studio home, then times each
phase and prints the process's peak RSS (ru_maxrss). Goal: peak RSS under 2 GB, i.e. the file is
streamed and memory-mapped, never loaded whole.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def generate(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            year, month, day = 1950 + i % 80, 1 + i % 12, 1 + i % 28
            fh.write(json.dumps({"instruction": "Convert the date to ISO 8601 (YYYY-MM-DD).",
                                 "input": f"day {day} of month {month}, year {year} (#{i})",
                                 "output": f"{year}-{month:02d}-{day:02d}"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=1)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ["PEFT_STUDIO_HOME"] = str(home)
    from studio.data import import_dataset, load_dataset_split
    from studio.data.tokenize import tokenize_dataset
    from studio.db import Database
    from studio.models import load_tokenizer
    from studio.projects import create_project

    source = home / "big.jsonl"
    started = time.perf_counter()
    generate(source, args.rows)
    size_mb = source.stat().st_size / 1e6
    print(f"generated {args.rows:,} rows, {size_mb:,.0f} MB in {time.perf_counter() - started:.0f} s; "
          f"peak RSS so far {peak_rss_mb():,.0f} MB", flush=True)

    db = Database()
    project = create_project(db, "bench")
    started = time.perf_counter()
    result = import_dataset(db, project, source, eval_ratio=0.01)
    imported = time.perf_counter() - started
    print(f"import + validate + normalise + split + save: {imported:.0f} s "
          f"({args.rows / imported:,.0f} rows/s); train {result.dataset.num_train:,}, "
          f"eval {result.dataset.num_eval:,}; peak RSS so far {peak_rss_mb():,.0f} MB", flush=True)

    tokenizer = load_tokenizer("default")
    train = load_dataset_split(db, result.dataset.id, "train")
    started = time.perf_counter()
    report: dict = {}
    features = tokenize_dataset(train, tokenizer, max_length=256, num_proc=args.num_proc or None,
                                report=report)
    tokenised = time.perf_counter() - started
    print(f"tokenise (chat template, assistant-only labels): {tokenised:.0f} s "
          f"({len(features) / tokenised:,.0f} rows/s, {args.num_proc} process); {report}", flush=True)
    peak = peak_rss_mb()
    print(f"\nrows {args.rows:,} | file {size_mb:,.0f} MB | import {imported:.0f} s | tokenise "
          f"{tokenised:.0f} s | peak RSS {peak:,.0f} MB = {peak / 2048:.2f} of the 2 GB goal")


if __name__ == "__main__":
    sys.exit(main())
