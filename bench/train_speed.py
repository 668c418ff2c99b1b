"""Training speed: the studio's worker against a plain Trainer + PEFT LoRA script, interleaved.

    python bench/train_speed.py [--method lora|dora|qlora|ia3|prompt|...] [--rounds 2]
                                [--steps 30] [--threads N] [--precision auto] [--packing default]
                                [--model default] [--out FILE.md] [--smoke]

Both sides train on the same data with the same settings (issue 13): the dates sample task,
LoRA r=16 α=32 dropout 0 on all seven projections, batch 8, max length 128, lr 2e-4 linear
(the studio's default warm-up ratio on both), seed 42. The reference is ``bench/plain_lora.py``
(fp32, pad to the longest row); the studio side is ``peft-studio train runspec.json``, i.e. the
CLI, its worker process and whatever the studio chooses by default (precision ``auto``, its
default packing, its loss). ``--method`` switches only the studio side; the reference stays
LoRA, and the table says so.

Every training runs in a process of its own, in a temporary ``PEFT_STUDIO_HOME`` of its own
(the embedded model is converted once into ``--cache`` and hard-linked into each home), in the
order reference, studio, studio, reference, ... (ABBA: a machine that speeds up or slows down
during the benchmark is charged to both sides alike). With ``--precision auto`` the studio's CPU
precision probe runs once before the rounds and every studio home gets its decision, as a
user's runs share one (``probe_precision``).

The figures, with one definition for both sides:
- tokens/s: ``attention_mask == 1`` tokens of the training steps over the time spent inside
  training steps (evaluation, saving and start-up excluded). The studio's are its recorded
  ``train_tokens_per_s`` and ``train_step_seconds`` (``StudioTrainer``, read from the run's
  SQLite history). Packed batches have no attention mask: the studio then counts every token of
  the batch, the little padding that ends each packed row included.
- peak RSS: the training process's VmHWM right after training (the studio's recorded
  ``peak_rss_bytes``; on a GPU, ``peak_cuda_allocated_bytes`` instead, labelled so).
- loss: the training loss logged at the last step, and the loss on the 50 eval rows.
- exact match: ``studio.evaluate.score_task`` on the task's eval rows (the same scorer).
- tokens: equal totals on both sides mean both trained on the same rows in the same order.

``--smoke`` is a quick end-to-end check (2 steps, 4 exact-match rows), not a benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().with_name("plain_lora.py")
# The reference's LoRA; the studio gets the same values for every setting its method has.
LORA_SETTINGS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_preset": "all-linear"}
MIB = 2**20
FACTS_NAME = "system-facts.json"  # studio.sysinfo's measured facts, beside the history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora",
                        help="the studio side's method (the reference stays LoRA)")
    parser.add_argument("--model", default="default",
                        help="model source (default: the embedded SmolLM2-135M)")
    parser.add_argument("--task", default="dates")
    parser.add_argument("--rounds", type=int, default=2, help="trainings per side, interleaved ABBA")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 30; 2 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for both sides (0: torch's default)")
    parser.add_argument("--precision", default="auto", help="the studio's precision (auto: its own choice)")
    parser.add_argument("--packing", choices=("default", "on", "off"), default="default",
                        help="the studio's packing (default: the RunSpec default)")
    parser.add_argument("--exact-match-rows", type=int, default=None,
                        help="eval rows scored (default 50; 4 with --smoke)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "peft-studio-bench-cache"),
                        help="studio home holding the converted embedded model (kept between runs)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per training process")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes (for debugging)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 4 exact-match rows: a quick check")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 30)
    if args.exact_match_rows is None:
        args.exact_match_rows = 4 if args.smoke else 50
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    return args


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def child_env(home: Path, args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PEFT_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # read by torch at start, in both processes
    return env


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Path]]:
    """Convert the model once (in ``--cache``) and write the reference's features: the train and
    eval splits of the sample task imported and tokenised exactly as the worker does
    (``prepare.build_data``: ``tokenize_dataset``, assistant-only labels)."""
    os.environ["PEFT_STUDIO_HOME"] = str(Path(args.cache).resolve())  # before studio reads it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from studio import models

    started = time.perf_counter()
    folder = models.resolve_source(args.model)
    print(f"model {args.model}: {folder} (ready in {time.perf_counter() - started:.0f} s)", flush=True)
    os.environ["PEFT_STUDIO_HOME"] = str(work / "prep-home")
    from studio.data import import_sample_task, load_dataset_split
    from studio.data.tokenize import tokenize_dataset
    from studio.db import Database
    from studio.projects import create_project

    db = Database()
    dataset = import_sample_task(db, create_project(db, "features"), args.task).dataset
    tokenizer = models.load_tokenizer(str(folder))
    paths = {}
    for split in ("train", "eval"):
        features = tokenize_dataset(load_dataset_split(db, dataset.id, split), tokenizer,
                                    max_length=args.max_length, loss_on="assistant")
        features = features.remove_columns([c for c in features.column_names
                                             if c not in ("input_ids", "labels", "attention_mask")])
        paths[split] = work / f"features-{split}"
        features.save_to_disk(str(paths[split]))
    db.close()
    print(probe_precision(args, folder), flush=True)
    return folder, paths


def probe_precision(args: argparse.Namespace, folder: Path) -> str:
    """Run the studio's CPU precision probe once, now, as a user's first training does; every
    studio run of this benchmark then reads that decision from its home's system facts (copied
    by ``new_home``), as a user's later runs read it from theirs. Each fresh home would otherwise
    measure again inside its worker, under the benchmark's own load, and the rounds could even
    decide differently. Measured afresh by every benchmark (into the preparation home, not the
    kept ``--cache``): a decision taken on a busy machine must not outlive it."""
    if args.precision != "auto":
        return f"studio precision forced: {args.precision}"
    import torch

    if torch.cuda.is_available():
        return "studio precision auto on a GPU: no probe"
    try:
        from studio.worker.precision import decide_cpu
    except ImportError as exc:  # a studio without the probe: nothing to share
        return f"no precision probe to run ahead ({exc})"
    from studio import models

    if args.threads:
        torch.set_num_threads(args.threads)  # the probe times what the workers will run
    decision = decide_cpu(models.load_config(str(folder)))
    return (f"studio precision probe (run once here, shared by the studio's runs): "
            f"{decision.precision}, {decision.reason}")


def new_home(work: Path, name: str, args: argparse.Namespace, folder: Path) -> Path:
    """A fresh studio home; the converted embedded model hard-linked into its model cache (as
    the test suite does), so no process pays the conversion, and the system facts measured by
    ``probe_precision``."""
    home = work / name
    if args.model == "default":
        cache = folder.resolve()
        dest = home / "projects" / "models" / cache.name
        dest.parent.mkdir(parents=True)
        try:
            shutil.copytree(cache, dest, copy_function=os.link)
        except OSError:  # another file system
            shutil.copytree(cache, dest)
    else:
        home.mkdir(parents=True)
    facts = work / "prep-home" / "projects" / FACTS_NAME  # see probe_precision
    if facts.is_file():
        (home / "projects").mkdir(exist_ok=True)
        shutil.copy2(facts, home / "projects" / FACTS_NAME)
    return home


def run_reference(args, work: Path, name: str, folder: Path, features: dict[str, Path]) -> dict:
    home = new_home(work, name, args, folder)
    config = {"model": str(folder), "train": str(features["train"]), "eval": str(features["eval"]),
              "output_dir": str(home / "out"), "steps": args.steps, "batch_size": args.batch_size,
              "learning_rate": args.lr, "warmup_ratio": warmup_ratio(), "seed": args.seed,
              "task": args.task, "exact_match_rows": args.exact_match_rows, "out": str(home / "result.json")}
    (home / "config.json").write_text(json.dumps(config, indent=2))
    wall = run_process([sys.executable, str(REFERENCE), str(home / "config.json")], home, args)
    r = json.loads((home / "result.json").read_text())
    return {"side": "reference (LoRA)", "tokens_per_s": r["tokens_per_s"], "tokens": r["tokens"],
            "step_seconds": r["step_seconds"], "wall": wall, "peak_bytes": r["peak_rss_bytes"],
            "peak_kind": "RSS", "loss": r["loss"], "eval_loss": r.get("eval_loss"),
            "exact_match": r.get("exact_match"), "note": f"{r['threads']} threads"}


def warmup_ratio() -> float:
    from studio.runspec import RunSpec

    return RunSpec().warmup_ratio  # the studio's default, used on both sides


def studio_spec(args: argparse.Namespace) -> dict:
    from studio.methods import get_method
    from studio.runspec import RunSpec

    have = {f.name for f in dataclasses.fields(get_method(args.method).params_cls)}
    spec = RunSpec(model=args.model, method=args.method,
                   method_settings={k: v for k, v in LORA_SETTINGS.items() if k in have},
                   sample_task=args.task, max_steps=args.steps, batch_size=args.batch_size,
                   learning_rate=args.lr, lr_scheduler="linear", warmup_ratio=warmup_ratio(),
                   weight_decay=0.0, max_length=args.max_length, loss_on="assistant",
                   precision=args.precision, seed=args.seed, eval_steps=0, save_steps=0,
                   exact_match_limit=args.exact_match_rows)
    if args.packing != "default":
        spec.packing = args.packing == "on"
    return spec.validate().to_dict()


def run_studio(args, work: Path, name: str, folder: Path) -> dict:
    import psutil

    from studio.db import Database

    home = new_home(work, name, args, folder)
    (home / "runspec.json").write_text(json.dumps(studio_spec(args), indent=2))
    wall = run_process([sys.executable, "-m", "studio", "train", str(home / "runspec.json"),
                        "--project", "train speed"], home, args)
    db = Database(home / "projects" / "studio.db")
    try:
        (run,) = db.list_runs()
        deadline = time.monotonic() + 120  # the worker writes its end, then exits: wait for it
        while run.pid and psutil.pid_exists(run.pid) and time.monotonic() < deadline:
            try:
                if psutil.Process(run.pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        values: dict[str, dict[int, float]] = {}
        for m in db.metrics_for(run.id):
            values.setdefault(m.name, {})[m.step] = m.value
        if run.status != "completed":
            raise RuntimeError(f"studio run {run.status}: {run.error}")
    finally:
        db.close()

    def last(metric: str) -> float | None:
        steps = values.get(metric)
        return steps[max(steps)] if steps else None

    peak, kind = last("peak_rss_bytes"), "RSS"
    if peak is None:
        peak, kind = last("peak_cuda_allocated_bytes"), "CUDA allocated"
    tps, seconds = last("train_tokens_per_s"), last("train_step_seconds")
    log = next(iter(home.glob("projects/*/runs/*/worker.log")), None)
    said = [line.strip() for line in (log.read_text(errors="replace").splitlines() if log else [])
            if "precision" in line.lower()][:1]
    return {"side": f"studio ({args.method})", "tokens_per_s": tps, "tokens": round(tps * seconds),
            "step_seconds": seconds, "wall": wall, "peak_bytes": peak, "peak_kind": kind,
            "loss": last("loss"), "eval_loss": last("eval_loss"), "exact_match": last("eval_exact_match"),
            "note": "; ".join(
                [f"precision {run.spec.get('precision')}",
                 f"packing {'on' if run.spec.get('packing') else 'off'}"]
                + said)}


def run_process(cmd: list[str], home: Path, args: argparse.Namespace) -> float:
    """Run one training process to its end; its output goes to ``home/output.log``."""
    started = time.perf_counter()
    with open(home / "output.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(home, args), stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (home / "output.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[1:3])} exited with {proc.returncode}; last output:\n{tail}")
    return wall


def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def report(args, rows: list[dict], machine: str) -> str:
    lines = [f"## Training speed: studio ({args.method}) vs plain Trainer + PEFT LoRA (fp32)", "",
             machine, "",
             f"{args.task} sample task, batch {args.batch_size}, max length {args.max_length}, "
             f"{args.steps} steps, "
             f"lr {args.lr:g} linear, seed {args.seed}; studio precision `{args.precision}`, packing "
             f"`{args.packing}`{'; SMOKE RUN, not a benchmark' if args.smoke else ''}", "",
             "| # | side | tokens/s | tokens | step s | wall s | peak MiB | loss (last step) | eval loss "
             "| exact match | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['side']} | {fmt(r['tokens_per_s'], '{:.1f}')} | {r['tokens']} | "
                     f"{fmt(r['step_seconds'], '{:.1f}')} | {r['wall']:.0f} | "
                     f"{fmt(r['peak_bytes'] and r['peak_bytes'] / MIB, '{:.0f}')} ({r['peak_kind']}) | "
                     f"{fmt(r['loss'], '{:.4f}')} | {fmt(r['eval_loss'], '{:.4f}')} | "
                     f"{fmt(r['exact_match'], '{:.0%}')} | {r['note']} |")
    ref = [r for r in rows if r["side"].startswith("reference")]
    ours = [r for r in rows if r["side"].startswith("studio")]
    if not ref or not ours:
        return "\n".join(lines)

    def mean(side: list[dict], key: str) -> float | None:
        found = [r[key] for r in side if r[key] is not None]
        return statistics.fmean(found) if found else None

    speed = mean(ours, "tokens_per_s") / mean(ref, "tokens_per_s")
    pairs = ", ".join(f"×{s['tokens_per_s'] / r['tokens_per_s']:.2f}" for r, s in zip(ref, ours))
    lines += ["", f"**studio / reference tokens/s = ×{speed:.2f}** (mean of {len(ours)} vs {len(ref)}; "
                  f"round by round {pairs}) — goal ≥ 1.5"]
    same_kind = ours[0]["peak_kind"] == ref[0]["peak_kind"]
    if same_kind:
        rss = mean(ours, "peak_bytes") / mean(ref, "peak_bytes")
        lines.append(f"- peak RSS studio / reference = {rss:.2f} — goal ≤ 0.8")
    for key, label in (("eval_loss", "eval loss"), ("loss", "last-step training loss")):
        a, b = mean(ours, key), mean(ref, key)
        if a is not None and b:
            lines.append(f"- {label}: studio {a:.4f}, reference {b:.4f} ({(a / b - 1):+.1%}) — "
                         "goal within 5 %")
    a, b = mean(ours, "exact_match"), mean(ref, "exact_match")
    if a is not None and b is not None:
        lines.append(f"- exact match: studio {a:.0%}, reference {b:.0%} ({(a - b) * 100:+.0f} points) — "
                     "goal not lower by more than 4 points")
    if {r["tokens"] for r in ref} != {r["tokens"] for r in ours}:
        lines.append("- the two sides counted different numbers of training tokens (packing, or the "
                     "studio's data order): compare tokens/s, not totals")
    if args.method != "lora":
        lines.append(f"- the reference is LoRA; the studio trained {args.method}: the ratio is "
                     f"{args.method} in the studio against plain LoRA, and the loss goals do not apply")
    return "\n".join(lines)


def machine_line(args: argparse.Namespace) -> str:
    import psutil
    import torch

    return (f"Machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} logical CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; torch {torch.__version__}, "
            f"threads {args.threads or f'default ({torch.get_num_threads()})'}, "
            f"CUDA {'yes' if torch.cuda.is_available() else 'no'}; load average at start {load_average()}")


def schedule(rounds: int) -> list[tuple[str, int]]:
    """(side, round) in the order they train: reference, studio, studio, reference, ... (ABBA),
    so that a machine getting faster or slower during the benchmark is charged to both sides."""
    order = []
    for i in range(rounds):
        pair = ("reference", "studio") if i % 2 == 0 else ("studio", "reference")
        order += [(side, i + 1) for side in pair]
    return order


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-train-speed-"))
    rows: list[dict] = []
    machine = ""
    try:
        folder, features = prepare(args, work)
        machine = machine_line(args)
        print(machine, flush=True)
        for side, round_no in schedule(args.rounds):
            name = f"{side}-{round_no}"
            print(f"{name}: training ({time.strftime('%H:%M:%S')}, load {load_average()})", flush=True)
            row = (run_reference(args, work, name, folder, features) if side == "reference"
                   else run_studio(args, work, name, folder))
            rows.append(row)
            print(f"{name}: {row['tokens_per_s']:.1f} tokens/s, {row['wall']:.0f} s wall", flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"train_speed: {exc}", file=sys.stderr, flush=True)
        if rows:
            print("\n" + report(args, rows, machine), flush=True)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    text = report(args, rows, machine) + f"\n\nLoad average at the end: {load_average()}\n"
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
