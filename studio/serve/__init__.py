"""Serving trained adapters over HTTP: an OpenAI-compatible endpoint, one base model in memory,
many adapters over it, the adapter chosen per request (issue 16).

- ``engine.py``: ``ServeEngine``, the scheduler (a bounded queue, one thread that owns the
  models, lanes taking turns one decoding step each); ``lanes.py``: our decode loop with
  continuous batching (the mixed LoRA lane, one lane per other adapter, prompt learning from
  PEFT's ``get_prompt``); ``generate_lane.py``: ``generate`` in a turn-taking thread where our
  loop cannot pad the cache; ``mixed_lora.py``: a mixed plain-LoRA batch in one forward on the base, equal to PEFT's
  ``adapter_names`` (bit for bit in prefill; to fp32 rounding in a batched decode step, where
  each layer's adapters are stacked and two ``bmm`` give every row's delta: S-LoRA / Punica); ``pool.py``: the adapter memory (LRU over ``max_active``); ``sampling.py``:
  per-row sampling and streamed text with stop strings; ``completion.py``: a request's handle and
  the errors a client sees (no torch).
- ``catalog.py``: what a server serves (a project's runs, named folders), confined and checked.
- ``api.py``, ``schemas.py``, ``stream.py``: the HTTP routes, the OpenAI request/response
  shapes, server-sent events.
- ``process.py``: a ``peft-studio serve`` child started and stopped from the app.
- ``vllm.py``: the hand-off to vLLM's own OpenAI server for LoRA adapters on a GPU.
Only the engine side (engine, lanes, mixed_lora, pool, sampling) imports torch.
"""
