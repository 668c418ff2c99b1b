"""Answering prompts with a model and scoring the answers on a sample task's eval split.

One place for "render a user message through the chat template, generate greedily, cut the
answer" so that the base-model figures in docs/benchmarks.md, the trainer's eval callback and the
Compare tab's "score on eval set" all measure the same thing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from studio.samples import get_task, load_rows, prompt_text
from studio.samples.scoring import exact_match

DEFAULT_MAX_NEW_TOKENS = 48  # the longest sample answer (JSON) is ~25 tokens


def chat_prompts(tokenizer: Any, user_messages: list[str], system_prompt: str | None = None) -> list[str]:
    """Each user message rendered through the tokenizer's chat template, ready for generation."""
    rendered = []
    for message in user_messages:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": message})
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def generate_answers(
    model: Any,
    tokenizer: Any,
    user_messages: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding (so every row's answer starts at one column)."""
    import torch

    texts = chat_prompts(tokenizer, user_messages, system_prompt)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return answers


@dataclass
class TaskScore:
    task: str
    split: str
    examples: int
    correct: int
    seconds: float
    predictions: list[str] = field(default_factory=list, repr=False)

    @property
    def exact_match(self) -> float:
        return self.correct / self.examples if self.examples else 0.0


def score_task(
    model: Any, tokenizer: Any, task_name: str, split: str = "eval", limit: int | None = None,
    **generate_kwargs: Any,
) -> TaskScore:
    task = get_task(task_name)
    rows = load_rows(task, split)[:limit]
    started = time.perf_counter()
    predictions = generate_answers(model, tokenizer, [prompt_text(r) for r in rows], **generate_kwargs)
    correct = sum(exact_match(task_name, p, r["output"]) for p, r in zip(predictions, rows))
    return TaskScore(task_name, split, len(rows), correct, time.perf_counter() - started, predictions)
