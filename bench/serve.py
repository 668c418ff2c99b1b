"""Serving throughput: concurrent clients over many LoRA adapters against one request at a time.

    python bench/serve.py [--model default] [--clients 1,4,16] [--adapters 1,4,16] [--rounds 2]
                          [--max-tokens 64] [--threads N] [--rank 16] [--targets q_proj,k_proj,v_proj,o_proj]
                          [--ignore-eos] [--repeat N] [--out FILE.md] [--smoke]

The real server, through HTTP: ``peft-studio serve`` as a child process on 127.0.0.1 (its own
process, as a user runs it, so the clients' threads here never share its interpreter), serving
the base and ``max(--adapters)`` random LoRA adapters made here (``--rank`` r, default 16, alpha
2r, on ``--targets``, default q, k, v, o; r 8 on q_proj,v_proj is the LoRA paper's setting; B
drawn from a seeded normal so each adapter really changes the answers; saved by PEFT's
``save_pretrained``). ``--max-active`` is the number of adapters, so every adapter stays
attached: this measures batching, not the LRU's disk loads. Every adapter (and the base) gets
one short request before anything is measured, so loading is not timed.

For each adapter count k and client count c: c clients (threads, released together), each
sending ``--rounds`` chat requests one after another, client j's to adapter j % k, greedy,
``max_tokens`` fixed, prompts from a fixed list. Then the same requests one at a time. Both sides
are measured side by side in one run (one at a time first, then concurrent, per configuration),
and the base alone with the largest c is the reference for the adapters' cost.

The figures: output tokens/s = the responses' ``usage.completion_tokens`` summed over the wall
time from the first request sent to the last answer (an answer may end early at end-of-sequence,
so tokens are counted, never assumed), and p50 / p95 request latency
(nearest rank). Greedy answers must be the same concurrent or alone: the table counts those that
differ (the engine's contract is zero). Goals (issue 16): (largest c × largest k) over one at a
time ≥ 3, and over (largest c on the base) ≥ 0.9. The machine's load average is printed before
and after: a busy machine makes every figure worse.

``--ignore-eos`` sends vLLM's ``ignore_eos`` with every request, so every answer runs to
``max_tokens``: different adapters give answers of different lengths, and a batch whose rows end
early decodes its tail in smaller batches; with equal lengths the base and the adapters are
compared on the same work (as vLLM's own serving benchmark does).

``--smoke`` is a quick end-to-end check of the script (a tiny random model, 2 adapters, 1-2
clients, 4 tokens), not a benchmark.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import statistics
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_clients.py, beside this script
from serve_clients import PROMPTS, Request, Result, concurrent, one_at_a_time, plan  # noqa: E402
READY = re.compile(r"PEFT Studio serving (\d+) models at (http://\S+)/v1")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
B_SCALE = 0.02  # std of LoRA B: non-zero (B = 0 would answer like the base), small enough to stay fluent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2-135M; "
                        "with --smoke, a tiny random model)")
    parser.add_argument("--clients", default=None, help="concurrent client counts (default 1,4,16)")
    parser.add_argument("--adapters", default=None, help="adapter counts (default 1,4,16)")
    parser.add_argument("--rounds", type=int, default=None, help="requests per client (default 2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the server (0: torch's default)")
    parser.add_argument("--rank", type=int, default=LORA["r"], help="the adapters' LoRA rank (default 16; alpha 2r)")
    parser.add_argument("--targets", default=",".join(LORA["target_modules"]),
                        help="the adapters' target modules, comma separated (default q_proj,k_proj,v_proj,o_proj)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "peft-studio-bench-cache"),
                        help="studio home holding the converted embedded model (kept between runs)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for the server to start")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    parser.add_argument("--repeat", type=int, default=1, help="measure the goal's two configurations "
                        "(largest clients × adapters, and the base) this many times, alternating; medians")
    parser.add_argument("--ignore-eos", action="store_true", help="every answer runs to --max-tokens "
                        "(vLLM's ignore_eos): the base and the adapters compared on equal lengths")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 adapters, 1-2 clients: a quick check")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.clients = _counts(parser, "--clients", args.clients or ("1,2" if smoke else "1,4,16"))
    args.adapters = _counts(parser, "--adapters", args.adapters or ("1,2" if smoke else "1,4,16"))
    args.rounds = args.rounds or (1 if smoke else 2)
    args.max_tokens = args.max_tokens or (4 if smoke else 64)
    if args.rounds < 1 or args.max_tokens < 1 or args.repeat < 1:
        parser.error("--rounds, --max-tokens and --repeat must be at least 1")
    if args.rank < 1:
        parser.error("--rank must be at least 1")
    args.targets = [part.strip() for part in args.targets.split(",") if part.strip()]
    if not args.targets:
        parser.error("--targets names at least one module, e.g. q_proj,v_proj")
    return args


def _counts(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        parser.error(f"{flag} takes numbers separated by commas, e.g. 1,4,16")
    if not values or values[0] < 1:
        parser.error(f"{flag}: every count must be at least 1")
    return values


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- the model and the adapters


def base_folder(args: argparse.Namespace, work: Path) -> Path:
    """A local model folder: ``--model`` resolved (the embedded model converted once into
    ``--cache``), or with ``--smoke`` a 2-layer random Llama with the real tokenizer."""
    from studio import models

    if args.model is not None or not args.smoke:
        return models.resolve_source(args.model or "default")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(str(models.tokenizer_folder("default")))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = work / "tiny-model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora_settings(rank: int = LORA["r"], targets: list[str] | None = None) -> dict:
    """``LORA`` with rank r (alpha 2r, as ``LORA``'s 16 / 32) on ``targets``."""
    return {**LORA, "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets or LORA["target_modules"])}


def make_adapters(base: Path, dest: Path, count: int, seed: int = 0, rank: int = LORA["r"],
                  targets: list[str] | None = None) -> dict[str, Path]:
    """``count`` LoRA adapters over ``base`` (``lora_settings``), A and B seeded, each in
    its own folder as PEFT saves it (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from studio.models import load_model

    settings = lora_settings(rank, targets)
    torch.manual_seed(seed)  # PEFT draws A at random: seeded, so every run serves the same adapters
    names = [f"lora{i}" for i in range(count)]
    model = get_peft_model(load_model(str(base)), LoraConfig(task_type=TaskType.CAUSAL_LM, **settings),
                           adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(task_type=TaskType.CAUSAL_LM, **settings))
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f"lora_B.{name}." in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * B_SCALE)
    folders = {}
    for name in names:
        model.save_pretrained(str(dest), selected_adapters=[name])  # PEFT writes dest/<name>/
        folders[name] = dest / name
    del model
    gc.collect()
    return folders


# ---------------------------------------------------------------- the server


class Server:
    """``peft-studio serve`` as a child process; ``url`` once it printed its ready line."""

    def __init__(self, args: argparse.Namespace, base: Path, adapters: dict[str, Path], log: Path):
        env = {**os.environ, "PEFT_STUDIO_HOME": os.environ["PEFT_STUDIO_HOME"], "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        command = [sys.executable, "-m", "studio", "serve", "--model", str(base), "--port", "0",
                   "--max-active", str(max(1, len(adapters)))]
        for name, folder in adapters.items():
            command += ["--adapter", f"{name}={folder}"]
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     start_new_session=True)
        self.url = self._wait_ready(args.timeout)

    def _wait_ready(self, timeout: float) -> str:
        found: dict[str, str] = {}

        def read():  # a thread: readline would block past the deadline
            for line in self.proc.stdout:
                match = READY.search(line)
                if match:
                    found["url"] = match.group(2) + "/v1"
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if "url" not in found:
            self.stop()
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"the server did not start within {timeout:.0f} s "
                               f"(exit code {self.proc.returncode}):\n{tail}")
        return found["url"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------- the report


@dataclass
class Row:
    clients: int
    adapters: int  # 0: the base alone
    concurrent: Result
    sequential: Result
    again: list[float] = field(default_factory=list)  # tokens/s of the --repeat runs (concurrent)

    def median_tps(self) -> float:
        """The concurrent tokens/s: the median of the first run and the ``--repeat`` ones."""
        return statistics.median([self.concurrent.tokens_per_s, *self.again])

    @property
    def differing(self) -> int:
        return sum(self.concurrent.answers.get(req) != text for req, text in self.sequential.answers.items())

    def cells(self) -> list[str]:
        c, s = self.concurrent, self.sequential
        speedup = c.tokens_per_s / s.tokens_per_s if s.tokens_per_s else 0.0
        return [str(self.clients), str(self.adapters) if self.adapters else "base", str(len(c.latencies)),
                str(c.tokens), f"{c.tokens_per_s:.1f}", f"{c.percentile(50):.2f}", f"{c.percentile(95):.2f}",
                f"{s.tokens_per_s:.1f}", f"{s.percentile(50):.2f}", f"{s.percentile(95):.2f}",
                f"×{speedup:.2f}", str(self.differing)]


HEADER = ["clients", "adapters", "requests", "tokens", "tokens/s", "p50 s", "p95 s",
          "one at a time tokens/s", "p50 s", "p95 s", "speed-up", "answers differing"]


def report(rows: list[Row], args: argparse.Namespace, machine: str) -> str:
    lines = [f"## Serving: {args.model or ('tiny random model' if args.smoke else 'default')}", "", machine,
             f"max_tokens {args.max_tokens}{' (ignore_eos: every answer that long)' if args.ignore_eos else ''}, "
             f"{args.rounds} request(s) per client, greedy; "
             f"LoRA r {args.rank} on {','.join(args.targets)}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    lines.append("")
    lines += goals(rows)
    return "\n".join(lines) + "\n"


def goals(rows: list[Row]) -> list[str]:
    """The issue's two ratios, on the largest configuration measured."""
    adapter_rows = [row for row in rows if row.adapters]
    if not adapter_rows:
        return []
    top = max(adapter_rows, key=lambda row: (row.clients, row.adapters))
    tps = top.median_tps()
    out = []
    if top.sequential.tokens_per_s:
        ratio = tps / top.sequential.tokens_per_s
        out.append(f"- {top.clients} clients × {top.adapters} adapters / the same requests one at a time: "
                   f"×{ratio:.2f} (goal ≥ 3: {'met' if ratio >= 3 else 'not met'})")
    base = next((row for row in rows if not row.adapters and row.clients == top.clients), None)
    if base is not None and base.concurrent.tokens_per_s:
        ratio = tps / base.median_tps()
        runs = 1 + len(top.again)
        how = f" (medians of {runs} runs each, the two sides alternating)" if runs > 1 else ""
        out.append(f"- {top.clients} clients × {top.adapters} adapters / {top.clients} clients on the base: "
                   f"{ratio:.2f}{how} (goal ≥ 0.9: {'met' if ratio >= 0.9 else 'not met'})")
        if runs > 1:
            pairs = zip([top.concurrent.tokens_per_s, *top.again], [base.concurrent.tokens_per_s, *base.again])
            out.append("  - run by run: " + ", ".join(f"{a:.1f}/{b:.1f} = {a / b:.2f}" for a, b in pairs))
    differing = sum(row.differing for row in rows)
    out.append(f"- answers that differ between concurrent and one at a time: {differing}")
    return out


def base_model_name(url: str, adapters: dict[str, Path]) -> str:
    import httpx

    listed = [entry["id"] for entry in httpx.get(f"{url}/models", timeout=30).json()["data"]]
    return next(name for name in listed if name not in adapters)


def measure(args: argparse.Namespace, url: str, adapters: dict[str, Path]) -> list[Row]:
    names, rows = list(adapters), []
    base = base_model_name(url, adapters)
    concurrent(url, [[Request(name, PROMPTS[0])] for name in [base, *names]], 2)  # load each adapter, unmeasured
    configurations = [(c, k) for k in args.adapters for c in args.clients] + [(max(args.clients), 0)]
    for clients, k in configurations:
        schedule = plan(clients, names[:k] if k else [base], args.rounds)
        sequential = one_at_a_time(url, schedule, args.max_tokens, args.ignore_eos)
        row = Row(clients, k, concurrent(url, schedule, args.max_tokens, args.ignore_eos), sequential)
        rows.append(row)
        print("| " + " | ".join(row.cells()) + " |", flush=True)
    top = max((row for row in rows if row.adapters), key=lambda row: (row.clients, row.adapters), default=None)
    if top is not None and args.repeat > 1:  # the goal's two sides again, alternating (ABBA...)
        base_row = rows[-1]
        for i in range(args.repeat - 1):
            for row in ((base_row, top) if i % 2 == 0 else (top, base_row)):
                schedule = plan(row.clients, names[:row.adapters] if row.adapters else [base], args.rounds)
                row.again.append(concurrent(url, schedule, args.max_tokens, args.ignore_eos).tokens_per_s)
            print(f"repeat {i + 2}: {top.again[-1]:.1f} / {base_row.again[-1]:.1f} tokens/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["PEFT_STUDIO_HOME"] = str(Path(args.cache).resolve())  # before studio reads it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(REPO) not in sys.path:  # run as `python bench/serve.py`: the studio is beside bench/
        sys.path.insert(0, str(REPO))
    from studio.sysinfo import cpu_model

    before = load_average()
    machine = f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.python_version()}; load average before: {before}"
    print(machine, flush=True)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        base = base_folder(args, work)
        adapters = make_adapters(base, work / "adapters", max(args.adapters), rank=args.rank,
                                 targets=args.targets)
        print(f"{len(adapters)} adapters made in {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        server = Server(args, base, adapters, work / "server.log")
        try:
            print(f"server at {server.url} ready in {time.perf_counter() - started:.1f} s; base {base}", flush=True)
            rows = measure(args, server.url, adapters)
        finally:
            server.stop()
    machine += f"; after: {load_average()}"
    text = report(rows, args, machine)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
