"""What every fine-tuning method declares: its hyperparameters, its closed-form trainable count,
how to apply it to a model, and the facts a user chooses by (family, merging, inference cost).

A method's ``Params`` is a dataclass whose fields carry ``metadata`` (help text, bounds, choices);
the Method tab turns those into widgets and the CLI parses ``--set key=value`` against them
(``settings.parse_params``), so a hyperparameter is declared once. Importing this module costs nothing: no torch, no peft.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from studio.arch import ArchInfo
from studio.methods.settings import SettingError, default_of, parse_params

ADDITIVE = "additive"
REPARAMETERISATION = "reparameterisation"
SELECTIVE = "selective"

NO_OVERHEAD = "none: merges into the weights"
EXTRA_MODULES = "extra sequential modules at every layer"
LONGER_CONTEXT = "longer context: virtual tokens in front of every prompt"
SCALES = "none once merged; otherwise one elementwise scale per adapted layer"


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, step: float | None = None, advanced: bool = False) -> Any:
    """A hyperparameter field: its default plus what the UI needs to render and bound it."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "step": step,
            "advanced": advanced}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Count:
    """A trainable-parameter count and the formula that produced it, numbers filled in."""

    trainable: int
    formula: str

    def __str__(self) -> str:
        return self.formula


@dataclass(frozen=True)
class ApplyContext:
    """What ``MethodSpec.apply`` may need besides the model: the tokenizer (prompt tuning starts
    its virtual tokens from a text's embeddings), where the tokenizer lives (PEFT reloads it by
    path), and the device and dtype the model was loaded on."""

    tokenizer: Any = None
    tokenizer_path: str | None = None
    device: str = "cpu"
    dtype: str = "float32"  # the load dtype, as torch names it
    # FSDP or ZeRO-3 will flatten the model's parameters into one tensor per unit, of one dtype:
    # a method must then not cast some of them to another (``strategy.flattens_parameters``).
    sharded: bool = False


@dataclass(frozen=True)
class OptimizerState:
    """What a method's own optimizer keeps (``MethodSpec.optimizer_state``), for the estimate."""

    bytes: int  # its state after the first step, projectors included
    formula: str
    # Bytes the step allocates at once on top (one tensor's temporaries for a per-parameter loop;
    # torch's foreach AdamW takes a parameter-sized one for the whole model, see estimate.py).
    step_temporary: int = 0
    # Each gradient is freed as soon as its parameter is updated (layer-wise updates in
    # post-accumulate-grad hooks), so about one tensor's gradient is held, not all of them.
    frees_gradients: bool = False


