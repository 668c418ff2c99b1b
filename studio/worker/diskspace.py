"""A full disk during training: end the run "failed: disk full", saying how much space a
checkpoint needs and how much was free, and record it although the disk is full.

Recording needs space too: SQLite appends every transaction to its WAL file first, so on a
full disk even "this run failed" cannot be written, and the run would stay "running" under a
dead worker. The worker therefore keeps a ``Reserve``: a few MiB allocated in the run folder
when it starts (``posix_fallocate``: really allocated, unlike a sparse file) and deleted right
before the failure is recorded. The run folder is on the history's disk unless someone mounted
the projects elsewhere; then SQLite's writes simply wait (``resilient``) for space to come back.

A failed save leaves a half-written ``checkpoint-N`` folder (transformers writes into it
directly); it is removed before anything else, so it is never listed or resumed from, and the
space it took is free again. Recognising the failure: an ``OSError`` with ENOSPC/EDQUOT anywhere
in the exception chain, the same as text inside another library's error (safetensors: "No space
left on device (os error 28)"), or, for errors that do not say it (``torch.save`` reports only
"unexpected pos ..."), a write error with less space free than a checkpoint needs.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

from studio.errors import exception_chain, is_out_of_space
from studio.worker.resilient import say

RESERVE_NAME = ".disk-reserve"
RESERVE_BYTES = 4 * 2**20  # a status write takes a few pages of WAL; 4 MiB is ample
MIN_FREE_BYTES = 2**20  # with no estimate, a write error with less free than this is a full disk
EXTRA_STATE_BYTES = 256 * 2**10  # configs, trainer state, scheduler, RNG state: tens of KiB
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
WRITE_TEXTS = ("write", "i/o", "serializ", "unexpected pos", "iostream")


class Reserve:
    """``RESERVE_BYTES`` held in the run folder while the worker runs."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / RESERVE_NAME
        self.held = False

    def claim(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, RESERVE_BYTES)
                except OSError as exc:
                    if exc.errno in FULL_ERRNOS:
                        raise
                    # No fallocate on this file system: write the bytes (random, so that a
                    # compressing file system really stores them).
                    os.ftruncate(fd, 0)
                    for _ in range(RESERVE_BYTES // 2**20):
                        os.write(fd, os.urandom(2**20))
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            say(f"could not reserve {RESERVE_BYTES // 2**20} MiB to record a full disk: {exc}")
        return self.held

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        self.held = False


def says_disk_full(error: BaseException) -> bool:
    """The error itself says so (an errno or a library's words: ``errors.is_out_of_space``)."""
    return is_out_of_space(error)


def looks_like_write_error(error: BaseException) -> bool:
    return any(isinstance(exc, OSError) or any(t in str(exc).lower() for t in WRITE_TEXTS)
               for exc in exception_chain(error))


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def mount_point(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def checkpoint_need(trainer: Any, checkpoints: Path, complete: set[int]) -> tuple[int, str]:
    """(bytes, how they were counted) for one checkpoint of this run: the size of the last
    complete one if there is one (exact), else the sum of its parts (an estimate)."""
    for step in sorted(complete, reverse=True):
        folder = checkpoints / f"checkpoint-{step}"
        if folder.is_dir():
            size = folder_bytes(folder)
            return size, f"the checkpoint at step {step} took {human(size)}"
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    optimizer = 0
    if trainer.optimizer is not None and trainer.optimizer.state:
        for state in trainer.optimizer.state.values():
            optimizer += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
    else:  # before the first optimizer step: what the optimizer will hold per parameter
        per = {"sgd": 0, "adamw_bnb_8bit": 2}.get(str(trainer.args.optim).split(".")[-1].lower(), 8)
        optimizer = sum(p.numel() for p in params) * per
    tokenizer = 0
    backend = getattr(trainer.processing_class, "backend_tokenizer", None)
    if backend is not None:
        tokenizer = len(backend.to_str().encode())  # tokenizer.json, the bulk of a saved tokenizer
    need = weights + optimizer + tokenizer + EXTRA_STATE_BYTES
    return need, (f"trainable weights {human(weights)}, optimizer state {human(optimizer)}, "
                  f"tokenizer {human(tokenizer)}, trainer state about {human(EXTRA_STATE_BYTES)}")


def remove_unfinished(checkpoints: Path, complete: set[int]) -> list[str]:
    """Remove ``checkpoint-N`` folders that are not complete checkpoints (not in ``complete``:
    the steps saved to the end, by this worker or recorded before). Links are unlinked, never
    followed. Returns the names removed."""
    removed = []
    if not checkpoints.is_dir() or checkpoints.is_symlink():
        return removed
    for entry in checkpoints.iterdir():
        prefix, _, step = entry.name.partition("-")
        if prefix != "checkpoint" or not step.isdigit() or int(step) in complete:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def human(size: int | float | None) -> str:
    if size is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def diagnose(error: BaseException, folder: Path, trainer: Any, complete: set[int],
             partial_adapter: bool) -> str | None:
    """If ``error`` is the disk filling up: clean what was half written and return the run's
    error text ("disk full: ..."); else None and nothing is touched.

    ``complete``: the checkpoint steps known to be whole; ``partial_adapter``: the final adapter
    folder was being written when it failed."""
    checkpoints = folder / "checkpoints"
    free_now = free_bytes(folder)
    try:
        need, counted = checkpoint_need(trainer, checkpoints, complete) if trainer is not None else (None, "")
    except Exception as exc:  # the estimate is a courtesy; the diagnosis must not fail on it
        need, counted = None, f"(could not estimate: {exc})"
    if not says_disk_full(error):  # a write error that does not say why: judge by the space left
        if not looks_like_write_error(error) or free_now is None or free_now >= (need or MIN_FREE_BYTES):
            return None
    removed = remove_unfinished(checkpoints, complete)
    if partial_adapter and (folder / "adapter").is_dir():
        shutil.rmtree(folder / "adapter", ignore_errors=True)
        removed.append("adapter")
    free = free_bytes(folder)
    step = getattr(getattr(trainer, "state", None), "global_step", None)
    last = max(complete) if complete else None
    lines = [f"disk full: the run stopped at step {step} because {mount_point(folder)} has no space "
             f"left (run folder {folder})."]
    if need is not None:
        lines.append(f"A checkpoint of this run needs about {human(need)} ({counted}); "
                     f"{human(free)} are free now" + (f" after removing the unfinished {', '.join(removed)}"
                                                       if removed else "") + ".")
        if free is not None and need > free:
            lines.append(f"Free at least {human(need - free)} more (old runs, exports, other files), "
                         "or move PEFT_STUDIO_HOME to a larger disk.")
    elif removed:
        lines.append(f"Removed the unfinished {', '.join(removed)}.")
    lines.append("Then Resume: it continues from " + (f"the checkpoint at step {last}." if last
                                                         else "the start (no checkpoint was saved)."))
    last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1][:500]
    lines.append(f"\nThe error: {type(error).__name__}: {last_line}")
    return "\n".join(lines)
