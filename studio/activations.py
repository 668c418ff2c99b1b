"""The activation term of the training estimate: bytes autograd saves for backward, per layer.

Pure arithmetic over ``ArchInfo`` (no torch), called by ``studio.estimate``. The rules are counted
op by op for a pre-norm decoder block (the approach of Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", §4, adapted to what transformers 5 and
PEFT 0.21 really save) and held to account by ``studio.memory_measure.saved_activation_bytes`` in
tests/test_estimate.py and tests/test_estimate_gpu_terms.py, in fp32 *and* bf16.

Notation, per token of one layer: d hidden, a = heads × head_dim (attention width), kv key/value
width, f MLP width, h heads; W the compute dtype's bytes (2 for bf16), F = 4 (fp32).

What is saved, and in which dtype (the dtype matters: in bf16 a good part is fp32):
  RMSNorm (transformers' LlamaRMSNorm): upcasts its input, keeps the fp32 copy and the fp32
    1/rms: (d + 1) × F whatever the compute dtype. Its weight's gradient also needs the normed
    input, in W, only when the weight trains.
  attention (SDPA / flash): q and the output (a each), k and v, and the fp32 log-sum-exp (h):
    (2a + 2k') × W + h × F, where k' = kv when SDPA runs grouped-query attention natively, and
    k' = a when transformers must repeat k and v to every query head first: whenever an
    attention mask is passed (padded or packed batches, prefix tuning), see
    ``transformers.integrations.sdpa_attention.use_gqa_in_sdpa``.
  gated MLP: gate, silu(gate), up: 3f × W (2f without a gate).
  a frozen Linear keeps nothing of its input (its input gradient needs only the weight); a
    trainable one keeps its input: for whole-block training + (4d + f) × W (the two normed
    inputs, the two norms' pre-weight copies, the MLP product).
  outside the blocks: the final norm's (d + 1) × F; + 2d × W when the norm and the output layer
    train (full fine-tuning); − (d + 1) × F unless the input embeddings need a gradient (full,
    prompt tuning): the first trained block's input norm then records nothing for its input.
Adapters (PEFT keeps adapter weights in fp32 over a bf16 base and casts each adapter's input to
fp32 first, so what an adapter keeps is F-wide, not W-wide):
  LoRA-like on a Linear in → out: r × F (input of B) + the input: with dropout > 0 the dropout
    output and its mask (2·in × F); without dropout the input itself: in fp32 models the shared
    tensor, once per distinct input; under a narrower base each module's own fp32 copy.
  DoRA: + 2·out per token; with dropout under a narrower base, + an fp32 copy of each adapted
    weight (in·out × F). LoHa / LoKr: the input + the materialised ΔW (in·out) per module.
  VeRA: r + out per token and the shared A, B once.
  IA3: an attention target keeps its (W-wide) output to scale; a feed-forward target keeps its
    input, cast to fp32 (in × F).
  LLaMA-Adapter: only its top blocks keep activations; each keeps its own attention's queries
    and scores over the prompt, and the prompt's keys and values per sequence (see
    ``studio.methods.adaption_prompt``).
  Prompt tuning: every sequence is p tokens longer (the caller lengthens it).
  Prefix tuning: k and v are repeated over p + s positions (a mask is always built).
  A masked batch: SDPA keeps the additive mask it makes of the boolean one, b · s · s' × W per
    layer (s' = s + p under prefix tuning).
"""

from __future__ import annotations

from typing import Any

from studio.arch import ArchInfo

FP32 = 4
GATED_LEAVES = ("gate_proj", "w1", "gate_up_proj")


