"""The bake-off's measurement helpers that need no model: peak RSS and adapter file size."""

from __future__ import annotations

import subprocess
import sys

from studio.bakeoff.measure import weights_bytes
from studio.sysinfo import peak_rss_bytes

MB = 2**20


def test_peak_rss_is_the_process_own_not_inherited_from_its_parent():
    """A worker started by a worker must not report its parent's peak (ru_maxrss would)."""
    big = bytearray(600 * MB)
    for i in range(0, len(big), 4096):  # touch every page so it is resident
        big[i] = 1
    assert peak_rss_bytes() > 600 * MB
    del big
    code = ("import resource; from studio.sysinfo import peak_rss_bytes; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_rss_bytes())")
    inherited, own = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert own < 300 * MB  # a small Python process
    if sys.platform.startswith("linux"):
        assert inherited > 600 * MB  # the kernel quirk that own avoids


def test_adapter_size_counts_weight_files_only(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.bin").write_bytes(b"x" * 24)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5000)  # the tokenizer copy is not the adapter
    (tmp_path / "adapter_config.json").write_text("{}")
    assert weights_bytes(tmp_path) == 1024
