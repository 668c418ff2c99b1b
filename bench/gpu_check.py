"""GPU check: every registered method trained briefly on CUDA, its peak memory against the estimate.

    python bench/gpu_check.py [--out gpu_check.md] [--budget 450] [--steps 20] [--methods lora,...]
    python bench/gpu_check.py --device cpu --smoke        (a quick run of the script itself, here)

One script, no downloads, about 8 minutes at most on one GPU (``--budget``, in seconds: a stage
that would overrun is skipped and says so). It

1. prints the versions of torch, transformers, peft, bitsandbytes and liger-kernel and the GPU,
   or one line naming what is missing;
2. trains every registered method (``studio.methods``) for ``--steps`` steps on the embedded
   model in bf16 (QLoRA through bitsandbytes' CUDA kernels) and records the peak of
   ``torch.cuda.max_memory_allocated()`` during training against ``studio.planner.plan`` for the
   same setup (bf16, CUDA, same batch; the sequence length is the longest training row, the
   length the collator pads a batch to at most);
3. times LoRA with the run's ``liger_kernel`` switch on (``studio/worker/kernels.py``: liger's
   RMSNorm, RoPE, SwiGLU and fused linear cross-entropy instead of the studio's label-only
   loss) against the LoRA run of step 2;
4. answers one Compare prompt for the base and two trained LoRA adapters in one batched
   ``generate`` (``studio.compare.engine.ChatEngine``);
5. exports the LoRA run merged, verified by a clean reload (``studio.export.export_run``);

and prints one Markdown table (also written to ``--out``). Every stage runs in try/except: a
failure is a row, not a crash.

Why in this process, not as worker processes: a worker records ``max_memory_allocated`` too,
but only here can the peak be reset between methods, the liger patch reach the model, and the
whole check pay CUDA's start-up once. Training goes through the worker's own
``studio.worker.train.train`` (what ``python -m studio.worker`` runs), so it is the studio's
path: data, method, precision, Trainer and the figures it records.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("torch", "transformers", "peft", "accelerate", "datasets", "sqlalchemy", "psutil",
            "safetensors", "gguf")
SHOWN = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")
SMOKE_METHODS = "lora,rslora"  # two LoRA adapters: what the Compare stage batches
MIB = 2**20


@dataclass
class Row:
    stage: str
    method: str = ""
    steps_per_s: float | None = None
    peak: float | None = None
    estimate: float | None = None
    status: str = ""
    seconds: float = 0.0
    peak_label: str = ""  # how ``peak`` was measured, when it is not max_memory_allocated

    def cells(self) -> list[str]:
        ratio = (f"{self.peak / self.estimate:.2f}" if self.peak and self.estimate and not self.peak_label
                 else "–")
        peak = "–" if self.peak is None else f"{self.peak / MIB:,.0f} MiB{self.peak_label}"
        speed = "–" if self.steps_per_s is None else f"{self.steps_per_s:.2f}"
        return [self.stage, self.method, speed, peak,
                "–" if self.estimate is None else f"{self.estimate / MIB:,.0f} MiB", ratio,
                f"{self.seconds:.0f}", self.status.replace("|", "/").replace("\n", " ")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="default",
                        help="model source (default: the embedded SmolLM2-135M)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per method (default 20; 2 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", default=None, help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole check")
    parser.add_argument("--home", default=None, help="studio home to work in (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the Markdown table here too")
    parser.add_argument("--smoke", action="store_true", help=f"2 steps, methods {SMOKE_METHODS}")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.methods is None and args.smoke:
        args.methods = SMOKE_METHODS
    return args


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_environment(args: argparse.Namespace) -> str | None:
    """Versions and the device, printed; the one line that says why the check cannot run, or None."""
    missing = [name for name in REQUIRED if version(name) == "not installed"]
    shown = ", ".join(f"{name} {version(name)}" for name in SHOWN)
    print(f"python {sys.version.split()[0]}; {shown}", flush=True)
    if missing:
        return (f"missing the studio's dependencies: {', '.join(missing)}. Install them with "
                f"`pip install -e {REPO}` (torch first, the build for this machine's CUDA).")
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            return (f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda}); "
                    "install a CUDA build of torch, or run with --device cpu")
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
              f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}", flush=True)
    else:
        print(f"device: CPU ({os.cpu_count()} cores), torch {torch.__version__}", flush=True)
    sys.path.insert(0, str(REPO))
    try:
        import studio.worker.train  # noqa: F401  (everything the training path imports)
    except ImportError as exc:
        return f"the studio does not import: {exc}. Install its dependencies: `pip install -e {REPO}`"
    return None


class Budget:
    """The whole check's time: a stage whose expected time would pass the end is skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def allows(self, expected: float) -> bool:
        return time.monotonic() + expected <= self.end

    def left(self) -> float:
        return self.end - time.monotonic()


