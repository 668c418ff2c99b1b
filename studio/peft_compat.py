"""PEFT's prompt-learning generation under transformers 5: the cache keyword it no longer sees.

transformers 5 renamed the generation cache keyword from ``past_key_values`` to ``cache``
(``GenerationMixin.prepare_inputs_for_generation`` takes and returns ``cache``). PEFT 0.21.2's
``PeftModelForCausalLM.prepare_inputs_for_generation`` still looks for ``past_key_values``, so for
prompt-learning adapters it never sees the cache:

- **prefix tuning**: it puts the prefix's keys/values under ``past_key_values``, the model's
  forward takes the (empty) ``cache`` instead, and every answer is the base model's, token for
  token, although the adapter's forward differs (measured: logits differ by 1.15, greedy answers
  identical to the base);
- **prompt tuning**: it believes every step is the first and prepends the virtual tokens again at
  each decoding step, so answers drift from the third token on.

Training is unaffected (it runs the forward, not ``generate``), but everything that generates —
exact match during training and in the bake-off, Compare, the serve engine, export checks —
scored or showed the wrong answers for these two methods.

``install()`` wraps the class method once: the base model's returned inputs are shown to PEFT
under the old name and handed back to the model under the new one. With a transformers that
still uses ``past_key_values`` nothing is renamed, and a PEFT that reads ``cache`` itself gets
inputs it understands either way. ``tests/test_peft_compat.py`` checks ``generate`` against
greedy decoding with the full forward, for both methods.
"""

from __future__ import annotations

import functools
from typing import Any

_installed = False
NEW_KEY, OLD_KEY = "cache", "past_key_values"


def install() -> None:
    """Patch ``PeftModelForCausalLM.prepare_inputs_for_generation`` (idempotent)."""
    global _installed
    if _installed:
        return
    from peft import PeftModelForCausalLM

    original = PeftModelForCausalLM.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare_inputs_for_generation(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not self.active_peft_config.is_prompt_learning:
            return original(self, *args, **kwargs)
        inner = self.base_model_prepare_inputs_for_generation
        renamed = False

        def with_old_name(*a: Any, **k: Any) -> dict[str, Any]:
            nonlocal renamed
            out = inner(*a, **k)
            if NEW_KEY in out and OLD_KEY not in out:
                out[OLD_KEY] = out.pop(NEW_KEY)
                renamed = True
            return out

        self.base_model_prepare_inputs_for_generation = with_old_name
        try:
            out = original(self, *args, **kwargs)
        finally:
            self.base_model_prepare_inputs_for_generation = inner
        if renamed and OLD_KEY in out:
            out[NEW_KEY] = out.pop(OLD_KEY)
        return out

    PeftModelForCausalLM.prepare_inputs_for_generation = prepare_inputs_for_generation
    _installed = True
