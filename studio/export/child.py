"""Running an export in a child process (``peft-studio export``), for the UI.

An export loads the whole model, merges it and reloads it to verify: seconds to minutes of
torch work and gigabytes of memory. Done on a Gradio handler thread it imported torch into the
UI process (which otherwise never loads it), kept the model's memory there afterwards, and
competed with every other handler for the interpreter. In a child the UI only waits on a pipe:
the child prints ``[ 40%] message`` progress lines (forwarded to ``progress``) and, at the end,
the export row as JSON; a refusal is its one ``peft-studio export: <reason>`` line on stderr
with exit code 2, raised here as ``ExportError`` with that reason. The child uses the same
history and the same ``export_run`` as the command line, so both behave identically.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

from studio.export.target import ExportError

_PROGRESS = re.compile(r"^\[\s*(\d+)%\] (.*)$")
PREFIX = "peft-studio export: "


def export_in_child(run_id: int, kind: str, dtype: str, *, checkpoint: int | None = None,
                    shard_size: str = "2GB", dest: str | None = None, overwrite: bool = False,
                    verify: bool = True, progress: Callable[[float, str], None] | None = None,
                    timeout: float = 6 * 3600) -> dict[str, Any]:
    """Export in ``python -m studio export``; the export's JSON (id, path, status, size_bytes,
    verification). ``ExportError`` with the child's reason when it refuses or fails."""
    report = progress or (lambda fraction, message: None)
    argv = [sys.executable, "-m", "studio", "export", str(int(run_id)), "--kind", kind, "--dtype", dtype,
            "--shard-size", shard_size or "2GB"]
    if checkpoint is not None:
        argv += ["--checkpoint", str(int(checkpoint))]
    if dest:
        argv += ["--dest", dest]
    if overwrite:
        argv.append("--overwrite")
    if not verify:
        argv.append("--no-verify")
    # stderr to a file, not a pipe: library warnings could fill a pipe nobody reads until the end
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rest = []
        try:
            for line in proc.stdout:
                match = _PROGRESS.match(line.rstrip("\n"))
                if match:
                    report(int(match.group(1)) / 100, match.group(2))
                else:
                    rest.append(line)
            code = proc.wait(timeout=timeout)
        except BaseException:  # the handler was cancelled: the export must not run on unseen
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        stderr = err.read()
    if code == 2 and PREFIX in stderr:
        raise ExportError(stderr[stderr.rindex(PREFIX) + len(PREFIX):].strip())
    try:
        return json.loads("".join(rest))
    except ValueError:
        tail = stderr.strip()[-1500:] or "".join(rest)[-1500:]
        raise ExportError(f"the export process ended with exit code {code}: {tail}") from None
