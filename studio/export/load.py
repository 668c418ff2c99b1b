"""Rebuilding a run's trained model from its base and its saved adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio import models
from studio.adapters import bottleneck
from studio.methods import get_method
from studio.runspec import RunSpec


def load_trained(spec: RunSpec, folder: Path, dtype: str = "float32", dequantize: bool = False) -> Any:
    """The model as trained: base + adapter (PEFT or ours), or the saved whole model.

    ``dequantize``: for QLoRA, load the base in 4-bit exactly as trained, then expand it to
    ``dtype`` (so a merge lands in the weights the adapter was trained against).
    """
    method = get_method(spec.method)
    if method.whole_model:  # the run's "adapter" folder is the whole trained model
        return models.load_model(str(folder), dtype=dtype).eval()
    kwargs: dict[str, Any] = {}
    if method.quantization is not None:
        kwargs["quantization_config"] = method.quantization(method.params(spec.method_settings))
    base = models.load_model(spec.model, dtype=dtype, **kwargs)
    if method.quantized and dequantize:
        import torch

        base = base.dequantize()
        base.to(getattr(torch, dtype))
    if bottleneck.is_bottleneck_folder(folder):
        return bottleneck.load_bottleneck(base, folder).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder)).eval()
