"""The serving benchmark's clients (``bench/serve.py``): who asks what, the HTTP requests, and the
figures one configuration yields (tokens, wall time, latencies, the answers' texts).

Threads, not processes: each client spends its time waiting on the server's answer over HTTP, so
the interpreter's lock is not what limits them (the server is a child process of its own).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

PROMPTS = (
    "Write one sentence about the sea.", "What is the capital of France?", "Name three colours.",
    "Explain what a list is in Python.", "Give me a tip for sleeping well.", "What is 12 times 7?",
    "Describe a cat in a few words.", "Why is the sky blue?", "Suggest a name for a small dog.",
    "What does a compiler do?", "Write a short greeting for a friend.", "How many days are in a week?",
    "What is photosynthesis?", "Tell me a fact about the moon.", "What is a prime number?",
    "Translate 'thank you' into Spanish.",
)


@dataclass(frozen=True)
class Request:
    model: str
    prompt: str


@dataclass
class Result:
    tokens: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    answers: dict[Request, str] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def percentile(self, p: float) -> float:
        """Nearest rank: the smallest latency with at least p % of the requests at or below it,
        i.e. sorted[ceil(p / 100 · n) − 1]."""
        ranked = sorted(self.latencies)
        return ranked[max(0, math.ceil(p / 100 * len(ranked)) - 1)] if ranked else 0.0


def plan(clients: int, models: list[str], rounds: int) -> list[list[Request]]:
    """Each client's requests in order: client j asks models[j % k]; prompts rotate, so two
    clients on one adapter do not send the same text."""
    return [[Request(models[j % len(models)], PROMPTS[(j + r * clients) % len(PROMPTS)]) for r in range(rounds)]
            for j in range(clients)]


def ask(client, url: str, request: Request, max_tokens: int, result: Result, lock: threading.Lock,
        ignore_eos: bool = False) -> None:
    """One greedy chat completion, its completion tokens, latency and text added to ``result``;
    with ``ignore_eos`` (vLLM's field, which the studio's server honours) it runs to ``max_tokens``."""
    started = time.perf_counter()
    response = client.post(f"{url}/chat/completions", json={
        "model": request.model, "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{request.model}: HTTP {response.status_code}: {response.text[:300]}")
    body = response.json()
    with lock:
        result.tokens += body["usage"]["completion_tokens"]
        result.latencies.append(elapsed)
        result.answers[request] = body["choices"][0]["message"]["content"]


def concurrent(url: str, schedule: list[list[Request]], max_tokens: int, ignore_eos: bool = False) -> Result:
    """One thread per client, released together; the wall time runs from the release to the last answer."""
    import httpx

    result, lock, errors = Result(), threading.Lock(), []
    gate = threading.Barrier(len(schedule) + 1)

    def client_loop(requests: list[Request]) -> None:
        with httpx.Client(timeout=3600) as client:
            gate.wait()
            try:
                for request in requests:
                    ask(client, url, request, max_tokens, result, lock, ignore_eos)
            except Exception as exc:  # reported after the others finish
                errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(requests,)) for requests in schedule]
    for thread in threads:
        thread.start()
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    result.wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return result


def one_at_a_time(url: str, schedule: list[list[Request]], max_tokens: int, ignore_eos: bool = False) -> Result:
    """The same requests, each sent when the previous one has answered: one client asking them all."""
    return concurrent(url, [[request for requests in schedule for request in requests]], max_tokens, ignore_eos)
