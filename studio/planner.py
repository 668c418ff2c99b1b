"""One call from (model, method, settings, training setup) to what the Method tab and
``peft-studio estimate`` show: the trainable count with its formula and the memory estimate.

``arch_for`` gets a model's ``ArchInfo`` without importing torch in the calling process: the
meta-device build runs once in a child process (``peft-studio info``) and its JSON is cached
under ``projects/models/arch/``, so the UI stays light and every later estimate is arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from typing import Any

from studio import config
from studio.arch import ArchInfo
from studio.estimate import TrainSetup, estimate_training, verdict
from studio.methods import get_method
from studio.models import ModelSourceError

# An adapter with more trainable parameters than this share of the model is flagged: it costs
# the memory and time of a large fine-tune, and past the layer width a low-rank update gains no
# capacity (rank r on a d-wide layer is at most rank d).
ADAPTER_SHARE_LIMIT = 0.25

_memory: dict[str, ArchInfo] = {}
_lock = threading.Lock()


def arch_for(source: str = config.DEFAULT_MODEL, trust_remote_code: bool = False) -> ArchInfo:
    """``ArchInfo`` for a model source: memory, then disk cache, then a child process."""
    source = (source or config.DEFAULT_MODEL).strip()
    with _lock:
        if source in _memory:
            return _memory[source]
        cache = config.model_fact_file(source, ".json")
        stamp = config.model_stamp(source)
        if cache.is_file():
            data = json.loads(cache.read_text())
            if data.get("stamp") == stamp:
                _memory[source] = ArchInfo.from_dict(data["arch"])
                return _memory[source]
        cmd = [sys.executable, "-m", "studio", "info", source]
        if trust_remote_code:
            cmd.append("--trust-remote-code")
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
            raise ModelSourceError(message.removeprefix("peft-studio info: "))
        info = ArchInfo.from_dict(json.loads(result.stdout))
        cache.write_text(json.dumps({"source": source, "stamp": stamp, "arch": info.to_dict()}))
        _memory[source] = info
        return info


def size_warnings(whole_model: bool, trainable: int, arch: ArchInfo) -> list[str]:
    """Why an adapter is larger than it can usefully be, for any method that is not the whole
    model (its size settings are the method's own: rank, width, tokens)."""
    share = trainable / arch.total_params
    if whole_model or share <= ADAPTER_SHARE_LIMIT:
        return []
    return [f"this adapter trains {share:.0%} as many parameters as the model has "
            f"(above {ADAPTER_SHARE_LIMIT:.0%} an adapter costs the memory and time of a large "
            f"fine-tune, and a rank above the layer width, d = {arch.hidden_size}, adds no capacity): "
            "lower its size settings (rank, width or virtual tokens)"]


def plan(arch: ArchInfo, method: str, settings: dict[str, Any] | None = None,
         setup: TrainSetup | None = None, gpu_free_bytes: int | None = None) -> dict[str, Any]:
    """Trainable count, formula and memory terms as one JSON-able dict. ``gpu_free_bytes``: the
    memory the verdict is judged against (``run_setup.memory_budget``: the GPU's free memory, or
    the available RAM on a CPU); None: no verdict ("unknown")."""
    spec = get_method(method)
    params = spec.params(settings or {})
    setup = setup or TrainSetup()
    if spec.quantized and setup.quant == "none":
        setup = TrainSetup(**{**asdict(setup), "quant": "nf4",
                              "double_quant": getattr(params, "bnb_4bit_use_double_quant", True)})
    count = spec.count(arch, params)
    estimate = estimate_training(arch, method, params, count.trainable, setup)
    return {
        "method": method,
        "title": spec.title,
        "family": spec.family,
        "mergeable": spec.mergeable,
        "inference_overhead": spec.inference_overhead,
        "trainable_params": count.trainable,
        "total_params": arch.total_params,
        "trainable_percent": 100.0 * count.trainable / arch.total_params,
        "formula": count.formula,
        "memory_bytes": estimate.as_dict(),
        "memory_formulas": {t.name: t.formula for t in estimate.terms},
        "total_bytes": estimate.total_bytes,
        "setup": asdict(setup),
        "settings": asdict(params),
        "verdict": verdict(estimate.total_bytes, gpu_free_bytes),
        "gpu_free_bytes": gpu_free_bytes,
        "warnings": size_warnings(spec.whole_model, count.trainable, arch),
    }