def activation_bytes(arch: ArchInfo, spec: Any, p: Any, tokens: int, seq_len: int, batch: int,
                     width: int, masked: bool) -> tuple[float, float]:
    """(bytes per layer, bytes outside the layers) saved for backward; see the module rules.

    ``spec``: the method's ``MethodSpec``, whose hooks say what differs from a frozen block
    (``whole_model``, ``trained_blocks``, ``activations``, ``prefix_tokens``, ``input_trains``,
    ``trains_output_layer``). ``masked``: the batch carries an attention mask (padding or
    packing), so SDPA gets k and v repeated to every query head."""
    d, kv, f, h = arch.hidden_size, arch.kv_dim, arch.intermediate_size, arch.num_heads
    a = arch.num_heads * arch.head_dim
    gated = any(g.leaf in GATED_LEAVES for g in arch.block_linears)
    mlp_kept = 3 * f if gated else 2 * f
    prefix = spec.prefix_tokens is not None
    kv_saved = a if (masked or prefix) else kv
    norms = 2 * (d + 1) * FP32
    attention = (2 * a + (0 if prefix else 2 * kv_saved)) * width + h * FP32
    frozen_block = norms + attention + mlp_kept * width
    share = 1.0  # of the blocks, those that keep activations (and the mask below)
    if spec.whole_model:
        trainable_block = frozen_block + (4 * d + (f if gated else 0)) * width
        # Only some blocks train (last N): the blocks below them need no gradient, keep nothing.
        blocks = spec.trained_blocks(arch, p) if spec.trained_blocks else arch.num_layers
        per_token = trainable_block * (blocks / arch.num_layers)
        adapter_model = 0.0
    else:
        adapter_token, adapter_model = spec.activations(arch, p, width) if spec.activations else (0.0, 0.0)
        # Adapters in the top blocks only (LLaMA-Adapter): the frozen blocks below keep nothing.
        share = spec.trained_blocks(arch, p) / arch.num_layers if spec.trained_blocks else 1.0
        per_token = frozen_block * share + adapter_token
    per_layer = per_token * tokens
    if spec.sequence_activations is not None:  # what an adapter keeps once per sequence
        per_layer += spec.sequence_activations(arch, p, width) * batch
    if prefix:  # k, v over prefix + sequence, a wide; and the additive mask
        virtual = spec.prefix_tokens(p)
        per_layer += (2 * a * (seq_len + virtual) * batch + batch * seq_len * (seq_len + virtual)) * width
    elif masked:  # SDPA turns the boolean mask into an additive one per call and keeps it
        per_layer += batch * seq_len * seq_len * width * share
    outside = tokens * (d + 1) * FP32 + adapter_model
    if not spec.input_trains:  # the first trained block's input norm sees no gradient
        outside -= tokens * (d + 1) * FP32
    if spec.trains_output_layer:  # the final norm's weight and the output layer train
        outside += tokens * 2 * d * width
    return per_layer, outside


# ---- what an adapter adds: (bytes per token per layer, bytes per model); methods pick one ----

def _inputs(arch: ArchInfo, groups: list, width: int, dropout: bool) -> float:
    """What adapters on ``groups`` keep of their inputs, per token per layer (module rules)."""
    layers = arch.num_layers
    if dropout:  # the dropout output and its mask
        return sum(g.count * 2 * g.in_features for g in groups) / layers * FP32
    if width < FP32:  # each module casts the shared input to fp32 for itself
        return sum(g.count * g.in_features for g in groups) / layers * FP32
    return _distinct_inputs(arch, groups) * FP32


def low_rank(arch: ArchInfo, targets: list[str], rank: int, width: int, *, dropout: bool = False,
             dora: bool = False) -> tuple[float, float]:
    """LoRA-like (B·A x, AdaLoRA too): r × F for B's input + the input; DoRA's extra terms."""
    groups = arch.matching(targets)
    layers = arch.num_layers
    per_token = sum(g.count for g in groups) * rank / layers * FP32 + _inputs(arch, groups, width, dropout)
    per_model = 0.0
    if dora:
        per_token += sum(g.count * 2 * g.out_features for g in groups) / layers * FP32
        if width < FP32 and dropout:
            # With dropout PEFT recomputes the base output as F.linear(x, W.to(fp32)), and
            # that fp32 copy of each adapted weight is kept for backward (peft lora/dora.py).
            per_model += sum(g.count * g.in_features * g.out_features for g in groups) * FP32
    return per_token, per_model


def materialised_delta(arch: ArchInfo, targets: list[str], width: int) -> tuple[float, float]:
    """LoHa / LoKr: the input, and the update ΔW (in × out, fp32) built once per module."""
    groups = arch.matching(targets)
    return (_inputs(arch, groups, width, False),
            sum(g.count * g.in_features * g.out_features for g in groups) * FP32)


def shared_projections(arch: ArchInfo, targets: list[str], rank: int) -> tuple[float, float]:
    """VeRA: x·A with A a frozen buffer keeps no input; λ_d and λ_b keep their operands (r + out);
    the slices are views of one shared pair, stored once at the largest shapes."""
    groups = arch.matching(targets)
    per_token = sum(g.count * (rank + g.out_features) for g in groups) / arch.num_layers * FP32
    per_model = rank * (max(g.in_features for g in groups) + max(g.out_features for g in groups)) * FP32
    return per_token, per_model


def scales(arch: ArchInfo, targets: list[str], feedforward: list[str], width: int) -> tuple[float, float]:
    """IA3: an attention target keeps its (W-wide) output to scale; a feed-forward target keeps
    its input, cast to fp32."""
    ff = {id(g) for g in arch.matching(feedforward)} if feedforward else set()
    return sum(g.count * (g.in_features * FP32 if id(g) in ff else g.out_features * width)
               for g in arch.matching(targets)) / arch.num_layers, 0.0


def bottleneck(arch: ArchInfo, r: int, width: int) -> tuple[float, float]:
    """Two bottleneck adapters per block, in the base's dtype: each keeps its input (d), the
    down-projection's output and its activation (2r)."""
    return 2 * (arch.hidden_size + 2 * r) * width, 0.0


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
