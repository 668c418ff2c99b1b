"""The worker's log hides the known-harmless library warnings a newcomer found alarming (issue 15
item 10: "Failed to load CPU gemm_4bit_forward … pip install kernels", a transformers
FutureWarning), says how many it hid, and never hides an error or an unlisted warning. Run in a
real child process, as the worker is, with the real bitsandbytes import."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from studio.worker import log_filter
log_filter.install()
import logging, warnings
import bitsandbytes  # on a CPU with AVX512-BF16 this logs the gemm_4bit_forward warning
logging.getLogger("bitsandbytes.x").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("This implementation of AdamW is deprecated and will be removed in a future version. "
              "Use the PyTorch implementation torch.optim.AdamW instead", FutureWarning)  # galore-torch's
logging.getLogger("bitsandbytes.x").error("Failed to load CPU gemm_4bit_forward from kernels-community: REAL")
logging.getLogger("somewhere").warning("an unlisted warning")
warnings.warn("`is_gradient_checkpointing` is deprecated (as a UserWarning)", UserWarning)
"""


def test_harmless_warnings_are_hidden_and_counted_errors_are_not():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert not any("kernels-community" in line and "REAL" not in line for line in lines), out.stderr
    assert not any("FutureWarning" in line for line in lines), out.stderr
    assert any("REAL" in line for line in lines)  # an error with the same words is shown
    assert any("an unlisted warning" in line for line in lines)
    assert any("UserWarning" in line for line in lines)  # the pattern is bound to its category
    summary = [line for line in lines if "known-harmless library warning" in line]
    assert len(summary) == 1 and summary[0].startswith("(")
