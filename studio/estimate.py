"""Training and chat memory estimates: pure arithmetic over ``ArchInfo``, no torch.

Called on every slider move, so it must stay fast (a 70B estimate takes well under 1 ms) and
import nothing heavy. Every term is a named field with its formula; the sources:

* weights, gradients, optimizer states: bytes per element of each dtype (exact; checked against
  ``tensor.element_size()`` sums in tests). NF4 after Dettmers et al. 2023 (QLoRA, §2): 4 bits per
  weight plus one absmax per 64-weight block, itself 8-bit with one fp32 constant per 256 blocks
  under double quantisation (4 + 8/64 + 32/(64·256) ≈ 4.127 bits), else fp32 (4 + 32/64 = 4.5
  bits). LLM.int8 (Dettmers et al. 2022): 1 byte per weight + one fp32 scale per output row.
  Embeddings, lm_head and norms stay unquantised (transformers skips the output embedding).
* activations: the tensors autograd saves for backward, per token and per layer, counted op by
  op for a pre-norm decoder block (the approach of Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", §4, adapted: SDPA / flash attention keeps q, k, v,
  output and a log-sum-exp per head instead of the s² score matrix; RMSNorm keeps its input and
  one reciprocal root; a *frozen* Linear keeps nothing of its input, a trainable one keeps it).
  ``activation_elements`` lists the rules. Gradient checkpointing keeps one hidden state per
  layer plus one layer's activations while it is recomputed.
* logits: the training loss is computed only at labelled positions, a chunk of positions at a
  time (``studio/worker/label_loss.py``), so b·s·V logits never exist. Term = chunk × V × (W + 4
  + 4) B (one chunk's logits in the compute width W, its fp32 log-softmax and fp32 gradient;
  chunk = ``label_chunks.chunk_positions(V)``, 64 MiB of fp32 logits, or b·s if fewer) + b·s × d
  × W B (the labelled hidden states gathered and kept for backward) + b × V × W B (the one
  logits row per sequence the model still returns). It assumes every position carries a label:
  an upper bound, since with the loss on the assistant turn only fewer do, and an estimate must
  not fall short. (The old full-logits path, b·s × V × (W + 4 + 4), remains only where the
  studio falls back to the model's own loss: ``PEFT_STUDIO_FULL_LOGITS_LOSS=1`` or a model that
  soft-caps or scales its logits; there this term is short.)
* runtime overhead: a fixed allowance for the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.arch import ArchInfo

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}
OPTIMIZER_BYTES = {  # per trainable parameter
    "adamw": 8,  # exp_avg + exp_avg_sq in fp32 (trainable params are fp32, see below)
    "adamw8bit": 2,  # nominal; the exact figure is per tensor, see adamw8bit_bytes
    "sgd": 0,  # plain SGD keeps no state
}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
BNB_BLOCK = 256  # values per fp32 absmax in its blockwise 8-bit states
BNB_QMAP_BYTES = 2 * 256 * 4  # two 256-entry fp32 quantisation maps per 8-bit tensor


def adamw8bit_bytes(tensors: list[tuple[int, int]]) -> int:
    """bitsandbytes AdamW8bit state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization"): per tensor of n values, two uint8 states (2n) + one fp32 absmax per 256-value
    block for each (8·⌈n/256⌉) + two 256-entry fp32 maps, or plain fp32 Adam (8n) when n < 4096."""
    total = 0
    for numel, count in tensors:
        if numel < BNB_MIN_8BIT_SIZE:
            total += count * 8 * numel
        else:
            total += count * (2 * numel + 8 * -(-numel // BNB_BLOCK) + BNB_QMAP_BYTES)
    return total
CUDA_OVERHEAD = 1024**3 * 3 // 4  # ~0.75 GiB: CUDA context, cuBLAS workspace, fragmentation
GATED_LEAVES = ("gate_proj", "w1", "gate_up_proj")


@dataclass(frozen=True)
class TrainSetup:
    batch_size: int = 4
    seq_len: int = 256
    dtype: str = "bf16"  # compute dtype of the frozen weights and activations
    quant: str = "none"  # none | nf4 | int8 (base weights)
    double_quant: bool = True
    grad_checkpointing: bool = False
    optimizer: str = "adamw"
    device: str = "cuda"  # "cpu" drops the CUDA runtime allowance


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    formula: str


@dataclass(frozen=True)
class Estimate:
    terms: tuple[Term, ...]
    trainable_params: int
    saved_activation_bytes: int = 0  # what saved_tensors_hooks would see (layers + log-softmax)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {t.name: t.bytes for t in self.terms}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _weights_term(arch: ArchInfo, setup: TrainSetup, frozen_base: bool, trainable_in_base: int) -> Term:
    """Bytes of the model's own parameters (adapters are counted with the trainable term)."""
    width = DTYPE_BYTES[setup.dtype]
    # Trainable base parameters (full / last-N) are kept in fp32 for stable updates.
    frozen = arch.total_params - trainable_in_base
    if setup.quant == "none":
        total = frozen * width + trainable_in_base * 4
        return Term("weights", total, f"frozen {frozen:,} × {width} B + trainable-in-base "
                                      f"{trainable_in_base:,} × 4 B")
    if not frozen_base:
        raise ValueError("a quantised base cannot be fully trained")
    quantised = arch.linear_params  # Linear weights inside the blocks
    rest = arch.total_params - quantised
    if setup.quant == "nf4":
        bits = NF4_BITS[setup.double_quant]
        q_bytes = int(quantised * bits / 8)
        text = f"NF4 {quantised:,} × {bits:.3f} bits"
    else:  # int8
        rows = sum(g.count * g.out_features for g in arch.block_linears)
        q_bytes = quantised + 4 * rows
        text = f"int8 {quantised:,} × 1 B + {rows:,} row scales × 4 B"
    return Term("weights", q_bytes + rest * width, f"{text} + unquantised {rest:,} × {width} B")


