"""Training and chat memory estimates: pure arithmetic over ``ArchInfo``, no torch.

Called on every slider move, so it must stay fast (a 70B estimate takes well under 1 ms) and
import nothing heavy. Every term is a named field with its formula; the sources:

* weights, gradients, optimizer states: bytes per element of each dtype (exact; checked against
  ``tensor.element_size()`` sums in tests, fp32 and bf16). A gradient and torch AdamW's two
  states (``zeros_like(param)``) take their parameter's dtype: PEFT adapters are fp32 over any
  base (``autocast_adapter_dtype``): 4 + 4 + 8 B per value; whole-model training (full, last N)
  trains the loaded tensors themselves, bf16 on a GPU: 2 + 2 + 4 B, not the 4 + 4 + 8 of an fp32
  master copy (Trainer(bf16=True) only autocasts; accelerate keeps no master weights).
  NF4 after Dettmers et al. 2023 (QLoRA, §2): 4 bits per weight plus one absmax per 64-weight
  block, itself 8-bit with one fp32 constant per 256 blocks under double quantisation
  (4 + 8/64 + 32/(64·256) ≈ 4.127 bits), else fp32 (4 + 32/64 = 4.5 bits). LLM.int8
  (Dettmers et al. 2022): 1 byte per weight + one fp32 scale per output row.
  Embeddings, lm_head and norms stay unquantised (transformers skips the output embedding).
* activations: the tensors autograd saves for backward, per token and per layer, counted op by
  op for a pre-norm decoder block (the approach of Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", §4, adapted: SDPA / flash attention keeps q, k, v,
  output and a log-sum-exp per head instead of the s² score matrix; RMSNorm keeps its input and
  one reciprocal root; a *frozen* Linear keeps nothing of its input, a trainable one keeps it).
  ``studio.activations`` lists the rules in bytes, with the dtype of each saved tensor: in bf16
  the norms' inputs, the attention log-sum-exp and every adapter's input are kept in fp32, and
  a masked batch makes SDPA keep k and v repeated to every query head. Gradient checkpointing
  keeps one hidden state per layer plus one layer's activations while it is recomputed.
* gradients of whole-model training: only their share of the peak, since they are written as
  the backward frees the activations (``_whole_model_gradients``: the larger of the start of
  backward and the optimizer step with foreach AdamW's temporary). ``Estimate.gradient_bytes``
  keeps the plain sum of all gradients.
* checked against published peaks: the PEFT method comparison's Llama-3.2-3B runs (bf16, batch
  4 × 768, tests/test_estimate_gpu_terms.py), every method within 10 %.
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
* more than one process (``TrainSetup.processes``): every term is per process, rewritten for the
  strategy by ``studio.distributed.memory`` (ZeRO's Ψ formulas, Rajbhandari et al. 2020: DDP
  replicates and adds its gradient buckets, ZeRO-2 divides gradients and optimizer state by N,
  ZeRO-3 and FSDP the weights too plus what is gathered for compute; offloaded states become a
  CPU RAM term outside the GPU total).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.activations import activation_bytes
from studio.arch import ArchInfo

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}
OPTIMIZER_BYTES = {  # per trainable parameter
    "adamw": 8,  # exp_avg + exp_avg_sq, each in its parameter's dtype: 2 × 4 B for fp32 adapters
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


@dataclass(frozen=True)
class TrainSetup:
    batch_size: int = 4
    seq_len: int = 256
    dtype: str = "bf16"  # compute dtype of the frozen weights and activations
    quant: str = "none"  # none | nf4 | int8 (base weights)
    double_quant: bool = True
    grad_checkpointing: bool = False
    optimizer: str = "adamw"
    # Batches carry an attention mask (padding to the longest, or packing): SDPA then gets k and
    # v repeated to every query head, which it saves (studio.activations). Off only for
    # unpadded single-length batches.
    masked: bool = True
    device: str = "cuda"  # "cpu" drops the CUDA runtime allowance
    # More than one process (the world size): the terms are per process, for the strategy
    # ("ddp", "zero2", "zero3", "fsdp") and its CPU offload (studio/distributed/memory.py).
    processes: int = 1
    strategy: str = "ddp"
    offload: bool = False


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    formula: str
    host: bool = False  # held in CPU RAM (offloaded), not part of the device total


@dataclass(frozen=True)
class Estimate:
    terms: tuple[Term, ...]
    trainable_params: int
    saved_activation_bytes: int = 0  # what saved_tensors_hooks would see (layers + log-softmax)
    gradient_bytes: int = 0  # every gradient after a backward (the term holds only the peak's share)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if not t.host)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {t.name: t.bytes for t in self.terms}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _weights_term(arch: ArchInfo, setup: TrainSetup, frozen_base: bool, trainable_in_base: int) -> Term:
    """Bytes of the model's own parameters (adapters are counted with the trainable term)."""
    width = DTYPE_BYTES[setup.dtype]
    if setup.quant == "none":
        # Whole-model training trains the loaded tensors themselves: a bf16 base stays bf16 (no
        # fp32 master copy: Trainer(bf16=True) is autocast only, and the worker loads in bf16).
        return Term("weights", arch.total_params * width, f"{arch.total_params:,} × {width} B")
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


