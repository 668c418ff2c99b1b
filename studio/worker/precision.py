"""The training precision on the CPU: measured, not assumed, and a bf16 step without wasted casts.

Two jobs, both about one question ("does a bf16-stored base train faster here?"):

1. ``compute_adapters_in``: make the bf16 step fast. PEFT keeps adapter weights in fp32
   (``get_peft_model(autocast_adapter_dtype=True)``) and LoRA's ``Linear.forward`` casts its input
   ``x`` (batch × length × in) to the adapter's dtype in every adapted layer, then adds an fp32
   update to the bf16 base output and casts the sum back: three activation-sized copies per layer
   and their backward. Measured on a 135M step (issue 13): dtype copies went from 16 ms (fp32) to
   245 ms (bf16). Here the *weights* are cast instead, r × (in + out) values per layer, at use:
   ``y = x W_Aᵀ`` with ``W_A`` cast to bf16 (and the same for B). The trainable parameters stay fp32
   (AdamW updates fp32 masters, as mixed precision does; the gradient of a cast is the cast of the
   gradient), only the product is computed in bf16, like the base layer's own matmul.

2. ``decide``: ``precision: auto`` on the CPU. A bf16 *training step* of the run's shapes (the real
   hidden size, heads, vocabulary and intermediate size, two layers) is timed against fp32, since
   a matmul alone is not the test (issue 13: bf16 matmuls ran 3-7× faster, the whole step 1.03-1.10×).
   bf16 is chosen when its step is at least ``THRESHOLD`` times as fast. The result is cached with
   the system facts (``sysinfo.cached_fact``) under the model's shape, the torch version and the CPU
   model (``run_setup.probe_key``), so it is measured once per machine and model — unless the
   machine was busy with other work (``machine_busy``): a bf16 step lost its 2× to contention in a
   measured case (1.11× at load 3.3 on 2 cores, 2.0-2.8× idle), and a cached verdict decides every
   later run, so a busy measurement decides this run only and the next run measures again.
   ``PEFT_STUDIO_PRECISION_PROBE=bf16|fp32`` skips the measurement (tests, or a user who knows);
   ``measure`` (or unset) measures.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.run_setup import PROBE_ENV, forced_cpu_precision, probe_key

# Attention for a bf16 step on the CPU. Measured (one attention layer of the 135M shape, forward +
# backward, batch 8, 1 thread, loaded machine; bench/bf16_step.py for the whole step): SDPA's CPU
# flash kernel in bf16 took 67-72 ms at length 128 and 140-150 ms at 256, eager (bmm + softmax)
# 23 ms and 66-73 ms; at 512 flash won (374 ms against 713). fp32 SDPA: 40-47 and 138-149 ms.
EAGER_MAX_LENGTH = 256
BUSY_PER_CORE = 0.5  # other runnable work per core (1-minute load average) that makes a probe unfair
THRESHOLD = 1.15  # bf16 must be clearly faster: a few % is within the noise of a busy machine
# The quality check behind measuring by default (bench/train_speed.py, idle machine, SmolLM2-135M,
# dates, batch 8 x 128, 30 steps, lr 2e-4, seed 42): a bf16 base trained x2.02 as fast as the
# fp32 reference with 0.76 of its peak RSS; last-step loss 0.0238 vs 0.0249 (-4.7 %), exact match
# 84 % vs 86 %, within the 5 % and 4 points; eval loss 0.0495 vs 0.0450 (+10 %). Early steps
# lag more (step 2: 0.576 vs 0.423). ``fp32`` in the run's settings keeps fp32's numbers exactly.
PROBE_LAYERS, PROBE_BATCH, PROBE_LENGTH, PROBE_ROUNDS = 2, 2, 128, 2


class WeightCastLinear(nn.Linear):
    """An ``nn.Linear`` that casts its (small) weight to its input's dtype instead of the other way
    round. Same parameters, same state dict; only ``forward`` differs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def compute_adapters_in(model: Any, dtype: torch.dtype) -> int:
    """Compute plain LoRA updates in ``dtype`` (the base's) without casting activations; returns
    how many layers were changed. Only layers whose base weight is ``dtype`` and that have no
    variant (DoRA and the like compute more than B A x and keep PEFT's casts) are touched: the
    choice follows the module's structure, whatever method put it there."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "lora_variant", None):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        if weight is None or weight.dtype != dtype:
            continue
        pairs = [(module.lora_A[name], module.lora_B[name]) for name in module.lora_A]
        if not all(type(a) is nn.Linear and type(b) is nn.Linear for a, b in pairs):
            continue  # an embedding or conv adapter: leave it to PEFT
        for a, b in pairs:
            a.__class__ = b.__class__ = WeightCastLinear
        module.cast_input_dtype_enabled = False  # x stays in the base's dtype (see _cast_input_dtype)
        changed += 1
    return changed


def attention_for(device: str, load_dtype: str, max_length: int) -> str | None:
    """``attn_implementation`` for the model, or None for transformers' default (SDPA). Eager
    attention keeps its b × heads × s × s probabilities for the backward (about 6 bytes each per
    layer: the fp32 softmax and its bf16 copy), 28 MB per layer at batch 8 × 256, which is why it
    is only chosen up to ``EAGER_MAX_LENGTH``, where it is also the faster one."""
    if device == "cpu" and load_dtype == "bfloat16" and max_length <= EAGER_MAX_LENGTH:
        return "eager"
    return None


@dataclass
class Decision:
    """What ``auto`` chose on this machine, and why; saved with the run as ``precision.json``."""
    precision: str  # "fp32" or "bf16" (the CPU), or what the GPU runs
    reason: str
    fp32_ms: float | None = None  # one probe training step, median
    bf16_ms: float | None = None
    ratio: float | None = None  # fp32_ms / bf16_ms: how many times faster bf16 is
    cached: bool = False
    attention: str | None = None  # the attention implementation chosen with it (None: default)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_config(config: Any, layers: int = PROBE_LAYERS) -> Any:
    """The run's shapes with ``layers`` layers: enough to time a step, seconds instead of minutes."""
    import copy

    small = copy.deepcopy(config)
    text = getattr(small, "get_text_config", lambda: small)()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:layers]
    text.use_cache = False
    return small


