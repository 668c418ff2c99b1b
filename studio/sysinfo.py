"""What this machine offers for training: CPU, RAM, disk and GPUs.

GPU facts come from ``torch.cuda``, but the UI process must not import torch (it costs seconds
and memory before the user needs a model), so they are read in a short-lived child process once
and cached. RAM and disk come from psutil in-process. Facts that are slow to measure and true of
the machine for good (the worker's precision probe: ``worker/precision.py``) are kept on disk in
``system-facts.json`` beside the history (``cached_fact`` / ``store_fact``), keyed by what they
depend on (the CPU model is part of every such key: a home moved to another machine re-measures).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from typing import Any

import psutil

from studio import config

_PROBE = r"""
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        with torch.cuda.device(i):  # the worker's test for precision auto (studio.run_setup)
            bf16 = torch.cuda.is_bf16_supported()
        gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "free_bytes": free,
                     "total_bytes": total, "bf16": bf16})
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus}))
"""

_lock = threading.Lock()
_cached: dict[str, Any] | None = None


def probe_accelerators(timeout: float = 120.0) -> dict[str, Any]:
    """torch version and GPUs, read in a child process; cached after the first success."""
    global _cached
    with _lock:
        if _cached is not None:
            return _cached
        try:
            out = subprocess.run(
                [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            info = json.loads(out.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, json.JSONDecodeError, IndexError, OSError) as exc:
            return {"torch": None, "cuda": None, "gpus": [], "error": f"probe failed: {exc}"}
        _cached = info
        return info


FACTS_NAME = "system-facts.json"


def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Platinum 8481C ..."), for keys of measured facts.
    ``platform.processor()`` is often just "x86_64" on Linux: /proc/cpuinfo says more."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _facts_path():
    return config.projects_dir() / FACTS_NAME


def cached_fact(key: str) -> Any:
    """A measured fact stored by ``store_fact``, or None. An unreadable file counts as empty:
    the fact is measured again."""
    try:
        return json.loads(_facts_path().read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def store_fact(key: str, value: Any) -> None:
    """Store a measured fact (JSON-able); written atomically (a temporary file, then a rename),
    so two workers never leave half a file. Best effort: a fact that cannot be saved is
    measured again next time."""
    path = _facts_path()
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
        facts = facts if isinstance(facts, dict) else {}
    except (OSError, ValueError):
        facts = {}
    facts[key] = value
    tmp = path.with_name(f".{FACTS_NAME}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(facts, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def available_ram_bytes() -> int:
    """RAM a new process can use without swapping (psutil's "available": free plus reclaimable
    page cache), read now: what a CPU run's memory estimate is judged against."""
    return int(psutil.virtual_memory().available)


def host_summary() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(config.projects_dir()))
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=True),
        "ram_total_bytes": memory.total,
        "ram_available_bytes": memory.available,
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
        "projects_dir": str(config.projects_dir()),
    }


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def summary_markdown(accel: dict[str, Any] | None = None) -> str:
    host = host_summary()
    accel = accel if accel is not None else probe_accelerators()
    lines = [
        f"**CPU**: {host['cpu']}, {host['cores']} logical cores",
        f"**RAM**: {gib(host['ram_available_bytes'])} free of {gib(host['ram_total_bytes'])}",
        f"**Disk** ({host['projects_dir']}): {gib(host['disk_free_bytes'])} free "
        f"of {gib(host['disk_total_bytes'])}",
    ]
    if accel.get("gpus"):
        for gpu in accel["gpus"]:
            lines.append(
                f"**GPU {gpu['index']}**: {gpu['name']}, {gib(gpu['free_bytes'])} free "
                f"of {gib(gpu['total_bytes'])}"
            )
        lines.append("**Device**: CUDA (training runs on the GPU)")
    else:
        lines.append("**GPU**: none detected")
        lines.append("**Device**: CPU (training runs on the processor; expect minutes, not seconds)")
    if accel.get("torch"):
        lines.append(f"**PyTorch**: {accel['torch']}" + (f", CUDA {accel['cuda']}" if accel.get("cuda") else ""))
    if accel.get("error"):
        lines.append(f"*GPU probe: {accel['error']}*")
    return "  \n".join(lines)


def peak_rss_bytes() -> int:
    """This process's own peak resident set (memory high-water mark), in bytes.

    Not ``getrusage(...).ru_maxrss`` first: Linux carries ru_maxrss across fork and exec, so a
    worker started by a bigger process (the worker before it in the queue, or the UI) reports
    that process's peak when it was higher (measured: a 46 MB child read 811 MB). VmHWM in
    /proc/self/status belongs to the memory map exec created. Elsewhere: ru_maxrss (macOS
    bytes, others kB), or on Windows psutil's peak working set."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
