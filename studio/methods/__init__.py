"""The registry of fine-tuning methods: one ``MethodSpec`` per name, table-driven everywhere.

Names are the ones the CLI and RunSpec use: lora, dora, rslora, loraplus, qlora, houlsby, prefix,
prompt, llama_adapter, ia3, adalora, loha, lokr, vera, oft, boft, galore, apollo (whole-model
training with a low-rank optimizer state), full, last_n.
"""

from __future__ import annotations

import importlib

from studio.methods.base import Count, MethodSpec, SettingError

# Methods this version knows of but does not offer: name -> why (``get_method`` says it, and
# ``register`` keeps the name free). GaLore, once listed here, is offered since issue 17.
UNAVAILABLE: dict[str, str] = {}


# The method modules of this package, in the order the UI lists their methods. A new method is
# one module (its MethodSpec in ``SPECS``, hooks included: see ``base.MethodSpec``) and its name
# here.
MODULES = ("lora", "qlora", "houlsby", "prompt_learning", "adaption_prompt", "ia3", "lora_variants", "oft", "galore", "baselines")

REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    """Add a method to the registry; a name taken (or reserved in ``UNAVAILABLE``) is refused."""
    if spec.name in REGISTRY or spec.name in UNAVAILABLE:
        raise ValueError(f"a method named '{spec.name}' is already registered or reserved")
    REGISTRY[spec.name] = spec


for _module in MODULES:
    for _spec in importlib.import_module(f"studio.methods.{_module}").SPECS:
        register(_spec)

ORDER = list(REGISTRY)  # the built-in methods' names, in the order listed


def get_method(name: str) -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        hint = f" ({UNAVAILABLE[name]})" if name in UNAVAILABLE else ""
        raise SettingError(f"unknown method '{name}'{hint}; choose one of: {', '.join(REGISTRY)}") from None


def all_methods() -> list[MethodSpec]:
    """Every registered method, in the order listed."""
    return list(REGISTRY.values())


__all__ = ["Count", "MethodSpec", "SettingError", "REGISTRY", "ORDER", "MODULES", "register", "get_method",
           "all_methods"]
