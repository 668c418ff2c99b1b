"""The training estimate per process (per GPU) under DDP, ZeRO-2/3 and FSDP: pure arithmetic.

``estimate.estimate_training`` computes one process's terms as if it trained alone; with N > 1
processes (``TrainSetup.processes``, the world size) this module rewrites them for the strategy.
The model-state formulas are those of ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", §5.1, Figure 1): for Ψ trained parameters, mixed
precision Adam and N data-parallel processes,

    baseline (DDP)           (2 + 2 + K)·Ψ          K = 12: fp32 master weights, momentum, variance
    P_os+g   (ZeRO-2)        2Ψ + (2 + K)·Ψ / N
    P_os+g+p (ZeRO-3, FSDP)  (2 + 2 + K)·Ψ / N

applied term by term to the studio's own terms, with each engine's dtypes:

* **DDP** replicates everything and adds its all-reduce buckets: torch's ``DistributedDataParallel``
  copies every gradient into flat buckets of at most 25 MiB (``bucket_cap_mb``), which together
  hold one more copy of all gradients (its docstring: ``gradient_as_bucket_view=True`` "saves
  memory equal to the total gradients size"; accelerate and transformers leave it off).
* **ZeRO-2/3** (DeepSpeed): with bf16/fp16 (W = 2) the engine casts the whole module to W, and
  its optimizer keeps an fp32 master copy besides Adam's two fp32 moments (the paper's K = 12);
  in fp32 there is no master copy (K = 8). Gradients are W-wide and each process keeps its 1/N
  partition. ZeRO-3 also partitions the weights and gathers what the layer being computed needs:
  one decoder block or the larger of the embedding and output layer, plus the prefetch bucket
  (transformers' ``"auto"``: 0.9·d² elements). Parameters below ``stage3_param_persistence_threshold``
  (10·d) stay whole; they are norms and biases, left out.
* **FSDP** (``FULL_SHARD``, the config ``strategy.py`` writes) shards weights, adapters,
  gradients and optimizer state 1/N each in their own dtypes (FSDP does not cast or keep master
  copies), and holds unsharded what is being computed: the root unit (embeddings, final norm,
  output layer; FSDP never frees the root's parameters between forward and backward) plus two
  decoder blocks (the one computed and the next, prefetched by ``BACKWARD_PRE``).
* **offload** moves the sharded states to CPU RAM, a term of its own (``Term.host``) that is not
  part of the GPU total: ZeRO-Offload (Ren et al. 2021) keeps the optimizer state and an fp32
  gradient partition on the CPU, ZeRO-3 also the weights; FSDP's ``offload_params`` keeps the
  sharded weights, their gradients and the optimizer step on the CPU. The GPU keeps what is
  gathered for compute. RAM is per process: a node holds it once per process on it.

Activations and logits do not change: each process runs its own micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DDP_BUCKET_MIB = 25


@dataclass(frozen=True)
class Counts:
    """What ``estimate_training`` knows about the run that the rewrite needs."""

    in_base: int  # trained parameters of the model itself (whole-model methods)
    adapters: int  # trained adapter parameters
    width: int  # W: bytes per value of the compute dtype
    adapter_width: int  # bytes per adapter value (4: PEFT keeps adapters fp32)
    gradient_bytes: int  # every gradient after a backward (before any peak-share rule)

    @property
    def trained(self) -> int:  # Ψ
        return self.in_base + self.adapters


def _ceil_div(value: int, n: int) -> int:
    return -(-int(value) // n)


def _gathered_bytes(arch: Any, weights_bytes: int, width: int) -> tuple[int, int, int]:
    """(one decoder block's weight bytes, the weights outside the blocks, the larger of the input
    embedding and the output layer) as the weights term stores them (a 4-bit base's blocks are
    4-bit, embeddings and output layer stay W-wide: estimate.py)."""
    blocks = list(getattr(arch, "block_params", ()) or ())
    in_blocks = sum(blocks) or arch.total_params
    outside = max(0, arch.total_params - sum(blocks)) if blocks else 0
    outside_bytes = outside * width
    largest = max(blocks) if blocks else in_blocks // max(1, arch.num_layers)
    block = int((weights_bytes - outside_bytes) * largest / in_blocks)
    edge = max(arch.embedding_params, arch.lm_head_params) * width
    return block, outside_bytes, edge


def per_process(terms: list[Any], arch: Any, setup: Any, counts: Counts) -> list[Any]:
    """``terms`` (one process training alone) rewritten for ``setup.processes`` processes under
    ``setup.strategy`` (and ``setup.offload``); see the module docstring for every formula."""
    from studio.estimate import Term

    n, strategy = int(setup.processes), setup.strategy
    if n <= 1:
        return list(terms)
    by = {t.name: t for t in terms}
    if strategy == "ddp":
        grads = counts.gradient_bytes
        return [*terms, Term("ddp_buckets", grads, (
            f"DDP's all-reduce buckets (≤ {DDP_BUCKET_MIB} MiB each) hold a copy of every gradient: "
            f"{grads:,} B; everything else is replicated on each of the {n} processes"))]
    w, psi = counts.width, counts.trained
    out = dict(by)
    ram: list[tuple[str, int]] = []  # (what, bytes) offloaded to CPU RAM
    block, outside, edge = _gathered_bytes(arch, by["weights"].bytes, w)

    if strategy in ("zero2", "zero3"):
        stage = int(strategy[-1])
        master = 4 if w < 4 else 0
        moments = 8 * psi if setup.optimizer == "adamw" else by["optimizer"].bytes
        optimizer = _ceil_div(master * psi + moments, n)
        gradients = _ceil_div(psi * w, n)
        extra = by["trainable"].bytes - counts.adapters * counts.adapter_width  # AdaLoRA's counters
        adapters = counts.adapters * w + max(0, extra)
        out["gradients"] = Term("gradients", gradients, (
            f"ZeRO-{stage}: Ψ × {w} B ÷ N = {psi:,} × {w} ÷ {n} (each process keeps its partition)"))
        if setup.optimizer == "adamw":
            parts = ("4 B fp32 master + " if master else "no master copy in fp32, ") + "2 fp32 moments × 4 B"
            text = f"ZeRO-{stage}: K·Ψ ÷ N, K = {master + 8} ({parts}) = {master + 8} × {psi:,} ÷ {n}"
        else:
            text = (f"ZeRO-{stage}: ({master} B fp32 master × {psi:,} + the optimizer's state "
                    f"{moments:,} B) ÷ {n}")
        out["optimizer"] = Term("optimizer", optimizer, text)
        if stage == 3:
            out["weights"] = Term("weights", _ceil_div(by["weights"].bytes, n),
                                  f"ZeRO-3: ({by['weights'].formula}) ÷ {n}")
            adapters = _ceil_div(adapters, n)
            prefetch = int(0.9 * arch.hidden_size ** 2) * w
            gathered = max(block, edge) + prefetch
            out["gathered"] = Term("gathered", gathered, (
                f"ZeRO-3 gathers for compute: max(one block {block:,}, embedding or output layer "
                f"{edge:,}) + prefetch bucket 0.9·d² × {w} = {prefetch:,} B"))
        out["trainable"] = Term("trainable", adapters, (
            f"DeepSpeed casts adapters to the compute dtype: {counts.adapters:,} × {w} B"
            + (f" ÷ {n}" if stage == 3 else "")))
        if setup.offload:
            fp32_grads = _ceil_div(psi * 4, n)
            ram.append(("optimizer", optimizer))
            ram.append(("fp32 gradient partition", fp32_grads))
            out["optimizer"] = Term("optimizer", 0, f"offloaded to CPU RAM ({optimizer:,} B)")
            if stage == 3:
                ram.append(("weights", out["weights"].bytes))
                ram.append(("adapters", out["trainable"].bytes))
                out["weights"] = Term("weights", 0, f"offloaded to CPU RAM ({out['weights'].bytes:,} B)")
                out["trainable"] = Term("trainable", 0, f"offloaded to CPU RAM ({out['trainable'].bytes:,} B)")
    elif strategy == "fsdp":
        for name in ("weights", "trainable", "optimizer"):
            out[name] = Term(name, _ceil_div(by[name].bytes, n), f"FSDP: ({by[name].formula}) ÷ {n}")
        out["gradients"] = Term("gradients", _ceil_div(counts.gradient_bytes, n),
                                f"FSDP: every gradient {counts.gradient_bytes:,} B ÷ {n}")
        gathered = outside + 2 * block
        out["gathered"] = Term("gathered", gathered, (
            f"FSDP holds unsharded: the root unit (embeddings, final norm, output layer) {outside:,} B "
            f"+ 2 blocks (the one computed and the next, BACKWARD_PRE) × {block:,} B"))
        if setup.offload:
            for name in ("weights", "trainable", "gradients", "optimizer"):
                ram.append((name, out[name].bytes))
                out[name] = Term(name, 0, f"offloaded to CPU RAM ({out[name].bytes:,} B)")
    else:
        raise ValueError(f"strategy must be one of ddp, zero2, zero3, fsdp (got {strategy!r})")

    ordered = [out[t.name] for t in terms]
    if "gathered" in out:
        ordered.insert(len(ordered) - 1, out["gathered"])  # before the runtime overhead
    if ram:
        total = sum(b for _, b in ram)
        text = " + ".join(f"{what} {b:,}" for what, b in ram)
        ordered.append(Term("offloaded_ram", total, f"CPU RAM per process, not in the GPU total: {text} B",
                            host=True))
    return ordered