def estimate_training(arch: ArchInfo, method: str, p: Any, trainable: int,
                      setup: TrainSetup) -> Estimate:
    """Peak training memory, term by term."""
    if setup.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}")
    if setup.optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}")
    width = DTYPE_BYTES[setup.dtype]
    from studio.methods import get_method  # the registry: cheap, no torch

    spec = get_method(method)
    in_base = trainable if spec.whole_model else 0
    terms = [_weights_term(arch, setup, not spec.whole_model, in_base)]
    adapters = trainable - in_base
    # PEFT keeps adapter weights in fp32 even over a bf16/fp16 base (autocast_adapter_dtype);
    # a method whose modules take the base's dtype (our bottleneck adapters) says so.
    aw = width if spec.adapter_in_base_dtype else 4
    text = f"adapter parameters {adapters:,} × {aw} B"
    extra = 0
    if spec.extra_state is not None:  # non-trainable state beside the adapter (AdaLoRA's counters)
        extra, extra_text = spec.extra_state(arch, p)
        text += f" + {extra_text}"
    terms.append(Term("trainable", adapters * aw + extra, text))
    # A gradient has its parameter's dtype: W-wide for base tensors, fp32 for PEFT adapters.
    terms.append(Term("gradients", in_base * width + adapters * aw,
                      f"base {in_base:,} × {width} B + adapters {adapters:,} × {aw} B"))
    opt = OPTIMIZER_BYTES[setup.optimizer]
    own = spec.optimizer_state(arch, p, width) if spec.optimizer_state is not None else None
    if own is not None:  # the method is its own optimizer (GaLore, APOLLO): its state, its formula
        terms.append(Term("optimizer", own.bytes, own.formula))
    elif setup.optimizer == "adamw8bit":
        tensors = spec.tensors(arch, p)
        terms.append(Term("optimizer", adamw8bit_bytes(tensors),
                          f"adamw8bit over {sum(c for _, c in tensors):,} tensors: 2 B per value "
                          f"+ block absmax + maps (fp32 states below {BNB_MIN_8BIT_SIZE} values)"))
    else:
        # torch.optim.AdamW keeps exp_avg and exp_avg_sq as zeros_like(param): a bf16 base
        # trained whole has bf16 states (2 × 2 B), fp32 adapters fp32 states (2 × 4 B).
        per_base, per_adapter = opt * width // 4, opt * aw // 4
        terms.append(Term("optimizer", int(in_base * per_base + adapters * per_adapter),
                          f"{setup.optimizer}: base {in_base:,} × {per_base:g} B + adapters "
                          f"{adapters:,} × {per_adapter:g} B"))

    seq = setup.seq_len + (spec.input_tokens(p) if spec.input_tokens else 0)  # prompt tuning's tokens
    tokens = setup.batch_size * seq
    masked = setup.masked and setup.batch_size > 1  # one sequence is never padded
    per_layer, outside = activation_bytes(arch, spec, p, tokens, seq, setup.batch_size, width, masked)
    layers = arch.num_layers
    if setup.grad_checkpointing:
        kept = layers * tokens * arch.hidden_size * width + per_layer + outside
        text = (f"checkpointing: L × b·s × d × {width} B + one layer = {layers} × {tokens:,} × "
                f"{arch.hidden_size} × {width} + {per_layer:,.0f} B")
    else:
        kept = layers * per_layer + outside
        text = f"L × per-layer = {layers} × {per_layer:,.0f} B + final norm {outside:,.0f} B"
    terms.append(Term("activations", int(kept), text))
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
    gradient_bytes = next(t.bytes for t in terms if t.name == "gradients")
    if in_base:
        terms = _whole_model_gradients(terms, arch, spec, p, in_base, width, setup.optimizer, own)
    if setup.processes > 1:  # per process under the strategy: ZeRO's Ψ formulas (distributed/memory.py)
        from studio.distributed.memory import Counts, per_process

        terms = per_process(terms, arch, setup, Counts(in_base, adapters, width, aw, gradient_bytes))
    saved = int(layers * per_layer + outside) + tokens * vocab * 4
    return Estimate(tuple(terms), trainable, saved_activation_bytes=saved,
                    gradient_bytes=gradient_bytes)


