"""GaLore and APOLLO: every weight trains, and the optimizer keeps its state in a low-rank space.

* GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection"): each targeted m×n weight's gradient G (m ≤ n, the shorter side) is projected
  onto its top-r singular vectors, P = U[:, :r] (an SVD of G every ``update_proj_gap`` steps);
  Adam's moments live in the r × n projection and the update is projected back, times ``scale``.
* APOLLO (Zhu et al. 2025, "APOLLO: SGD-like Memory, AdamW-level Performance"): the same
  projection but random (a seeded Gaussian m × r / √r, no SVD); the projected Adam update only
  measures a per-channel (or per-tensor) scaling factor, applied to the raw gradient.
  APOLLO-Mini is rank 1 with ``scale_type`` tensor (the paper pairs it with scale 128).

Both train through transformers' own integration (``TrainingArguments(optim="galore_adamw" |
"galore_adamw_8bit" | "galore_adafactor" | "apollo_adamw", optionally "_layerwise",
optim_target_modules, optim_args)``) with the authors' packages, galore-torch 1.0 and
apollo-torch 1.0.3 (``pip install "peft-studio[galore]"``). Only ``nn.Linear`` weights are
projected (transformers skips anything else, so GPT-2's Conv1D blocks have no target); every
other parameter (embeddings, norms, the output layer) gets the plain optimizer.

Count (as full fine-tuning): every parameter trains, count = all parameters.

Optimizer state after the first step, read off the packages' sources and checked byte for byte
against a real optimizer (tests/test_galore.py). W = the weights' width (4 B fp32, 2 B bf16);
per targeted m×n matrix, m ≤ n, r' = min(r, m) for an SVD projection (galore-torch slices the
SVD's factors), r for APOLLO's random one:
  AdamW (galore_torch.AdamW, apollo_torch.APOLLOAdamW): moments 2 × r' × n × W; projector: in
    fp32 the slice U[:, :r] / Vh[:r] is a *view* that keeps the SVD's whole m × m factor alive,
    so m × m × 4 B; in bf16 a copy, m × r' × 2 B; APOLLO's random projector m × r × W, plus one
    scalar (the previous scaled-gradient norm, W B). Other parameters: 2 × numel × W.
  Adafactor (galore_torch.GaLoreAdafactor, no first moment as transformers sets it up): the
    gradient is cast to fp32 first, so factored second moments (n + r') × 4 B and an fp32 SVD
    projector m × m × 4 B; other 2-D tensors rows + cols, 1-D ones numel, × 4 B; plus one fp32
    RMS scalar per tensor.
  AdamW 8-bit (galore_torch.AdamW8bit over bitsandbytes): bitsandbytes' 8-bit state of r' × n
    per targeted matrix and of every other tensor (``_bnb_8bit``), plus the projector as for
    AdamW. Its step calls ``torch.cuda.synchronize()``: offered on a GPU only (the test measures
    it on the CPU with that call, meaningless without CUDA, made a no-op).
  Full AdamW would keep 2 × m × n × W per matrix instead.
Layer-wise (``*_layerwise``): transformers gives every parameter its own optimizer and steps it
in a post-accumulate-grad hook, then frees the gradient; the state is the same, but only about
one tensor's gradient is held at a time instead of all of them. It cannot accumulate gradients
over micro-batches (transformers refuses ``gradient_accumulation_steps`` > 1) nor run under DDP,
and its checkpoints hold only transformers' dummy optimizer: a resumed layer-wise run starts its
moments and its learning-rate schedule afresh (the studio's warm-up fix does not reach the
per-parameter schedulers either, so its first step runs at rate 0 when there is a warm-up).
The gradients are gone when the Trainer measures and clips them: a layer-wise run logs a
grad_norm of 0 and its updates are not clipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from typing import Any

from studio.arch import ArchInfo
from studio.methods.base import (NO_OVERHEAD, SELECTIVE, Advice, Count, MethodSpec, OptimizerState,
                                 SettingError, n, param, resolve_targets)
from studio.methods.baselines import apply_full, full_tensors

TARGET_PRESETS = ("attention", "mlp", "all-linear")
INSTALL_HINT = 'pip install "peft-studio[galore]" (galore-torch and apollo-torch)'
PACKAGES = {"galore": "galore_torch", "apollo": "apollo_torch"}


@dataclass(frozen=True)
class GaLoreParams:
    rank: int = param(128, "Rank r of the gradient projection: Adam's moments of an m×n weight "
                      "take r × n values instead of m × n. The paper uses 128-1024 for "
                      "pre-training; 8-128 is common for fine-tuning.", min=1, max=8192, step=1)
    update_proj_gap: int = param(200, "Steps between two SVDs that choose the projection "
                                 "(T in the paper).", min=1, max=1_000_000, step=1)
    scale: float = param(0.25, "α: the projected-back update is multiplied by it (the paper's "
                         "default 0.25; its fine-tuning scripts use 2-4 with a lower learning "
                         "rate).", min=0.001, max=1000.0, step=0.05)
    variant: str = param("adamw", "The optimizer that runs in the projected space: AdamW, "
                         "bitsandbytes' 8-bit AdamW (GPU only), or Adafactor (factored second "
                         "moments).", choices=("adamw", "adamw_8bit", "adafactor"))
    layerwise: bool = param(False, "Update each weight as soon as its gradient is ready and free "
                            "the gradient: saves nearly all gradient memory; needs gradient "
                            "accumulation 1.")
    target_preset: str = param("all-linear", "Which Linear layers of the blocks get the projected "
                               "optimizer; every other parameter trains with the plain one.",
                               choices=TARGET_PRESETS)
    target_modules: tuple = param((), "Custom module names (overrides the preset), e.g. "
                                  "q_proj,v_proj. nn.Linear layers only.", advanced=True)


@dataclass(frozen=True)
class ApolloParams:
    rank: int = param(128, "Rank r of the random projection. APOLLO-Mini: rank 1 with "
                      "scale_type tensor.", min=1, max=8192, step=1)
    update_proj_gap: int = param(200, "Steps between two fresh random projections.",
                                 min=1, max=1_000_000, step=1)
    scale: float = param(1.0, "α: the scaled gradient is multiplied by √α (APOLLO-Mini uses "
                         "128).", min=0.001, max=100_000.0, step=0.5)
    proj: str = param("random", "Projection: a seeded Gaussian (the paper's; no SVD) or the SVD "
                      "as in GaLore.", choices=("random", "svd"))
    scale_type: str = param("channel", "Scaling factor per output channel, or one per tensor "
                            "(APOLLO-Mini).", choices=("channel", "tensor"))
    layerwise: bool = param(False, "Update each weight as soon as its gradient is ready and free "
                            "the gradient: saves nearly all gradient memory; needs gradient "
                            "accumulation 1.")
    target_preset: str = param("all-linear", "Which Linear layers of the blocks get the projected "
                               "optimizer; every other parameter trains with plain AdamW.",
                               choices=TARGET_PRESETS)
    target_modules: tuple = param((), "Custom module names (overrides the preset), e.g. "
                                  "q_proj,v_proj. nn.Linear layers only.", advanced=True)


def _is_apollo(p: Any) -> bool:
    return isinstance(p, ApolloParams)


def targeted(arch: ArchInfo, p: Any) -> list:
    """The Linear groups the optimizer projects: the targets' matches that are ``nn.Linear``
    (transformers ignores other module kinds: GPT-2's Conv1D)."""
    names = resolve_targets(arch, p.target_preset, p.target_modules)
    groups = arch.matching(names)
    if not groups:
        raise SettingError(f"no module of this model matches {names}; it has: "
                           f"{', '.join(arch.target_leaves)}")
    linear = [g for g in groups if g.kind == "linear"]
    if not linear:
        raise SettingError(f"{', '.join(sorted({g.leaf for g in groups}))} of this model are "
                           f"{groups[0].kind} layers, not nn.Linear: transformers' GaLore/APOLLO "
                           "projects only nn.Linear weights, so this model has nothing to project")
    return linear


def target_regex(arch: ArchInfo, p: Any) -> str:
    """``optim_target_modules`` as one regex that transformers fullmatches against module names:
    a module inside a numbered block whose block-relative path ends with a target, the rule
    ``ArchInfo.matching`` (PEFT's suffix match) applies, so the estimate and the optimizer pick
    the same weights. A list would be matched by substring (``"up_proj" in "gate_up_proj"``)."""
    names = resolve_targets(arch, p.target_preset, p.target_modules)
    return r".*\.\d+\.(?:.*\.)?(?:" + "|".join(re.escape(t) for t in names) + ")"


def optim_name(p: Any) -> str:
    base = "apollo_adamw" if _is_apollo(p) else f"galore_{p.variant}"
    return base + ("_layerwise" if p.layerwise else "")


def allow_projectors_in_checkpoints() -> None:
    """A checkpoint's ``optimizer.pt`` holds the packages' projector objects, and the Trainer
    reads it back with ``torch.load(weights_only=True)``, which refuses any class not allowed:
    Resume failed with "Unsupported global: GaLoreProjector". These three classes are plain
    records (rank, gap, scale, type, seed and the projection tensor), so allowing exactly them
    keeps the safe loader and makes Resume work."""
    import torch

    allowed = []
    for module, name in (("galore_torch.galore_projector", "GaLoreProjector"),
                         ("apollo_torch.svd_projector", "GaLoreProjector"),
                         ("apollo_torch.random_projector", "GradientProjector")):
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except ImportError:  # that package is not installed: its runs are refused (run_check)
            continue
    torch.serialization.add_safe_globals(allowed)


def trainer_optim(arch: ArchInfo, p: Any) -> dict[str, Any]:
    """The ``TrainingArguments`` keywords (``MethodSpec.trainer_optim``); called by the worker
    before it builds the Trainer, so it also lets a checkpoint's projectors load on Resume."""
    targeted(arch, p)  # refuses a model with nothing to project, before transformers does
    allow_projectors_in_checkpoints()
    args = {"rank": p.rank, "update_proj_gap": p.update_proj_gap, "scale": p.scale, "proj_type": "std"}
    if _is_apollo(p):
        args.update(proj=p.proj, scale_type=p.scale_type)
    return {"optim": optim_name(p), "optim_target_modules": target_regex(arch, p),
            "optim_args": ",".join(f"{k}={v}" for k, v in args.items())}


def count(arch: ArchInfo, p: Any) -> Count:
    return Count(arch.total_params, f"all parameters = {n(arch.total_params)} (every weight "
                                    f"trains; the optimizer keeps rank-{p.rank} state for the "
                                    "targeted matrices)")


def _other_2d(arch: ArchInfo, targets: list) -> tuple[list[tuple[int, int, int]], int]:
    """Adafactor factors every 2-D tensor: the (rows, cols, how many) of the parameters not
    projected, and the numel of the 1-D rest (norms, biases)."""
    chosen = {id(g) for g in targets}
    tied = arch.lm_head_params == 0
    mats = [(g.out_features, g.in_features, g.count) for g in arch.linears
            if id(g) not in chosen and not (tied and not g.in_blocks and g.out_features == arch.vocab_size)]
    mats.append((arch.vocab_size, arch.hidden_size, 1))  # the token embedding
    extra = arch.embedding_params - arch.vocab_size * arch.hidden_size
    if extra > 0:  # learned position embeddings (GPT-2's wpe: positions × d)
        mats.append((extra // arch.hidden_size, arch.hidden_size, 1))
    projected = sum(g.in_features * g.out_features * g.count for g in targets)
    flat = arch.total_params - projected - sum(r * c * k for r, c, k in mats)
    return mats, flat


BNB_MIN_8BIT, BNB_BLOCK, BNB_QMAPS = 4096, 256, 2 * 256 * 4  # bitsandbytes' Optimizer2State


def _bnb_8bit(tensors: list[tuple[int, int]]) -> int:
    """galore-torch's AdamW8bit state over (numel, how many) tensors, as bitsandbytes 0.50
    allocates it: two uint8 moments and one fp32 absmax per 256-value block each, or two fp32
    moments below 4,096 values; and a 4 B ``unorm_vec`` per tensor. The last is there because
    galore-torch 1.0 passes ``percentile_clipping=100, block_wise=True`` by position into what
    bitsandbytes now calls ``max_unorm, skip_zeros`` (update-norm clipping at 100 × the weight's
    norm, which in practice never clips). The two quantisation maps are one pair for all
    tensors (counted once by the caller; ``estimate.adamw8bit_bytes`` counts them per tensor)."""
    total = 0
    for numel, count in tensors:
        state = 8 * numel if numel < BNB_MIN_8BIT else 2 * numel + 8 * -(-numel // BNB_BLOCK)
        total += count * (state + 4)
    return total


def optimizer_state(arch: ArchInfo, p: Any, width: int) -> OptimizerState:
    """The optimizer's state term (module docstring), projectors included."""
    groups = targeted(arch, p)
    random = _is_apollo(p) and p.proj == "random"
    variant = "adamw" if _is_apollo(p) else p.variant
    shapes = [(min(g.in_features, g.out_features), max(g.in_features, g.out_features), g.count)
              for g in groups]
    rank = [(m, nn_, k, p.rank if random else min(p.rank, m)) for m, nn_, k in shapes]
    projected = sum(m * nn_ * k for m, nn_, k in shapes)
    others = arch.total_params - projected
    if variant == "adafactor" or (width == 4 and not random):
        proj = sum(k * m * m * 4 for m, _, k, _ in rank)
        proj_text = "SVD projector m × m × 4 B (a view of the SVD's factor)"
    else:
        proj = sum(k * m * r * width for m, _, k, r in rank)
        proj_text = f"projector m × r × {width} B"
    if variant == "adafactor":
        mats, flat = _other_2d(arch, groups)
        tensors = sum(k for _, k in arch.param_tensors)
        moments = sum(k * (nn_ + r) * 4 for _, nn_, k, r in rank)
        rest = sum(k * (rows + cols) * 4 for rows, cols, k in mats) + flat * 4 + tensors * 4
        text = (f"Adafactor: targeted Σ (n + r) × 4 B = {n(moments)} + {proj_text} = {n(proj)} "
                f"+ other 2-D rows + cols, 1-D numel, × 4 B, one RMS per tensor = {n(rest)}")
    elif variant == "adamw_8bit":
        left: dict[int, int] = dict()
        for numel, k in arch.param_tensors:
            left[numel] = left.get(numel, 0) + k
        for m, nn_, k in shapes:
            left[m * nn_] -= k
        moments = _bnb_8bit([(r * nn_, k) for _, nn_, k, r in rank])
        rest = _bnb_8bit([(numel, k) for numel, k in left.items() if k > 0])
        eight_bit = any(size >= BNB_MIN_8BIT for size, k in
                        [(r * nn_, k) for _, nn_, k, r in rank] + list(left.items()) if k > 0)
        rest += BNB_QMAPS if eight_bit else 0
        text = (f"AdamW 8-bit: targeted r × n states = {n(moments)} + {proj_text} = {n(proj)} "
                f"+ other tensors' 8-bit states = {n(rest)} (per tensor: 2 B per value + an fp32 "
                f"absmax per 256, fp32 moments below {BNB_MIN_8BIT:,} values, a 4 B update norm; "
                "two shared 256-entry maps)")
    else:
        moments = sum(k * 2 * r * nn_ * width for _, nn_, k, r in rank)
        if _is_apollo(p):  # the previous scaled-gradient norm, a 0-d tensor per targeted weight
            moments += sum(k for *_, k, _ in rank) * width
        rest = 2 * others * width
        text = (f"AdamW: targeted Σ 2 × r × n × {width} B = {n(moments)} + {proj_text} = "
                f"{n(proj)} + other {n(others)} × 2 × {width} B = {n(rest)} (full AdamW: "
                f"{n(2 * arch.total_params * width)} B)")
    largest = max(numel for numel, _ in arch.param_tensors)
    if not p.layerwise:  # what the switch would save (the gradients term says it when on)
        text += (f"; with 'layerwise' on, the same state, and about one tensor's gradient held "
                 f"({n(largest * width)} B) instead of all {n(arch.total_params * width)} B")
    # A per-parameter loop: the update and its denominator for one tensor at a time.
    return OptimizerState(moments + proj + rest, text, step_temporary=2 * largest * width,
                          frees_gradients=p.layerwise)


def run_check(p: Any, spec: Any, device: str | None) -> str | None:
    """Why a run with these settings cannot train (``MethodSpec.run_check``), or None."""
    what = "APOLLO" if _is_apollo(p) else "GaLore"
    package = PACKAGES["apollo" if _is_apollo(p) else "galore"]
    if importlib.util.find_spec(package) is None:
        return f"{what} needs the {package} package, which is not installed: {INSTALL_HINT}"
    if spec.optimizer != "adamw":
        choose = "" if _is_apollo(p) else " (choose GaLore's with the method setting 'variant')"
        return (f"runspec 'optimizer': {what} is itself the optimizer{choose}; leave the run's "
                f"optimizer at adamw (got {spec.optimizer!r})")
    if spec.weight_decay:
        return (f"runspec 'weight_decay': transformers' {what} integration passes no weight decay "
                f"to the optimizer, so it would be ignored; set it to 0 (got {spec.weight_decay})")
    if p.layerwise and spec.grad_accum != 1:
        return (f"runspec 'grad_accum': layer-wise {what} updates each weight as soon as its "
                "gradient is ready, so gradients cannot accumulate over micro-batches; set "
                f"grad_accum to 1 or turn 'layerwise' off (got {spec.grad_accum})")
    if device == "cpu" and getattr(p, "variant", "") == "adamw_8bit":
        return ("galore 'variant': adamw_8bit (galore-torch over bitsandbytes) calls "
                "torch.cuda.synchronize() in every step and needs a CUDA GPU; on the CPU choose "
                "adamw or adafactor")
    return None


COMMON = dict(
    family=SELECTIVE, mergeable=True, inference_overhead=NO_OVERHEAD, count=count,
    apply=lambda model, arch, p, ctx: apply_full(model, arch, p, ctx), tensors=full_tensors,
    notes="Nothing to merge: the result is a whole model.", whole_model=True, input_trains=True,
    trains_output_layer=True, trainer_optim=trainer_optim, optimizer_state=optimizer_state,
    run_check=run_check,
)
GALORE = MethodSpec(
    name="galore", title="GaLore", params_cls=GaLoreParams,
    guidance="Full-parameter training with the optimizer's state in a rank-r projection of each "
             "gradient: close to full fine-tuning's quality for much less optimizer memory; "
             "saves a whole model per task.",
    # The authors' GLUE fine-tuning scripts use lr 1e-5 to 3e-5 with scale 2 to 4, an effective
    # projected step of 2e-5 to 1.2e-4; at the default scale 0.25, 1e-4 gives 2.5e-5, close to
    # full fine-tuning's 2e-5 (jiaweizzhao/GaLore, scripts/glue; transformers' default scale).
    default_learning_rate=1e-4,
    advice=Advice(3, "full-parameter training in less memory", quality_needs_fit=True, large_data=True),
    **COMMON,
)
APOLLO = MethodSpec(
    name="apollo", title="APOLLO", params_cls=ApolloParams,
    guidance="Full-parameter training with AdamW's behaviour from a random low-rank projection: "
             "no SVD, and rank 1 (APOLLO-Mini) keeps almost no optimizer state; saves a whole "
             "model per task.",
    # The APOLLO-Mini commonsense fine-tuning of Llama-3.2-1B in the DoRA repository's scripts
    # (Kyriection/DoRA, commonsense_reasoning/script/APOLLO_mini.sh) uses 1e-4.
    default_learning_rate=1e-4,
    advice=Advice(3, "full-parameter training in less memory", quality_needs_fit=True, large_data=True),
    **COMMON,
)
SPECS = [GALORE, APOLLO]