@dataclass(frozen=True)
class Advice:
    """What the method advisor (``studio.advisor``) weighs for a method besides its estimate."""

    quality: int = 0  # points when quality comes first (DoRA +4, LoRA +2, virtual tokens -2)
    quality_reason: str = ""
    quality_needs_fit: bool = False  # those points only when it fits (or the GPU is unknown)
    large_data: bool = False  # has the capacity for a large dataset (+1 above 50,000 examples)
    default_choice: bool = False  # the well-trodden default (+1)


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method: what it is, how to count and apply it, and the hooks through which
    the estimate, the worker, export, Compare and the bake-off learn its particulars. Code outside
    ``studio/methods/`` asks these fields and never compares a method's name (a new method is one
    module plus one line in the registry)."""

    name: str
    title: str
    family: str
    mergeable: bool
    inference_overhead: str
    guidance: str  # when to use it, in one or two sentences
    params_cls: type
    count: Callable[[ArchInfo, Any], Count]
    apply: Callable[[Any, ArchInfo, Any, ApplyContext], Any]  # (model, arch, params, ctx) -> trainable model
    notes: str = ""
    # Sizes of the trainable tensors as (numel, how many): what an optimizer allocates state for.
    tensors: Callable[[ArchInfo, Any], list[tuple[int, int]]] | None = None
    # Its trainable modules take the base's dtype (bf16 on a GPU) instead of PEFT's fp32
    # adapters (autocast_adapter_dtype): what the memory estimate counts per trainable value.
    adapter_in_base_dtype: bool = False

    # --- the trained artefact ---
    # Trains the model's own tensors (full, last N): the run saves a whole model, not an adapter;
    # the estimate counts its gradients and states in the base's dtype.
    whole_model: bool = False
    # Its adapter folder is PEFT's, so plain ``peft`` loads it; False: the studio's own format
    # (bottleneck adapters), loaded with the studio. Meaningless for whole-model methods.
    peft_adapter: bool = True
    # The frozen base is loaded quantised: params -> transformers quantization config (4-bit).
    quantization: Callable[[Any], Any] | None = None
    # (the saved adapter_config.json, or the studio's bottleneck_config.json) -> this method saved
    # it: how Compare names an adapter folder. None: its folders look like another method's
    # (LoRA+ and QLoRA save plain LoRA adapters).
    recognises: Callable[[dict], bool] | None = None
    # The same method on a 4-bit base (LoRA -> QLoRA), for the OOM advice; None: there is none.
    quantized_variant: str | None = None
    advice: Advice = Advice()  # what the advisor weighs besides the estimate
    # Its trained adapters can be composed into a new one with PEFT's add_weighted_adapter
    # (``studio.adapters.compose``): plain LoRA adapters (LoRA, rsLoRA, LoRA+, QLoRA). Not DoRA,
    # whose magnitude vectors PEFT does not combine, nor any other PEFT tuner.
    composable: bool = False

    # --- training ---
    # The customary learning rate (the methods' papers and PEFT's examples): the bake-off's rate.
    default_learning_rate: float = 2e-4
    # (model, params, lr, weight_decay) -> a torch optimizer with the method's parameter groups
    # (LoRA+: B faster than A), or None for the Trainer's default optimizer.
    optimizer: Callable[[Any, Any, float, float], Any] | None = None

    # --- what the memory estimate needs (studio.estimate, studio.activations) ---
    # (arch, params, compute width in bytes) -> (bytes per token per layer, bytes per model) the
    # adapter adds to what autograd saves for backward; None: nothing (virtual tokens, baselines).
    activations: Callable[[ArchInfo, Any, int], tuple[float, float]] | None = None
    # (arch, params, compute width in bytes) -> bytes per sequence, whatever its length, per
    # layer (averaged over the layers, as ``activations``) the adapter adds to what is saved (LLaMA-Adapter: its prompt's keys and values repeated to
    # every query head); None: nothing.
    sequence_activations: Callable[[ArchInfo, Any, int], float] | None = None
    # (arch, params) -> (bytes, formula) of non-trainable state the method adds (AdaLoRA's rank
    # counters); None: none.
    extra_state: Callable[[ArchInfo, Any], tuple[int, str]] | None = None
    # params -> virtual tokens prepended to every input sequence (prompt tuning).
    input_tokens: Callable[[Any], int] | None = None
    # params -> virtual key/value positions in front of every layer's attention (prefix tuning).
    prefix_tokens: Callable[[Any], int] | None = None
    # The embedded input needs a gradient (the embeddings or virtual input tokens train).
    input_trains: bool = False
    # (arch, params) -> the decoder blocks, counted from the top, that hold trainable parameters
    # (None: all of them): the blocks below need no backward and keep no activations (last N,
    # LLaMA-Adapter's top layers). Whole-model methods: whether the final norm and output layer
    # train too.
    trained_blocks: Callable[[ArchInfo, Any], int] | None = None
    trains_output_layer: bool = False

    # --- a method that is an optimizer (GaLore, APOLLO: whole-model training, state projected) ---
    # (arch, params) -> the ``TrainingArguments`` keywords that select it through transformers'
    # own optimizer integration (``optim``, ``optim_target_modules``, ``optim_args``); the worker
    # passes them on in place of the run's optimizer. None: the run's optimizer.
    trainer_optim: Callable[[ArchInfo, Any], dict[str, Any]] | None = None
    # (arch, params, width of a trained value in bytes) -> ``OptimizerState``: the optimizer's
    # state term of the estimate, replacing the run's optimizer over ``tensors``. None: that one.
    optimizer_state: Callable[[ArchInfo, Any, int], "OptimizerState"] | None = None
    # (params, run spec, device kind "cuda" | "cpu", or None before the device is known) -> why
    # this run cannot train with these settings, or None. Asked by ``RunSpec.validate`` and by
    # ``run_setup.training_setup``, so a refusal comes before a run row or a model load.
    run_check: Callable[[Any, Any, str | None], str | None] | None = None

    @property
    def quantized(self) -> bool:
        """The frozen base is loaded quantised (4-bit)."""
        return self.quantization is not None

    @property
    def packs_exactly(self) -> bool:
        """Packed examples stay apart under this method. Not with virtual tokens: PEFT drops the
        ``position_ids`` that keep packed examples apart for prompt tuning, and prefix tuning's
        key/value cache switches transformers' packed-sequence detection off, so examples in one
        row would attend to each other (``studio/data/packing.py`` has the conditions)."""
        return self.input_tokens is None and self.prefix_tokens is None

    def default_params(self) -> Any:
        return self.params_cls()

    def params(self, settings: dict[str, Any] | None = None) -> Any:
        """``Params`` from user settings (strings from the CLI, or typed values from the UI)."""
        return parse_params(self.params_cls, settings or {}, self.name)

    def fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.params_cls))


def peft_type_is(peft_type: str, **flags: bool) -> Callable[[dict], bool]:
    """``recognises`` for a PEFT adapter: its ``peft_type``, and config flags that must be set
    (True) or not set (False), e.g. ``use_dora=True``."""
    def recognises(config: dict) -> bool:
        return (str(config.get("peft_type", "")).upper() == peft_type
                and all(bool(config.get(k)) == v for k, v in flags.items()))
    return recognises


def n(value: int | float) -> str:
    """A number as the formulas show it: thousands separated."""
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def per_module_sum(arch: ArchInfo, targets: list[str], term: Callable[[Any], int],
                   term_text: Callable[[Any], str], label: str) -> Count:
    """Σ over targeted Linear groups of count × term(group), written out group by group."""
    groups = arch.matching(targets)
    if not groups:
        raise SettingError(
            f"no module of this model matches {targets}; it has: {', '.join(arch.target_leaves)}"
        )
    return Count(sum(g.count * term(g) for g in groups),
                 grouped_formula(label, [(g.count, term_text(g)) for g in groups],
                                 sum(g.count * term(g) for g in groups)))


def grouped_formula(label: str, terms: list[tuple[int, str]], total: int) -> str:
    """``label = L × (t1 + t2 + …) = total`` when every term repeats L times, else a plain sum."""
    counts = {count for count, _ in terms}
    if len(counts) == 1:
        body = " + ".join(text for _, text in terms)
        return f"{label} = {counts.pop()} × ({body}) = {n(total)}"
    return f"{label} = {' + '.join(f'{c} × {t}' for c, t in terms)} = {n(total)}"


def resolve_targets(arch: ArchInfo, preset: str, custom: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Target names for a preset (attention, mlp, all-linear) or the user's own list.

    Names are the leaf (``q_proj``) unless two different modules share that leaf (GPT-2 has
    ``attn.c_proj`` and ``mlp.c_proj``): then the block-relative path, because PEFT matches
    ``target_modules`` by suffix and a bare leaf would pick both.
    """
    if custom:
        return list(custom)
    roles = {"attention": ("attention",), "mlp": ("mlp",)}.get(preset, ("attention", "mlp", "other"))
    paths_by_leaf: dict[str, set[str]] = {}
    for g in arch.block_linears:
        paths_by_leaf.setdefault(g.leaf, set()).add(g.path)
    names = [g.leaf if len(paths_by_leaf[g.leaf]) == 1 else g.path
             for g in arch.block_linears if g.role in roles]
    return list(dict.fromkeys(names))


def with_defaults(cls: type, name: str, **defaults: Any) -> type:
    """A subclass of the params dataclass ``cls`` with some field defaults changed."""
    if not defaults:
        return cls
    fields = [(f.name, f.type, field(default=defaults.get(f.name, default_of(f)), metadata=f.metadata))
              for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(name, fields, bases=(cls,), frozen=True)


def per_module_tensors(arch: ArchInfo, targets: list[str],
                       shapes: Callable[[Any], list[int]]) -> list[tuple[int, int]]:
    """(numel, count) for every trainable tensor an adapter adds to each targeted Linear."""
    return [(numel, g.count) for g in arch.matching(targets) for numel in shapes(g)]


def trainable_count(model: Any) -> int:
    """What a built model will actually train (parameters with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