def _whole_model_gradients(terms: list[Term], arch: ArchInfo, spec: Any, p: Any, in_base: int,
                           width: int, optimizer: str, own: Any = None) -> list[Term]:
    """The gradients term of whole-model training: what gradients add to the *peak*.

    Gradients and activations are not held at once. Trainer frees the gradients after each step
    (``zero_grad(set_to_none=True)``), so the forward runs without them; the backward writes a
    block's gradients as it frees that block's activations, starting with the output layer's
    (V × d; without a trained output layer, the top trained block's). Two moments bound the
    peak, and it is the larger:
      start of backward:  weights + states + activations + logits + V·d·W (output layer's grad)
      optimizer step:     weights + states + all gradients + one parameter-sized temporary
                          (torch's foreach AdamW computes sqrt(v) for the whole group at once;
                          bitsandbytes and SGD update in place)
    so the term is max(V·d·W, gradients + temporary − activations − logits). A method that is
    its own optimizer (``own``, an ``OptimizerState``) says its step's temporary; a layer-wise one
    frees each gradient as soon as its parameter is updated, so only the largest tensor's
    gradient is held and the term says what that saves. For LoRA-like
    methods the gradients are small and are simply added. Checked against the published full
    fine-tuning peak of Llama-3.2-3B (tests/test_estimate_gpu_terms.py): the plain sum of all
    terms was 15 % above it even with bf16 states, the peak model within 10 %.
    """
    by = {t.name: t for t in terms}
    grads = by["gradients"].bytes
    temporary = in_base * width if optimizer == "adamw" else 0
    if own is not None:
        temporary = own.step_temporary
    dynamic = by["activations"].bytes + by["logits"].bytes
    blocks = spec.trained_blocks(arch, p) if spec.trained_blocks else arch.num_layers
    first = (arch.vocab_size * arch.hidden_size if spec.trains_output_layer else in_base // blocks) * width
    held = max(first, grads + temporary - dynamic)
    text = (f"held at the peak: max(first gradient {first:,}, all {grads:,} + step temporary "
            f"{temporary:,} − activations − logits {dynamic:,}) B")
    if own is not None and own.frees_gradients:
        largest = max(numel for numel, _ in arch.param_tensors) * width
        layerwise = max(first, largest)
        text = (f"layer-wise: each gradient freed once its weight is updated, about the largest "
                f"one is held = {layerwise:,} B (without it the peak holds {held:,} B: all {grads:,} B "
                f"of gradients and the step's temporary, less the activations already freed)")
        held = layerwise
    return [Term("gradients", held, text) if t.name == "gradients" else t for t in terms]


def estimate_chat(arch: ArchInfo, setup: TrainSetup, context: int, batch: int = 1) -> Estimate:
    """Memory to generate: weights, KV cache (2 × L × kv × context × batch), one logits row."""
    width = DTYPE_BYTES[setup.dtype]
    terms = [_weights_term(arch, setup, True, 0)]
    kv_cache = 2 * arch.num_layers * arch.kv_dim * context * batch * width
    terms.append(Term("kv_cache", kv_cache, f"2 × L × kv × ctx × batch × {width} B = 2 × {arch.num_layers} × "
                                            f"{arch.kv_dim} × {context} × {batch} × {width}"))
    terms.append(Term("logits", batch * arch.vocab_size * 4, "batch × V × 4 B"))
    cuda = setup.device == "cuda"
    terms.append(Term("overhead", CUDA_OVERHEAD if cuda else 0, "CUDA context" if cuda else "none on CPU"))
    return Estimate(tuple(terms), 0)


def verdict(total_bytes: int, free_bytes: int | None) -> str:
    """fits (≤ 85 % of free), tight (≤ 100 %), exceeds; 'unknown' without a GPU reading."""
    if not free_bytes:
        return "unknown"
    ratio = total_bytes / free_bytes
    return "fits" if ratio <= 0.85 else "tight" if ratio <= 1.0 else "exceeds"