def activation_elements(arch: ArchInfo, method: str, p: Any, tokens: int, seq_len: int,
                        batch: int) -> tuple[float, float]:
    """(elements per layer, elements outside the layers) saved for backward.

    Rules, per token of one layer (d hidden, kv key/value width, f MLP width, h heads):
      trainable base (full):  8d + 2kv + 4f + h + 2   (two norms: input x, 1/rms, normed output
                              each; q, attention output, k, v, logsumexp; gate, silu(gate), up,
                              the product; a non-gated MLP keeps 2f)
      frozen base:            2d + 2 (norm inputs, 1/rms) + 2d + 2kv + h (attention) + 3f (MLP,
                              gated) — the Linear inputs are not kept
      LoRA-like adapter on a Linear (in → out): r (input of B) + in (its own dropout copy when
      dropout > 0; without dropout the shared input, counted once per distinct input)
      IA3: the scaled tensor (out, or in for feed-forward targets); Houlsby: 2 × (d + 2r) per layer.
      Prefix: keys and values grow by p per sequence; prompt tuning: every sequence grows by p.
    """
    d, kv, f, h = arch.hidden_size, arch.kv_dim, arch.intermediate_size, arch.num_heads
    gated = any(g.leaf in GATED_LEAVES for g in arch.block_linears)
    mlp_kept = 3 * f if gated else 2 * f
    frozen_block = 2 * d + 2 + 2 * d + 2 * kv + h + mlp_kept
    trainable_block = frozen_block + 3 * d + 2 * d + (f if gated else 0)  # + Linear inputs
    if method in ("full",):
        per_token = trainable_block
    elif method == "last_n":
        per_token = trainable_block * p.num_layers / arch.num_layers
    adapter_token, adapter_model = (0.0, 0.0) if method in ("full", "last_n") else \
        _adapter_elements(arch, method, p)
    if method not in ("full", "last_n"):
        per_token = frozen_block + adapter_token
    per_layer = per_token * tokens
    if method == "prefix":  # p extra keys and values per sequence and layer
        per_layer += 2 * kv * p.num_virtual_tokens * batch
    outside = tokens * (3 * d + 1) + adapter_model  # final norm (input, 1/rms, normed output)
    return per_layer, outside


