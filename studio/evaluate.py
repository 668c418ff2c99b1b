"""Answering prompts with a model and scoring the answers by exact match on held-out rows.

One place for "render the prompt through the chat template, generate greedily, cut the answer"
so that the base-model figures in docs/benchmarks.md, the trainer's eval callback, the bake-off
and the Compare tab's "score on eval set" all measure the same thing. Two kinds of held-out rows
are scored:

* a sample task's eval split (``score_task``), with the task's own light normalisation
  (``studio.samples.scoring``);
* an imported dataset's canonical eval rows (``score_dataset``): chat rows are scored on their
  final assistant message, compared after whitespace normalisation (``normalise_answer``).
  Plain-text rows have no answer to match and are not scored.

Generation is the slow part of an evaluation (minutes for 50 answers on a 2-core CPU), so it
reports as it goes: a caller that wraps it in ``reporting(listener)`` gets
``listener(done, total, batch_end)`` after every generated token and after every batch of answers
(``done``: answers finished so far), which is how the training worker keeps its heartbeat and its
"evaluating (k of n)" state alive. The listener may raise to abandon the evaluation (the worker
does on a stop request): the exception leaves the scoring function, so no score of the answers
generated so far is ever returned as if the evaluation were complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from studio.samples import get_task, load_rows, prompt_text
from studio.samples.scoring import exact_match

DEFAULT_MAX_NEW_TOKENS = 48  # the longest sample answer (JSON) is ~25 tokens
# Imported data: the answer budget is the longest reference in tokens plus this margin (the
# end-of-turn token, whitespace the comparison forgives, a tokenisation other than the
# reference's), never more than the cap: exact match is for short answers, and a model that
# never stops would otherwise cost rows × cap tokens of CPU time per evaluation.
ANSWER_MARGIN_TOKENS = 16
MAX_ANSWER_TOKENS = 256

# (answers done, answers in all, True when a batch of answers has just ended: a point that every
# process of a multi-process run reaches at once, unlike a token count, see studio.worker.eval_stop)
Listener = Callable[[int, int, bool], None]
_listener: ContextVar[Listener | None] = ContextVar("evaluate_listener", default=None)


@contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Within the block, every generation here calls ``listener(done, total, batch_end)`` once
    per generated token and once after each batch (a context variable rather than a parameter:
    the scorers are built by the worker and called by the trainer's callback, and neither should
    thread it through). Whatever the listener raises ends the generation and the scoring."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def _token_ticker(listener: Listener, done: int, total: int) -> Any:
    """A stopping criterion that never stops generation: it only tells ``listener`` that one
    more token was generated (transformers calls it once per decoding step). An exception the
    listener raises passes through ``generate``: that is how an evaluation is abandoned."""
    import torch
    from transformers import StoppingCriteria

    class Tick(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            listener(done, total, False)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    return Tick()


def chat_prompts(tokenizer: Any, user_messages: list[str], system_prompt: str | None = None) -> list[str]:
    """Each user message rendered through the tokenizer's chat template, ready for generation."""
    conversations = []
    for message in user_messages:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": message})
        conversations.append(messages)
    return [render_prompt(tokenizer, m) for m in conversations]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A conversation up to the answer, with the generation prompt (the assistant header): the
    same prefix ``studio.data.tokenize`` finds before each assistant turn when training."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_answers(
    model: Any,
    tokenizer: Any,
    user_messages: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers to single user messages (see ``answer_prompts``)."""
    return answer_prompts(model, tokenizer, chat_prompts(tokenizer, user_messages, system_prompt),
                          max_new_tokens=max_new_tokens, batch_size=batch_size)


def answer_prompts(model: Any, tokenizer: Any, texts: list[str], *,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8) -> list[str]:
    """Greedy answers to rendered prompts, batched with left padding (so every row's answer
    starts at one column), special tokens dropped and surrounding whitespace stripped."""
    import torch

    from transformers import StoppingCriteriaList

    listener = _listener.get()
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            extra = {} if listener is None else {
                "stopping_criteria": StoppingCriteriaList([_token_ticker(listener, start, len(texts))])}
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, **extra)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if listener is not None:
                listener(len(answers), len(texts), True)
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
    skipped: int = 0  # imported rows looked at but not scorable (see ``eval_examples``)

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


# ---- imported datasets ---------------------------------------------------------------------

def normalise_answer(text: str) -> str:
    """The comparison form of an answer and of a reference: surrounding whitespace stripped and
    every run of whitespace inside (spaces, tabs, newlines; Unicode whitespace as ``str.split``
    defines it) replaced by one space. Nothing else is forgiven: case, punctuation and wording
    must match. Imported data can be anything, so only what no reader would call a different
    answer (a trailing newline, a double space, a reflowed line) is ignored."""
    return " ".join(text.split())


@dataclass
class EvalExamples:
    """The scorable eval rows of an imported dataset: for each, the messages before its final
    assistant turn (system messages included) and that turn's content, the reference."""

    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    skipped: int = 0  # rows looked at that end without an assistant turn or answer too long
    reason: str | None = None  # why there is nothing to score, when there is nothing
    longest_reference_tokens: int = 0

    @property
    def answer_budget(self) -> int:
        """max_new_tokens for these references: the longest in tokens plus the margin, capped."""
        return min(self.longest_reference_tokens + ANSWER_MARGIN_TOKENS, MAX_ANSWER_TOKENS)

    def __len__(self) -> int:
        return len(self.references)