def memory_reset(device: str) -> float:
    """Free what the previous stage left, reset the peak; returns the bytes still allocated."""
    import torch

    gc.collect()
    if device != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return float(torch.cuda.memory_allocated())


def longest_row(db, project_id: int, task: str, model: str, max_length: int) -> int:
    """Tokens of the longest training row (capped at ``max_length``): at most what the collator
    pads one batch to, so the length the estimate is asked about."""
    from studio import models
    from studio.data import import_sample_task, load_dataset_split
    from studio.data.tokenize import token_lengths

    dataset = import_sample_task(db, project_id, task).dataset  # the worker finds this import again
    rows = load_dataset_split(db, dataset.id, "train")
    return min(max_length, max(token_lengths(models.load_tokenizer(model), rows)))


def train_method(ctx: dict, method: str, **extra) -> tuple[Row, int]:
    """Train ``method`` through the worker's ``train.train``; (its row, the run id)."""
    from studio.estimate import TrainSetup
    from studio.planner import plan
    from studio.runspec import RunSpec
    from studio.runs import launch
    from studio.worker import train

    args, db = ctx["args"], ctx["db"]
    spec = RunSpec(model=args.model, method=method, sample_task="dates", max_steps=args.steps,
                   batch_size=args.batch_size, max_length=args.max_length, precision=args.precision,
                   eval_steps=0, save_steps=0, exact_match_limit=0, warmup_ratio=0.0,
                   liger_kernel=bool(extra.get("liger")))
    leftover = memory_reset(args.device)
    started = time.perf_counter()
    run = launch.create_run(db, ctx["project_id"], spec, extra.get("name"))
    status = train.train(db, run.id)
    seconds = time.perf_counter() - started
    run = db.get_run(run.id)
    last: dict[str, float] = {}
    for m in db.metrics_for(run.id):  # ordered by step: the last value of each wins
        last[m.name] = m.value
    row = Row(extra.get("stage", "train"), method, seconds=seconds)
    if status != "completed":
        last_line = (run.error or "").strip().splitlines()[-1:] or [""]
        row.status = f"{status}: {last_line[0]}"[:300]
        return row, run.id
    if last.get("train_step_seconds"):
        row.steps_per_s = args.steps / last["train_step_seconds"]
    if "peak_cuda_allocated_bytes" in last:
        row.peak = last["peak_cuda_allocated_bytes"]
    elif "peak_rss_bytes" in last:  # the CPU: the process's RSS high-water, all stages so far
        row.peak, row.peak_label = last["peak_rss_bytes"], " (RSS, cumulative)"
    seq_len = args.max_length if spec.packing else ctx["seq_len"]
    setup = TrainSetup(batch_size=args.batch_size, seq_len=seq_len, dtype=args.precision,
                       optimizer=spec.optimizer, device=args.device)
    row.estimate = float(plan(ctx["arch"], method, spec.method_settings, setup)["total_bytes"])
    row.status = f"completed, loss {last.get('loss', float('nan')):.4f}"
    if leftover > 64 * MIB:
        row.status += f"; {leftover / MIB:.0f} MiB left allocated by the stage before"
    return row, run.id


def liger_stage(ctx: dict, plain: Row | None) -> Row:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return Row("liger-kernel", "lora", status='liger-kernel not installed (pip install "peft-studio[cuda]")')
    # The studio's own switch (RunSpec.liger_kernel, studio/worker/kernels.py): the worker patches
    # the model before LoRA wraps it and leaves the loss to liger's fused linear cross-entropy.
    # Its patches are process-wide (transformers' Llama functions): run after the plain methods.
    row, _ = train_method(ctx, "lora", stage="liger-kernel on", name="lora + liger", liger=True)
    row.status += "; loss: liger's fused linear cross-entropy"
    if plain is not None and plain.steps_per_s and row.steps_per_s:
        row.status += (f"; ×{row.steps_per_s / plain.steps_per_s:.2f} the steps/s of LoRA without it "
                       f"(plain run: {plain.status})")
    return row


