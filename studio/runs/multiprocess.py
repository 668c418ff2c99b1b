"""A run trained by several worker processes on this machine: how many, the launcher's command
line and environment, and what the launcher said when one of them died.

The launcher is torch's own, ``python -m torch.distributed.run`` (torchrun): ``--standalone``
picks a free local rendezvous port, so two studios (or tests) never collide, and its agent
watches the ranks: when one dies it stops the others (SIGTERM, SIGKILL 30 s later) and prints a
report naming the rank that failed first (``ChildFailedError``), which ``failure_cause`` reads
back for the run's error. FSDP and DeepSpeed runs use ``accelerate launch``
(``studio.distributed.strategy.launch_command``), which runs the same agent.

Threads: on a CPU the ranks share its cores, so each gets ``cores // N`` of them (at least one)
through ``OMP_NUM_THREADS``, unless the user set it; torchrun itself would give each one thread.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from studio.runspec import RunSpec

# torchrun's report (torch/distributed/elastic/multiprocessing/errors: _FAILURE_FORMAT_TEMPLATE)
_ROOT = "Root Cause (first observed failure):"
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)", re.M)
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)(?:\s+\((SIG\w+)\))?", re.M)


def process_count(spec: RunSpec, gpus: int) -> int:
    """Worker processes for ``spec`` on a machine with ``gpus`` visible GPUs: the spec's
    ``nproc_per_node``, or for 0 (automatic) one per GPU when there are several, else one."""
    if spec.nproc_per_node > 0:
        return spec.nproc_per_node
    return gpus if gpus > 1 else 1


def gpu_refusal(spec: RunSpec, gpus: int) -> str | None:
    """Why ``spec``'s process count cannot run on a machine with ``gpus`` GPUs, or None. On a GPU
    machine every process takes a GPU of its own (NCCL cannot put two ranks on one); on a CPU any
    count runs, with gloo, the cores split between the ranks."""
    if gpus and spec.nproc_per_node > gpus:
        return (f"runspec 'nproc_per_node': {spec.nproc_per_node} processes need {spec.nproc_per_node} GPUs, "
                f"one each (two ranks cannot share one), and this machine shows {gpus}; set it to at most "
                f"{gpus}, or 0 for one per GPU")
    return None


def torchrun_command(processes: int, run_id: int, resume: bool) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N -m studio.worker RUN_ID``
    (``liveness`` recognises the launcher and every rank by ``-m studio.worker RUN_ID``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "studio.worker", str(run_id), *(["--resume"] if resume else [])]


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container's share)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def environment(processes: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: unbuffered output, and with several processes the CPU threads
    split between them (``OMP_NUM_THREADS``, read by torch at start), unless the user chose."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if processes > 1 and not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, cpu_cores() // processes))
    return env


def failure_cause(log_text: str) -> str | None:
    """The rank that failed first, from torchrun's report in the run's log, e.g. "rank 1 (pid
    4242) ended with exit code -9 (SIGKILL)"; None when the log holds no such report."""
    at = log_text.rfind(_ROOT)
    if at < 0:
        return None
    block = log_text[at + len(_ROOT):]
    rank, code = _RANK.search(block), _EXIT.search(block)
    if rank is None or code is None:
        return None
    signal_name = f" ({code.group(3)})" if code.group(3) else ""
    return f"rank {rank.group(1)} (pid {code.group(2)}) ended with exit code {code.group(1)}{signal_name}"


def ranks_in(command: list[str]) -> int:
    """How many processes a launch command starts on this machine: torchrun's
    ``--nproc_per_node``, accelerate's ``--num_processes``; 1 for a plain worker."""
    for i, arg in enumerate(command):
        for flag in ("--nproc_per_node", "--nproc-per-node", "--num_processes"):
            if arg.startswith(flag + "="):
                return _count(arg.split("=", 1)[1])
            if arg == flag and i + 1 < len(command):
                return _count(command[i + 1])
    return 1


def _count(text: str) -> int:
    try:
        return max(1, int(text))
    except ValueError:
        return 1


def outlived(killed: list[int], log_tail: Callable[[], str]) -> str:
    """What a failed run's error adds when its launcher is gone: the rank torchrun reported
    first (``failure_cause``), and the ranks that outlived the launcher and were killed."""
    parts = []
    try:
        cause = failure_cause(log_tail())
    except Exception:  # a folder not ours, an unreadable log: the launcher's end is still recorded
        cause = None
    if cause:
        parts.append(f"torchrun reported {cause}")
    if killed:
        parts.append(f"its rank processes {', '.join(map(str, killed))} outlived it and were killed")
    return "".join(f"; {part}" for part in parts)
