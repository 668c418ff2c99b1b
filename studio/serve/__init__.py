"""Serving trained adapters over HTTP: an OpenAI-compatible endpoint, one base model in memory,
many adapters over it, the adapter chosen per request (issue 16).

- ``engine.py``, ``lanes.py``, ``sampling.py``, ``pool.py``: the scheduler (continuous batching
  across adapters PEFT can mix, fair interleaving of those it cannot), the adapter memory (LRU).
- ``catalog.py``: what a server serves (a project's runs, named folders), confined and checked.
- ``api.py``, ``schemas.py``: the HTTP routes and OpenAI request/response shapes.
- ``process.py``: a ``peft-studio serve`` child started and stopped from the app.
- ``vllm.py``: the hand-off to vLLM's own OpenAI server for LoRA adapters on a GPU.
Importing the package loads no torch.
"""
