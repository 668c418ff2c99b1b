"""What a Compare column is asked with and what it answers: plain dataclasses, no torch.

Apart from the generation code so that the UI can build and check settings without importing
torch (the UI process loads torch only when a model is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    sample: bool = False  # False: greedy
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 64
    seed: int = 0

    def validated(self) -> "GenerationSettings":
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max new tokens must be between 1 and 4096, got {self.max_new_tokens}")
        if self.sample and not (0 < self.temperature <= 5):
            raise ValueError(f"temperature must be in (0, 5], got {self.temperature}")
        if self.sample and not (0 < self.top_p <= 1):
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        return replace(self, seed=int(self.seed))

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.sample:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class ColumnAnswer:
    column: str
    text: str
    tokens: int
    seconds: float
    path: str  # "batched" (one generate with adapter_names) or "switched" (its own generate)
    stopped: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