def eval_examples(rows: Any, tokenizer: Any, limit: int | None = None) -> EvalExamples:
    """The first ``limit`` scorable rows (all when None) of canonical rows (a ``datasets.Dataset``
    or a list of dicts, see ``studio.data.store``).

    Skipped, and counted in ``skipped``: a chat row whose last message is not from the assistant
    (nothing to compare with), and one whose reference is longer than ``MAX_ANSWER_TOKENS`` minus
    the margin (no answer within the budget could match it, so it would be a miss whatever the
    model). Plain-text rows and an empty split give no examples and a ``reason``; the train split
    is never used instead: scoring on trained rows would measure memorisation."""
    if len(rows) == 0:
        return EvalExamples(reason="the dataset's eval split is empty")
    columns = rows.column_names if hasattr(rows, "column_names") else list(rows[0])
    if "messages" not in columns:
        return EvalExamples(reason="a plain-text dataset has no answers to match")
    out = EvalExamples()
    longest = MAX_ANSWER_TOKENS - ANSWER_MARGIN_TOKENS
    for row in rows:  # a Dataset yields dicts lazily, so a limit reads only what it needs
        if limit is not None and len(out) >= limit:
            break
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"] or []]
        if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
            out.skipped += 1
            continue
        reference = messages[-1]["content"]
        tokens = len(tokenizer(reference, add_special_tokens=False)["input_ids"])
        if tokens > longest:
            out.skipped += 1
            continue
        out.conversations.append(messages[:-1])
        out.references.append(reference)
        out.longest_reference_tokens = max(out.longest_reference_tokens, tokens)
    if not out.references:
        out.reason = (f"none of the {out.skipped} eval rows looked at ends with an assistant answer "
                      f"of at most {longest} tokens")
    return out


def score_examples(model: Any, tokenizer: Any, examples: EvalExamples, *, name: str = "dataset",
                   batch_size: int = 8, max_new_tokens: int | None = None) -> TaskScore | None:
    """Exact match (``normalise_answer`` on both sides) of greedy answers; None when there is
    nothing to score, so that callers record nothing rather than a 0 % of no rows."""
    if not examples.references:
        return None
    started = time.perf_counter()
    budget = max_new_tokens if max_new_tokens is not None else examples.answer_budget
    prompts = [render_prompt(tokenizer, c) for c in examples.conversations]
    predictions = answer_prompts(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    correct = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, examples.references))
    return TaskScore(name, "eval", len(predictions), correct, time.perf_counter() - started, predictions,
                     examples.skipped)


def score_dataset(model: Any, tokenizer: Any, rows: Any, limit: int | None = None, *,
                  name: str = "dataset", **generate_kwargs: Any) -> TaskScore | None:
    """Exact match on an imported dataset's eval rows (``eval_examples`` then ``score_examples``);
    None for a plain-text dataset, an empty eval split or one without a scorable row."""
    return score_examples(model, tokenizer, eval_examples(rows, tokenizer, limit), name=name, **generate_kwargs)
