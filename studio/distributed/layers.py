"""The name of a model's decoder-layer class: FSDP's wrap unit (``fsdp_transformer_layer_cls_to_wrap``).

FSDP shards and gathers one *unit* at a time; for a transformer the unit is one decoder block
(PEFT's ``fsdp_auto_wrap_policy`` adds each trainable adapter Linear as a unit of its own). The
name is a class name (``LlamaDecoderLayer``), which only the model's Python code knows, so it is
read by building the model on the meta device in a child process (``python -m
studio.distributed.layers MODEL``: the UI and the CLI never import torch) and cached beside the
planner's ``ArchInfo`` cache, keyed the same way (a local folder by its real path and its
config's mtime).

The rule: of the model's ``ModuleList``s whose children are all one class, the one holding the
most parameters is the stack of decoder blocks; its children's class is the answer. This reads
the real module tree rather than ``_no_split_modules`` (a list that some models leave empty and
that may name vision blocks first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from studio import config


class LayerClassError(ValueError):
    """The model's decoder-layer class could not be read (the message says why)."""


def decoder_layer_class(source: str, trust_remote_code: bool = False, timeout: float = 300) -> str:
    """The decoder-layer class name of model ``source`` (cached; a child process the first time)."""
    source = (source or config.DEFAULT_MODEL).strip()
    cache, stamp = config.model_fact_file(source, ".layer.json"), config.model_stamp(source)
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("stamp") == stamp and data.get("layer_class"):
                return str(data["layer_class"])
        except (OSError, ValueError):
            pass  # a damaged cache file is read again from the model
    cmd = [sys.executable, "-m", "studio.distributed.layers", source]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise LayerClassError(f"cannot read the decoder-layer class of {source}: "
                              f"{lines[-1] if lines else 'the reading process failed'}")
    name = json.loads(result.stdout)["layer_class"]
    cache.write_text(json.dumps({"source": source, "stamp": stamp, "layer_class": name}))
    return name


def layer_class_of(model: Any) -> str:
    """The decoder-layer class of a built model (meta or real): see the module docstring."""
    import torch

    best, best_params = None, -1
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = type(module[0]).__name__, params
    if best is None:
        raise LayerClassError(f"{type(model).__name__} has no stack of repeated layers to wrap")
    return best


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m studio.distributed.layers")
    parser.add_argument("model")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from studio.arch import build_on_meta
    from studio.models import load_config

    model = build_on_meta(load_config(args.model, args.trust_remote_code), args.trust_remote_code)
    print(json.dumps({"layer_class": layer_class_of(model)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
