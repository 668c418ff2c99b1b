"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for
NLP"), for causal LMs. PEFT has no such method, so this is ours.

Two adapters per decoder block: one on the attention output, one on the MLP output, each applied
before the block's residual add. An adapter maps h ∈ R^d to

    h + W_up · σ(W_down · h + b_down) + b_up,    W_down ∈ R^{r×d}, W_up ∈ R^{d×r}

with σ = GELU (or ReLU) and W_up, b_up initialised to zero, so the model starts exactly as the
base. Parameters per adapter: d·r + r + r·d + d = 2·d·r + r + d; per model L·2·(2·d·r + r + d).

We wrap the attention's output projection and the MLP's output projection (the Linear modules
whose output goes straight into the residual stream), which is the same as adapting the
sub-layer output. The adapters cannot be merged into the weights: σ is non-linear.

On disk an adapter folder holds ``bottleneck_config.json`` (method, r, activation, d, wrapped
module names) and ``adapter_model.safetensors`` (only the adapter tensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Bottleneck(nn.Module):
    def __init__(self, d: int, r: int, activation: str = "gelu"):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class WithBottleneck(nn.Module):
    """A sub-layer output projection followed by its adapter."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        return self.adapter(out) if self.enabled else out


def output_projections(model: nn.Module, hidden_size: int) -> list[str]:
    """Names of the attention and MLP output projections of every block (out == d)."""
    from studio.arch import _LAYER_INDEX, _linear_kind, _role

    names = []
    for name, module in model.named_modules():
        kind = _linear_kind(module)
        match = _LAYER_INDEX.match(name)
        if kind is None or match is None:
            continue
        out_features = module.out_features if kind == "linear" else module.weight.shape[1]
        if out_features == hidden_size and _role(match.group("rest")) in ("attention", "mlp"):
            names.append(name)
    # Keep the last output projection of each sub-layer (attention: o_proj, not q_proj).
    last: dict[tuple[str, str], str] = {}
    for name in names:
        match = _LAYER_INDEX.match(name)
        last[(match.group("idx"), _role(match.group("rest")))] = name
    return sorted(last.values(), key=names.index)


def add_bottleneck_adapters(model: nn.Module, hidden_size: int, r: int, activation: str = "gelu") -> nn.Module:
    """Freeze the model and insert trainable adapters after each sub-layer output projection."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    targets = output_projections(model, hidden_size)
    if not targets:
        raise ValueError("found no attention/MLP output projection to attach adapters to")
    for p in model.parameters():
        p.requires_grad_(False)
    ref = next(model.parameters())
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = Bottleneck(hidden_size, r, activation)
        if ref.device.type != "meta":
            adapter.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        setattr(parent, child, WithBottleneck(getattr(parent, child), adapter))
    model.bottleneck_config = {"method": "houlsby", "r": r, "activation": activation,
                               "hidden_size": hidden_size, "modules": targets}
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".adapter." in k}


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, WithBottleneck):
            module.enabled = enabled


def save_bottleneck(model: nn.Module, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(model.bottleneck_config, indent=2))
    return folder


def is_bottleneck_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load_bottleneck(model: nn.Module, folder: str | Path) -> nn.Module:
    """Insert adapters as described by ``folder`` into a plain base model and load their weights."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = add_bottleneck_adapters(model, config["hidden_size"], config["r"], config["activation"])
    if model.bottleneck_config["modules"] != config["modules"]:
        raise ValueError(f"{folder} was trained on a model with different modules")
    state = load_file(str(folder / WEIGHTS_NAME))
    missing = set(adapter_state_dict(model)) - set(state)
    if missing:
        raise ValueError(f"{folder / WEIGHTS_NAME} lacks {len(missing)} adapter tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False)
    return model