def _adapter_elements(arch: ArchInfo, method: str, p: Any) -> tuple[float, float]:
    """(elements per token per layer, elements per model) an adapter adds to what is saved.

    Measured op by op on PEFT 0.21 (see tests/test_estimate.py), per adapted Linear in → out:
      LoRA / rsLoRA / LoRA+ / QLoRA / AdaLoRA: r (input of B); with dropout > 0 also the dropout
        output and its float mask (2·in), else the shared input (once per distinct input).
      DoRA: as LoRA + 2·out per token (the base output and the scaled update). Its weight-norm
        product B·A·I is built and detached inside the forward, so nothing of it is held.
      LoHa / LoKr: the shared input per token, and the materialised ΔW (in·out) per module.
      VeRA: r + out per token (λ_d and λ_b keep their operands; x·A with the frozen buffer A
        keeps no input), and the shared A, B once: r · (max in + max out).
    """
    from studio.methods import get_method  # registry: cheap, no torch

    layers = arch.num_layers
    if method in ("lora", "dora", "rslora", "loraplus", "qlora", "adalora", "loha", "lokr", "vera"):
        from studio.methods.base import resolve_targets

        targets = arch.matching(resolve_targets(arch, p.target_preset, p.target_modules))
        rank = getattr(p, "r", getattr(p, "init_r", 8))
        modules = sum(g.count for g in targets)
        per_token = 0.0
        per_model = 0.0
        dropout = getattr(p, "lora_dropout", 0) > 0
        if method in ("loha", "lokr"):
            per_model = sum(g.count * g.in_features * g.out_features for g in targets)
        elif method == "vera":
            # x·A with A a frozen buffer keeps no input; λ_d and λ_b keep their operands.
            per_token = sum(g.count * (rank + g.out_features) for g in targets) / layers
            # The slices are views of one shared pair: stored once, at the largest shapes.
            per_model = rank * (max(g.in_features for g in targets) + max(g.out_features for g in targets))
        else:
            per_token = modules * rank / layers
        if dropout:
            per_token += sum(g.count * 2 * g.in_features for g in targets) / layers
        elif method != "vera":
            per_token += _distinct_inputs(arch, targets)
        if method == "dora" or getattr(p, "use_dora", False):
            per_token += sum(g.count * 2 * g.out_features for g in targets) / layers
        return per_token, per_model
    if method == "ia3":
        from studio.methods.ia3 import resolved

        targets, feedforward = resolved(arch, p)
        ff = {id(g) for g in arch.matching(feedforward)}
        return sum(g.count * (g.in_features if id(g) in ff else g.out_features)
                   for g in arch.matching(targets)) / layers, 0.0
    if method == "houlsby":
        return 2 * (arch.hidden_size + 2 * p.r), 0.0
    get_method(method)  # raises for unknown names
    return 0.0, 0.0  # prompt / prefix: the frozen block, with a longer sequence


def _distinct_inputs(arch: ArchInfo, targets: list) -> float:
    """Inputs a dropout-free adapter keeps: one per distinct tensor (q, k, v share the normed x)."""
    roles_seen: set[tuple[str, int]] = set()
    total = 0
    for g in targets:
        key = (g.role, g.in_features)
        if key not in roles_seen:
            roles_seen.add(key)
            # the attention output is kept by attention anyway
            if not (g.role == "attention" and g.in_features == arch.num_heads * arch.head_dim
                    and g.leaf in ("o_proj", "dense", "out_proj", "c_proj", "wo")):
                total += g.in_features * g.count / arch.num_layers
    return total


