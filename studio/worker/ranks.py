"""Which process of a run this is, and the little the worker's processes say to each other.

A run trains in one process or, under a launcher (``torchrun``; ``accelerate launch``, which
runs torchrun's agent), in one process per rank. Launchers tell each process who it is through
torch.distributed's ``env://`` contract: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``. Without a
launcher this is rank 0 of a world of 1, and every function here costs nothing.

Only the main rank (0) writes: the run's row (status, heartbeat, activity, metrics, checkpoint
rows), ``precision.json``, the reserve file, the final adapter (transformers' Trainer saves
models on process 0 only; each rank writes its own ``rng_state_<rank>.pth`` into a checkpoint,
which is the Trainer's design for an exact resume). The other ranks open the history only to
read: the run's spec, the dataset's rows and files.

What the ranks must agree on travels through the run's process group, never through the
database: rank 0's decisions before loading (precision, the dataset a sample task was imported
as, the checkpoint to resume from: ``share``), and once per optimizer step the stop request and
the step's token count (``sum_across``: one ``all_reduce`` of a few integers, made by every rank
at the same step, so no rank is ever left alone in a collective).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

# The process group's timeout (seconds): how long a rank waits in a collective for the others.
# A peer that dies is noticed at once without it (gloo's connection closes; torchrun's agent sees
# the exit and stops the other ranks), so this only bounds a peer that is alive but stuck, or a
# node that vanished from the network. torch's default, 30 minutes, would keep a multi-node job
# hanging for that long; 10 minutes is the supervisor's hang timeout (``launch.STALE_HEARTBEAT``)
# and so already the longest a step, a checkpoint or an evaluation may take without a heartbeat.
# Every rank runs the same evaluations (see ``studio.worker.train``), so no rank waits for
# another's exact-match generation. PEFT_STUDIO_DDP_TIMEOUT_S overrides it (a cluster job whose
# checkpoints take longer to write).
TIMEOUT_S = 600


def rank() -> int:
    """This process's global rank: ``RANK`` from the launcher, 0 without one."""
    return _env_int("RANK", 0)


def world_size() -> int:
    """How many processes train this run: ``WORLD_SIZE`` from the launcher, 1 without one."""
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's rank on its machine (its GPU index): ``LOCAL_RANK``, 0 without a launcher."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True for the one process that writes the run's records (rank 0)."""
    return rank() == 0


def distributed() -> bool:
    return world_size() > 1


def launcher_pid() -> int:
    """The process the run row's ``pid`` names: the launcher (torchrun's agent, the parent of
    every rank on its machine) under one, else this process."""
    return os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()


def timeout_s() -> int:
    value = os.environ.get("PEFT_STUDIO_DDP_TIMEOUT_S")
    if value is None:
        return TIMEOUT_S
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise RuntimeError(f"PEFT_STUDIO_DDP_TIMEOUT_S={value!r}: must be a whole number of seconds, "
                           "at least 1")
    return seconds


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} in the environment is not a whole number; it is set by "
                           "the launcher (torchrun, accelerate launch) and names this process") from None


def start_group(device: str) -> None:
    """Join the run's process group now, before the model and the data, so that rank 0's
    decisions can be shared (``share``). transformers' Trainer (accelerate's ``PartialState``)
    then uses this group instead of making its own. gloo on the CPU; on CUDA torch's pair (NCCL
    for CUDA tensors, gloo for the CPU objects shared here), with this rank's GPU chosen first.
    The timeout is ``timeout_s()``: transformers passes its ``ddp_timeout`` only on a GPU, so a
    CPU group would otherwise wait torch's default 30 minutes. Nothing to do with one process."""
    if not distributed():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()))


def end_group() -> None:
    """Leave the process group at the end of the worker (torch warns at exit otherwise)."""
    if not distributed():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def share(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled through the group); ``value`` with one process."""
    if not distributed():
        return value
    import torch.distributed as dist

    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(values: list[int]) -> list[int]:
    """The element-wise sum over every rank of a few integers: one ``all_reduce``, which every
    rank must call at the same point. With one process, the values themselves."""
    if not distributed():
        return [int(v) for v in values]
    import torch
    import torch.distributed as dist

    device = "cpu"
    if torch.cuda.is_available() and "gloo" not in str(dist.get_backend()):
        device = f"cuda:{local_rank()}"  # a NCCL-only group (started by someone else) takes CUDA tensors
    total = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [int(v) for v in total.tolist()]


# What a collective raises when another rank of the run is gone (killed, crashed, stopped by the
# launcher): torch's c10d errors, and gloo's socket errors as they read in torch 2.13.
_LOST_PEER_TEXT = ("connection closed by peer", "connection reset by peer", "broken pipe",
                   "socket timeout", "gloo", "nccl", "c10d", "process group")


def lost_peer(error: BaseException) -> bool:
    """True when ``error`` says that a collective failed because another rank is gone. Rank 0
    then leaves the run's end to the supervisor: the launcher's report, which ``launch.reconcile``
    reads, names the rank that died first, which rank 0 cannot know."""
    if not distributed():
        return False
    try:
        import torch.distributed as dist

        if isinstance(error, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        pass
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _LOST_PEER_TEXT)
