"""The registry of fine-tuning methods: one ``MethodSpec`` per name, table-driven everywhere.

Names are the ones the CLI and RunSpec use: lora, dora, rslora, loraplus, qlora, houlsby, prefix,
prompt, ia3, adalora, loha, lokr, vera, full, last_n.

GaLore (low-rank gradient projection) is not registered: see ``UNAVAILABLE``.
"""

from __future__ import annotations

from studio.methods import baselines, houlsby, ia3, lora, lora_variants, prompt_learning, qlora
from studio.methods.base import Count, MethodSpec, SettingError

REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for module in (lora, qlora, houlsby, prompt_learning, ia3, lora_variants, baselines)
    for spec in module.SPECS
}

ORDER = ["lora", "dora", "rslora", "loraplus", "qlora", "houlsby", "prefix", "prompt", "ia3",
         "adalora", "loha", "lokr", "vera", "full", "last_n"]
assert sorted(ORDER) == sorted(REGISTRY), "every registered method has a place in ORDER"

UNAVAILABLE = {
    "galore": "GaLore is not offered: its only implementation, galore-torch (used by transformers "
              "as optim='galore_adamw'), runs here on the CPU but has had no release since "
              "version 1.0 of March 2024, so it is not a maintained package to build on.",
}


def get_method(name: str) -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        hint = f" ({UNAVAILABLE[name]})" if name in UNAVAILABLE else ""
        raise SettingError(f"unknown method '{name}'{hint}; choose one of: {', '.join(ORDER)}") from None


def all_methods() -> list[MethodSpec]:
    return [REGISTRY[name] for name in ORDER]


__all__ = ["Count", "MethodSpec", "SettingError", "REGISTRY", "ORDER", "get_method", "all_methods"]