def estimate_training(arch: ArchInfo, method: str, p: Any, trainable: int,
                      setup: TrainSetup) -> Estimate:
    """Peak training memory, term by term."""
    if setup.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}")
    if setup.optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}")
    width = DTYPE_BYTES[setup.dtype]
    in_base = trainable if method in ("full", "last_n") else 0
    frozen_base = method not in ("full", "last_n")
    terms = [_weights_term(arch, setup, frozen_base, in_base)]
    adapters = trainable - in_base
    # PEFT keeps adapter weights in fp32 even over a bf16/fp16 base (autocast_adapter_dtype).
    text = f"adapter parameters {adapters:,} × 4 B (fp32)"
    if method == "adalora":  # plus one frozen rank counter per adapted module
        from studio.methods.base import resolve_targets

        counters = sum(g.count for g in arch.matching(resolve_targets(arch, p.target_preset, p.target_modules)))
        adapters += counters
        text += f" + {counters:,} rank counters × 4 B"
    terms.append(Term("trainable", adapters * 4, text))
    terms.append(Term("gradients", trainable * 4, f"{trainable:,} × 4 B"))
    opt = OPTIMIZER_BYTES[setup.optimizer]
    if setup.optimizer == "adamw8bit":
        from studio.methods import get_method

        tensors = get_method(method).tensors(arch, p)
        terms.append(Term("optimizer", adamw8bit_bytes(tensors),
                          f"adamw8bit over {sum(c for _, c in tensors):,} tensors: 2 B per value "
                          f"+ block absmax + maps (fp32 states below {BNB_MIN_8BIT_SIZE} values)"))
    else:
        terms.append(Term("optimizer", int(trainable * opt), f"{setup.optimizer}: {trainable:,} × {opt:g} B"))

    seq = setup.seq_len + (p.num_virtual_tokens if method == "prompt" else 0)
    tokens = setup.batch_size * seq
    per_layer, outside = activation_elements(arch, method, p, tokens, seq, setup.batch_size)
    layers = arch.num_layers
    if setup.grad_checkpointing:
        kept = layers * tokens * arch.hidden_size + per_layer + outside
        text = f"checkpointing: L × b·s × d + one layer = {layers} × {tokens:,} × {arch.hidden_size} + {per_layer:,.0f}"
    else:
        kept = layers * per_layer + outside
        text = f"L × per-layer = {layers} × {per_layer:,.0f} elements + final norm {outside:,.0f}"
    terms.append(Term("activations", int(kept * width), f"{text}, × {width} B"))
    vocab = arch.vocab_size
    from studio.label_chunks import chunk_positions  # the label-only loss's chunk (module docstring)

    chunk = min(chunk_positions(vocab), tokens)  # every position labelled: an upper bound
    logits = (chunk * vocab * (width + 4 + 4) + tokens * arch.hidden_size * width
              + setup.batch_size * vocab * width)
    terms.append(Term("logits", logits, (
        f"label-only, in chunks: chunk × V × ({width} + 4 + 4) B + b·s × d × {width} B "
        f"+ b × V × {width} B = {chunk:,} × {vocab:,} × {width + 8} + {tokens:,} × "
        f"{arch.hidden_size} × {width} + {setup.batch_size} × {vocab:,} × {width}")))
    overhead = CUDA_OVERHEAD if setup.device == "cuda" else 0
    terms.append(Term("overhead", overhead, "CUDA context + allocator" if overhead else "none on CPU"))
    saved = int((layers * per_layer + outside) * width) + tokens * vocab * 4
    return Estimate(tuple(terms), trainable, saved_activation_bytes=saved)


def estimate_chat(arch: ArchInfo, setup: TrainSetup, context: int, batch: int = 1) -> Estimate:
    """Memory to generate: weights, KV cache (2 × L × kv × context × batch), one logits row."""
    width = DTYPE_BYTES[setup.dtype]
    terms = [_weights_term(arch, setup, True, 0)]
    kv_cache = 2 * arch.num_layers * arch.kv_dim * context * batch * width
    terms.append(Term("kv_cache", kv_cache, f"2 × L × kv × ctx × batch × {width} B = 2 × {arch.num_layers} × "
                                            f"{arch.kv_dim} × {context} × {batch} × {width}"))
    terms.append(Term("logits", batch * arch.vocab_size * 4, "batch × V × 4 B"))
    terms.append(Term("overhead", CUDA_OVERHEAD if setup.device == "cuda" else 0, "CUDA context"))
    return Estimate(tuple(terms), 0)


def verdict(total_bytes: int, free_bytes: int | None) -> str:
    """fits (≤ 85 % of free), tight (≤ 100 %), exceeds; 'unknown' without a GPU reading."""
    if not free_bytes:
        return "unknown"
    ratio = total_bytes / free_bytes
    return "fits" if ratio <= 0.85 else "tight" if ratio <= 1.0 else "exceeds"