def compare_stage(ctx: dict, adapters: list[Path]) -> Row:
    """One Compare answer for the base and two LoRA adapters: one batched generate."""
    from studio.compare.engine import BASE, ChatEngine
    from studio.compare.settings import GenerationSettings

    args = ctx["args"]
    row = Row("compare", "base + 2 LoRA")
    if len(adapters) < 2:
        row.status = "skipped: fewer than two trained LoRA adapters"
        return row
    started = time.perf_counter()
    engine = ChatEngine.load(args.model, dtype="bfloat16" if args.device == "cuda" else "float32",
                             device=args.device)
    for i, folder in enumerate(adapters[:2]):
        engine.add_adapter(f"adapter {i + 1}", folder)
    conversation = [{"role": "user",
                     "content": "Convert the date to ISO 8601 (YYYY-MM-DD).\n\nthe 5th of March, 2021"}]
    columns = [BASE, "adapter 1", "adapter 2"]
    answers = engine.answer({c: conversation for c in columns}, GenerationSettings(max_new_tokens=24))
    row.seconds = time.perf_counter() - started
    paths = {answers[c].path for c in columns}
    tokens = sum(answers[c].tokens for c in columns)
    generate_s = max(answers[c].seconds for c in columns)
    row.status = (f"{'ok' if paths == {'batched'} else 'NOT batched: ' + ', '.join(sorted(paths))}: "
                  f"{tokens} new tokens in {generate_s:.1f} s; "
                  f"adapter 1 said {answers['adapter 1'].text[:40]!r}")
    del engine
    return row


def export_stage(ctx: dict, run_id: int | None) -> Row:
    from studio.export import export_run

    row = Row("export merged + verify", "lora")
    if run_id is None:
        row.status = "skipped: no completed LoRA run"
        return row
    started = time.perf_counter()
    export = export_run(ctx["db"], run_id, kind="merged", dtype="float32")
    row.seconds = time.perf_counter() - started
    detail = {k: v for k, v in (export.verification or {}).items() if k != "folder_token"}
    row.status = f"{export.status} {detail}"[:300]
    return row


def run_stage(rows: list[Row], budget: Budget, expected: float, stage: str, method: str, fn):
    """``fn()`` (returning a Row) when the budget allows it; a failure is its row's status."""
    if not budget.allows(expected):
        rows.append(Row(stage, method, status=f"skipped: time budget ({budget.left():.0f} s left, "
                                              f"~{expected:.0f} s needed)"))
        return None
    started = time.perf_counter()
    try:
        row = fn()
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:250]
        row = Row(stage, method, status=f"error: {type(exc).__name__}: {first}",
                  seconds=time.perf_counter() - started)
        traceback.print_exc()
    rows.append(row)
    print(f"{stage} {method}: {row.status} ({row.seconds:.0f} s)", flush=True)
    return row


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| stage | method | steps/s | peak allocated | estimate | ratio | s | status |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the studio then sees no GPU
    budget = Budget(args.budget)
    problem = check_environment(args)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr, flush=True)
        return 2
    home = Path(args.home or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    os.environ["PEFT_STUDIO_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads
    from studio import models
    from studio.db import Database
    from studio.methods import ORDER
    from studio.planner import arch_for
    from studio.projects import create_project

    try:
        started = time.perf_counter()
        models.resolve_source(args.model)  # the embedded model is converted once, here
        print(f"model {args.model} ready in {time.perf_counter() - started:.0f} s; home {home}", flush=True)
        db = Database()
        project = create_project(db, "gpu check")
        ctx = {"args": args, "db": db, "project_id": project.id, "arch": arch_for(args.model),
               "seq_len": longest_row(db, project.id, "dates", args.model, args.max_length)}
    except Exception as exc:
        print(f"gpu_check: cannot prepare the model or data: {exc}", file=sys.stderr, flush=True)
        return 2
    methods = args.methods.split(",") if args.methods else list(ORDER)
    rows: list[Row] = []
    done: dict[str, tuple[Row, int]] = {}
    for method in methods:
        durations = [r.seconds for r, _ in done.values()]
        expected = 1.5 * max(durations) if durations else 30.0

        def one(method=method) -> Row:
            row, run_id = train_method(ctx, method)
            if row.status.startswith("completed"):
                done[method] = (row, run_id)
            return row
        run_stage(rows, budget, expected, "train", method, one)
    lora = done.get("lora")
    run_stage(rows, budget, 1.5 * lora[0].seconds if lora else 60, "liger-kernel on", "lora",
              lambda: liger_stage(ctx, lora[0] if lora else None))
    adapters = [Path(models_folder(db, run_id)) / "adapter" for m, (_, run_id) in done.items()
                if m in ("lora", "rslora", "loraplus")]
    run_stage(rows, budget, 60, "compare", "base + 2 LoRA", lambda: compare_stage(ctx, adapters))
    run_stage(rows, budget, 90, "export merged + verify", "lora",
              lambda: export_stage(ctx, lora[1] if lora else None))
    header = (f"## GPU check ({args.device}, {args.precision}, {args.steps} steps, batch {args.batch_size}, "
              f"max length {args.max_length}, estimate at sequence length {ctx['seq_len']})"
              f"{' — SMOKE RUN' if args.smoke else ''}")
    text = table(rows, header)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    db.close()
    return 0


def models_folder(db, run_id: int) -> Path:
    from studio.runs.launch import run_folder

    return run_folder(db, db.get_run(run_id))


if __name__ == "__main__":
    sys.exit(main())