class ProbeStep:
    """One LoRA training step (forward, backward, AdamW) of a random model from ``config`` stored
    in ``dtype``, built the way the worker builds it (every Linear of the blocks adapted, the
    cast-free adapters on a bf16 base); ``run()`` times one step in seconds."""

    def __init__(self, config: Any, dtype: torch.dtype, batch: int = PROBE_BATCH, length: int = PROBE_LENGTH):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        head = model.get_output_embeddings()
        self.names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) and m is not head})
        if self.names:
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=self.names))
            if dtype != torch.float32:
                compute_adapters_in(model, dtype)
        else:  # no layers: the output projection and loss alone, backward into the hidden states
            model.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        self.model = model
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        vocab = getattr(config.get_text_config(), "vocab_size", 1000)
        self.ids = torch.randint(0, vocab, (batch, length))

    def run(self) -> float:
        started = time.perf_counter()
        if self.names:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        else:
            embeds = self.model.get_input_embeddings()(self.ids).detach().requires_grad_(True)
            loss = self.model(inputs_embeds=embeds, labels=self.ids).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad()
        return time.perf_counter() - started


def depth(config: Any) -> int:
    text = getattr(config, "get_text_config", lambda: config)()
    return int(getattr(text, "num_hidden_layers", PROBE_LAYERS))


def measure(config: Any, rounds: int = PROBE_ROUNDS) -> Decision:
    """Time fp32 and bf16 training steps of the run's shapes and extrapolate to its depth.

    A step of L layers costs ``t(L) = t₀ + L·ℓ``: t₀ the embedding, final norm, output projection
    and loss (large with a 49k-128k vocabulary), ℓ one layer. Both are measured, per dtype, from
    models of 0 and ``PROBE_LAYERS`` layers: ``ℓ = (t(P) − t(0)) / P``; then
    ``ratio = t_fp32(L) / t_bf16(L)``. Timing two layers alone would weigh the output projection
    as if it were a third of the model; in the 30-layer 135M model it is about a sixth.
    The four models take turns, one step each per round (the first round is a warm-up), so a
    change of load hits all of them; the least disturbed (smallest) time of each is kept."""
    layers = depth(config)
    probes = {(dtype, n): ProbeStep(probe_config(config, n), dtype)
              for dtype in (torch.float32, torch.bfloat16) for n in (0, PROBE_LAYERS)}
    times: dict[tuple[torch.dtype, int], list[float]] = {key: [] for key in probes}
    for i in range(rounds + 1):
        for key, probe in probes.items():
            seconds = probe.run()
            if i:
                times[key].append(seconds)

    def full(dtype: torch.dtype) -> float:
        head, probe = min(times[(dtype, 0)]), min(times[(dtype, PROBE_LAYERS)])
        per_layer = max(probe - head, 0.0) / PROBE_LAYERS  # noise can make it negative: not a cost
        return head + layers * per_layer

    fp32_s, bf16_s = full(torch.float32), full(torch.bfloat16)
    ratio = fp32_s / bf16_s
    choice = "bf16" if ratio >= THRESHOLD else "fp32"
    verdict = "≥" if choice == "bf16" else "<"
    return Decision(choice, f"measured: a bf16 training step is {ratio:.2f}× as fast as fp32 on this CPU "
                            f"({verdict} {THRESHOLD}×)", fp32_s * 1e3, bf16_s * 1e3, ratio)


def decide_cpu(config: Any, trust_remote_code: bool = False) -> Decision:
    """``auto`` on the CPU: the environment's answer, the cached measurement, or a new one. The
    cache key is ``run_setup.probe_key``, which the UI computes too (from the cached ``ArchInfo``,
    without torch) to estimate with the precision the run will get."""
    forced = forced_cpu_precision()
    if forced is not None:
        return Decision(forced, f"{PROBE_ENV}={forced} (not measured)")
    from studio import sysinfo
    from studio.arch import ArchInfo

    key = probe_key(ArchInfo.from_config(config, trust_remote_code), torch.__version__, sysinfo.cpu_model())
    known = sysinfo.cached_fact(key)
    if isinstance(known, dict) and known.get("precision") in ("bf16", "fp32"):
        return Decision(**{**known, "cached": True})
    # The worker seeded torch before asking: the probe's random models must not move the run's
    # random stream (its adapter initialisation would then differ from a run with a cached answer).
    busy = machine_busy()
    with torch.random.fork_rng(devices=[]):
        decision = measure(config)
    if busy:
        decision.reason += f"; measured while the machine was busy ({busy}), so not kept: the next run measures again"
    else:
        sysinfo.store_fact(key, decision.as_dict())
    return decision


def machine_busy() -> str | None:
    """Why a timing taken now would not be the machine's own (other work running), or None. The
    load average counts this worker too, hence the one subtracted."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load average {load:.1f} on {cores} cores" if load - 1 >= cores * BUSY_PER_CORE else None
