"""Orthogonal fine-tuning: OFT and BOFT, through PEFT (``OFTConfig``, ``BOFTConfig``).

The frozen weight W (out × in) is multiplied by a learned orthogonal matrix R (in × in) on its
input side, y = W R x: angles between the neurons of a layer are kept ("hyperspherical energy"),
which is what these methods are for. Both merge into W (W ← W R).

* OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"): R is
  block-diagonal, in / b blocks of b × b, each the Cayley transform of a skew-symmetric matrix
  (I + Q)(I − Q)⁻¹ (PEFT 0.21: by default its Neumann series, 5 terms). PEFT stores only the
  strict upper triangle of each Q, b(b − 1)/2 values, so per adapted Linear:
      count = (in / b) × b(b − 1)/2          (block_share: one block for all, b(b − 1)/2)
  e.g. SmolLM2, b = 32, every Linear of a block: 30 × (6 × 18 + 48) × 496 = 2,321,280.
  The block size b is per *input* feature; PEFT takes either b or the number of blocks r = in / b.
* BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
  Factorization"): R is a product of m block-diagonal factors, each conjugated by a butterfly
  permutation, so m small blocks mix distant features. PEFT stores every factor's D = in / b
  blocks as full b × b matrices (made skew-symmetric in the forward), plus a scale per output
  feature, so per adapted Linear:
      count = m × (in / b) × b² + out = m × in × b + out
  e.g. SmolLM2, b = 4, m = 1, attention: 30 × (4 × 576 × 4 + 576 + 192 + 192 + 576) = 322,560.

PEFT quietly rounds an OFT block size that does not divide a layer's width to one that does,
and refuses a BOFT one deep in model building; here every targeted layer is checked against
``ArchInfo`` first and a bad size is refused naming the layer and its width. GPT-2's Conv1D
layers are refused (PEFT's OFT and BOFT adapt nn.Linear only).

BOFT would JIT-compile a CUDA extension in every layer; ``boft_blockdiag`` gives PEFT a
pure-torch one instead (see there), installed whenever this registry is imported.

Memory beyond the adapter (what autograd saves, measured with ``memory_measure``; F = 4 bytes):
* OFT, per adapted Linear: its input (as LoRA's without dropout), the Cayley transform's saved
  products — Neumann: Q, Q², Q³ and R, 4 × (in / b) × b² × F (exact: Q's LU, pivots and R) —
  and its triangle index buffers.
* BOFT, per adapted Linear: its input (in the base's dtype: BOFT does not cast it), the scaled
  output (out per token), the solve of each factor's blocks (m × in × (3b + 1) × F), and three
  in × in matrices per factor: PEFT's dense permutation buffer (fp32, kept whether training or
  not) and two products of it; under a bf16 base the permutation is copied in bf16 every step.
  These in² terms are why BOFT costs far more memory than its parameter count suggests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio import activations
from studio.arch import ArchInfo
from studio.methods import boft_blockdiag
from studio.methods.base import (NO_OVERHEAD, REPARAMETERISATION, ApplyContext, Count, MethodSpec,
                                 SettingError, n, param, peft_type_is, resolve_targets)
from studio.methods.lora import TARGET_PRESETS

F = activations.FP32
BLOCK_MAX = 1024  # a 1024 × 1024 rotation block is already a dense layer's worth per block
BLOCKS_MAX = 65_536  # wider than any Linear input in a current model
BUTTERFLY_MAX = 8  # 2^7 = 128 blocks merged by the last factor

boft_blockdiag.install_when_imported()  # never compile PEFT's CUDA extension (no torch import here)


@dataclass(frozen=True)
class OftParams:
    oft_block_size: int = param(32, "Size b of each orthogonal block (PEFT's default 32). It must "
                                "divide the input width of every adapted layer; bigger blocks "
                                "train more. Not used when r is set.",
                                min=0, max=BLOCK_MAX, step=1)
    r: int = param(0, "Number of blocks per layer (b = width / r): when set (not 0) it replaces "
                   "oft_block_size; r must divide every adapted layer's input width.",
                   min=0, max=BLOCKS_MAX, step=1, advanced=True)
    block_share: bool = param(False, "One block shared by all blocks of a layer: far fewer "
                              "parameters, less capacity.")
    coft: bool = param(False, "Constrained OFT: keep each rotation within eps of the identity "
                       "(more stable, less change).")
    eps: float = param(6e-5, "COFT's radius (only with coft on).", min=1e-8, max=1.0,
                       advanced=True)
    use_cayley_neumann: bool = param(True, "Approximate the Cayley transform's inverse by 5 "
                                     "Neumann terms (PEFT's default, faster); off: the exact "
                                     "inverse.", advanced=True)
    target_preset: str = param("all-linear", "Which Linear layers to rotate.", choices=TARGET_PRESETS)
    target_modules: tuple = param((), "Custom module names (overrides the preset).", advanced=True)


@dataclass(frozen=True)
class BoftParams:
    boft_block_size: int = param(4, "Size b of each block of a butterfly factor (PEFT's default "
                                 "4). It must divide every adapted layer's input width. Not used "
                                 "when boft_block_num is set.", min=0, max=BLOCK_MAX, step=1)
    boft_block_num: int = param(0, "Number of blocks per factor (b = width / blocks): when set "
                                "(not 0) it replaces boft_block_size; it must divide every "
                                "adapted layer's input width.", min=0, max=BLOCKS_MAX, step=1,
                                advanced=True)
    boft_n_butterfly_factor: int = param(1, "Butterfly factors m: each more one mixes blocks twice "
                                         "as far apart (1 is OFT with a scale). Above 1, plain "
                                         "PEFT reloads the adapter only where its CUDA extension "
                                         "builds (the studio loads it everywhere): export it "
                                         "merged to share it.",
                                         min=1, max=BUTTERFLY_MAX, step=1)
    boft_dropout: float = param(0.0, "Share of each factor's blocks set to the identity at a "
                                "training step (multiplicative dropout).", min=0.0, max=0.5,
                                step=0.05)
    target_preset: str = param("attention", "Which Linear layers to rotate. Attention by default: "
                               "BOFT keeps dense in × in matrices per layer (see the estimate).",
                               choices=TARGET_PRESETS)
    target_modules: tuple = param((), "Custom module names (overrides the preset).", advanced=True)


def _groups(arch: ArchInfo, p: Any, title: str) -> list:
    """The targeted Linear groups; Conv1D (GPT-2) refused, as PEFT cannot adapt it."""
    targets = resolve_targets(arch, p.target_preset, p.target_modules)
    groups = arch.matching(targets)
    if not groups:
        raise SettingError(f"{title}: no module of this model matches {targets}; it has: "
                           f"{', '.join(arch.target_leaves)}")
    conv = sorted({g.path for g in groups if g.kind == "conv1d"})
    if conv:
        raise SettingError(f"{title} cannot adapt GPT-2-style Conv1D layers ({', '.join(conv)}): "
                           "PEFT's OFT and BOFT rotate nn.Linear only; use LoRA, AdaLoRA or IA3 "
                           "on this model")
    return groups


def _size_or_number(title: str, size_name: str, size: int, num_name: str, num: int) -> tuple[int, int]:
    """(block size, number of blocks) as PEFT takes them: exactly one non-zero. The number of
    blocks, when given, replaces the block size (whose default is always set), so setting only
    it is enough; both 0 is refused here instead of deep inside PEFT."""
    if size == 0 and num == 0:
        raise SettingError(f"{title}: set '{size_name}' (the size of a block) or '{num_name}' (the "
                           f"number of blocks); both are 0")
    return (0, num) if num else (size, 0)


def oft_blocks(arch: ArchInfo, p: OftParams) -> list[tuple[Any, int, int]]:
    """(group, block size b, blocks in / b) per targeted group; a size that does not divide a
    layer's input width is refused naming the layer (PEFT would round it silently)."""
    size, number = _size_or_number("OFT", "oft_block_size", p.oft_block_size, "r", p.r)
    out = []
    for g in _groups(arch, p, "OFT"):
        width = g.in_features
        if size:
            b = size
            if width % b:
                raise SettingError(f"OFT: oft_block_size {b} does not divide the input width "
                                   f"{width} of {g.path}; choose a divisor of {width} (e.g. "
                                   f"{_divisors_near(width, b)})")
        else:
            if width % number:
                raise SettingError(f"OFT: r = {number} blocks do not divide the input width {width} "
                                   f"of {g.path}; choose a divisor of {width} (e.g. "
                                   f"{_divisors_near(width, number)})")
            b = width // number
        if b < 2:
            raise SettingError(f"OFT: blocks of size {b} on {g.path} (width {width}) rotate "
                               "nothing: a block needs at least 2 features")
        out.append((g, b, width // b))
    return out


def boft_blocks(arch: ArchInfo, p: BoftParams) -> list[tuple[Any, int, int]]:
    """(group, block size b, blocks D = in / b) per targeted group, with PEFT's butterfly rules
    checked first: b·D = in, and with m > 1 factors b even and D a multiple of 2 and of 2^(m−1)."""
    size, number = _size_or_number("BOFT", "boft_block_size", p.boft_block_size, "boft_block_num",
                                   p.boft_block_num)
    m = p.boft_n_butterfly_factor
    spread = 2 ** (m - 1)  # the last factor's permutation pairs blocks this far apart
    out = []
    for g in _groups(arch, p, "BOFT"):
        width = g.in_features
        given, name = (size, "boft_block_size") if size else (number, "boft_block_num")
        if width % given:
            raise SettingError(f"BOFT: {name} {given} does not divide the input width {width} of "
                               f"{g.path}; choose a divisor of {width} (e.g. "
                               f"{_divisors_near(width, given)})")
        b, blocks = (given, width // given) if size else (width // given, given)
        if b < 2:
            raise SettingError(f"BOFT: blocks of size {b} on {g.path} (width {width}) rotate "
                               "nothing: a block needs at least 2 features")
        if m > 1 and (blocks % max(2, spread) or b % 2):
            raise SettingError(
                f"BOFT: {m} butterfly factors on {g.path} (width {width}) need an even block size "
                f"and a number of blocks that is a multiple of {max(2, spread)}; this layer has "
                f"{blocks} blocks of {b}: lower boft_n_butterfly_factor or change the blocks")
        out.append((g, b, blocks))
    return out


def _divisors_near(width: int, wanted: int) -> str:
    """The divisors of ``width`` nearest ``wanted``, for a refusal's hint."""
    divisors = [d for d in range(2, width + 1) if width % d == 0]
    return ", ".join(str(d) for d in sorted(sorted(divisors, key=lambda d: abs(d - wanted))[:3]))


def _formula(label: str, terms: list[tuple[int, str]], total: int) -> Count:
    counts = {c for c, _ in terms}
    if len(counts) == 1:
        body = " + ".join(t for _, t in terms)
        return Count(total, f"{label} = {counts.pop()} × ({body}) = {n(total)}")
    return Count(total, f"{label} = {' + '.join(f'{c} × {t}' for c, t in terms)} = {n(total)}")


def oft_count(arch: ArchInfo, p: OftParams) -> Count:
    terms, total = [], 0
    for g, b, blocks in oft_blocks(arch, p):
        triangle = b * (b - 1) // 2
        kept = 1 if p.block_share else blocks
        total += g.count * kept * triangle
        terms.append((g.count, f"{kept} × {triangle} {g.leaf}" if not p.block_share
                      else f"{triangle} {g.leaf}"))
    label = ("Σ b(b − 1)/2, one shared block per layer" if p.block_share
             else "Σ (in / b) × b(b − 1)/2")
    return _formula(label, terms, total)


def boft_count(arch: ArchInfo, p: BoftParams) -> Count:
    m = p.boft_n_butterfly_factor
    terms, total = [], 0
    for g, b, blocks in boft_blocks(arch, p):
        total += g.count * (m * blocks * b * b + g.out_features)
        terms.append((g.count, f"({m} × {blocks} × {b}² + {g.out_features})"))
    return _formula("Σ (m × (in / b) × b² + out)", terms, total)


def oft_tensors(arch: ArchInfo, p: OftParams) -> list[tuple[int, int]]:
    """One tensor per adapted Linear: its blocks' upper triangles (r × b(b − 1)/2)."""
    return [((1 if p.block_share else blocks) * (b * (b - 1) // 2), g.count)
            for g, b, blocks in oft_blocks(arch, p)]


def boft_tensors(arch: ArchInfo, p: BoftParams) -> list[tuple[int, int]]:
    """boft_R (m × D × b × b) and boft_s (out × 1) per adapted Linear."""
    m = p.boft_n_butterfly_factor
    return [pair for g, b, blocks in boft_blocks(arch, p)
            for pair in ((m * blocks * b * b, g.count), (g.out_features, g.count))]


def oft_activations(arch: ArchInfo, p: OftParams, width: int) -> tuple[float, float]:
    """Per token: each adapted Linear's input (LoRA's input rule: a rank of 0 adds nothing
    else). Per model, per adapted Linear: the Cayley transform's saved products, the rotation
    the einsum keeps, and the triangle index buffers (int64)."""
    placed = oft_blocks(arch, p)
    per_token = activations.low_rank(arch, [g.path for g, _, _ in placed], 0, width)[0]
    per_model = 0.0
    for g, b, blocks in placed:
        made = 1 if p.block_share else blocks  # blocks the Cayley transform computes
        if p.use_cayley_neumann:
            cayley = 3 * made * b * b  # Q, Q², Q³ (the bmm operands)
        else:
            cayley = 2 * made * b * b + made * b + (b * b if p.block_share else 0)  # LU, pivots
        rotation = blocks * b * b  # R as the einsum uses it (repeated when shared)
        index = b * (b - 1) * 8  # rows and cols, int64, one storage
        per_model += g.count * ((cayley + rotation) * F + index)
    return per_token, per_model


def boft_activations(arch: ArchInfo, p: BoftParams, width: int) -> tuple[float, float]:
    """Per token: the distinct inputs in the base's dtype and each adapted Linear's output
    before its scale. Per model, per adapted Linear: the solve of the factors' blocks, the fp32
    permutation buffer and two in × in products per factor (bf16 copies under a bf16 base, with
    the permutation's), and the scale vectors."""
    placed = boft_blocks(arch, p)
    m = p.boft_n_butterfly_factor
    inputs = activations.low_rank(arch, [g.path for g, _, _ in placed], 0, F)[0] / F * width
    outputs = sum(g.count * g.out_features for g, _, _ in placed) / arch.num_layers * width
    per_model = 0.0
    for g, b, _ in placed:
        square = m * g.in_features * g.in_features
        solve = m * g.in_features * (3 * b + 1) * F
        per_model += g.count * (solve + square * F + 2 * square * width
                                + (square * width if width < F else 0) + 2 * g.out_features * F)
    return inputs + outputs, per_model


def _targets(arch: ArchInfo, placed: list) -> list[str]:
    return list(dict.fromkeys(g.path for g, _, _ in placed))


def apply_oft(model: Any, arch: ArchInfo, p: OftParams, ctx: ApplyContext) -> Any:
    from peft import OFTConfig, get_peft_model

    placed = oft_blocks(arch, p)  # refuses what PEFT would round or fail on, naming the layer
    size, number = _size_or_number("OFT", "oft_block_size", p.oft_block_size, "r", p.r)
    config = OFTConfig(r=number, oft_block_size=size, block_share=p.block_share,
                       coft=p.coft, eps=p.eps, use_cayley_neumann=p.use_cayley_neumann,
                       target_modules=_targets(arch, placed), bias="none",
                       task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def apply_boft(model: Any, arch: ArchInfo, p: BoftParams, ctx: ApplyContext) -> Any:
    from peft import BOFTConfig, get_peft_model

    boft_blockdiag.install()  # idempotent; the import hook has normally done it already
    placed = boft_blocks(arch, p)  # refuses what PEFT would fail on deep inside, naming the layer
    size, number = _size_or_number("BOFT", "boft_block_size", p.boft_block_size, "boft_block_num",
                                   p.boft_block_num)
    config = BOFTConfig(boft_block_size=size, boft_block_num=number,
                        boft_n_butterfly_factor=p.boft_n_butterfly_factor,
                        boft_dropout=p.boft_dropout, bias="none",
                        target_modules=_targets(arch, placed), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _arch_of(run: Any) -> ArchInfo | None:
    """The run's model's shapes through the planner's cache (memory, then a JSON file, then one
    child process per model): what the Method tab and the start service read too, so in practice
    it is already there, and a process without torch never imports it for this."""
    from studio import planner

    try:
        return planner.arch_for(run.model, run.trust_remote_code)
    except Exception:  # an unreadable model is refused by the start checks, with their reason
        return None


def _run_check(blocks: Any) -> Any:
    """Refuse block sizes the model's layers cannot take before a run row exists."""
    def run_check(params: Any, run: Any, device: str | None) -> str | None:
        arch = _arch_of(run)
        if arch is None:
            return None
        try:
            blocks(arch, params)
        except SettingError as exc:
            return f"runspec 'method_settings': {exc}"
        return None
    return run_check


# Both methods: PEFT's MetaMathQA method comparison (peft/method_comparison/MetaMathQA) trains
# OFT (r = 32) and BOFT (its defaults) at the same learning rate as LoRA (1e-4 for all), so the
# bake-off gives them LoRA's rate here.
LEARNING_RATE = 2e-4

SPECS = [
    MethodSpec(
        name="oft", title="OFT", family=REPARAMETERISATION, mergeable=True,
        inference_overhead=NO_OVERHEAD,
        guidance="Rotates each layer's inputs by a learned block-diagonal orthogonal matrix: keeps "
                 "the angles between a layer's neurons, so it tends to forget less of what the "
                 "base knows; merges like LoRA.",
        params_cls=OftParams, count=oft_count, apply=apply_oft, tensors=oft_tensors,
        recognises=peft_type_is("OFT"), activations=oft_activations,
        default_learning_rate=LEARNING_RATE, run_check=_run_check(oft_blocks),
    ),
    MethodSpec(
        name="boft", title="BOFT", family=REPARAMETERISATION, mergeable=True,
        inference_overhead=NO_OVERHEAD,
        guidance="OFT with butterfly factors: a few small blocks per factor mix distant features, "
                 "with fewer parameters than OFT for the same reach. Memory-heavy in PEFT (dense "
                 "in × in matrices per layer); merges like LoRA.",
        params_cls=BoftParams, count=boft_count, apply=apply_boft, tensors=boft_tensors,
        recognises=peft_type_is("BOFT"), activations=boft_activations,
        default_learning_rate=LEARNING_RATE, run_check=_run_check(boft_blocks),
    ),
]
