"""``ArchInfo``: the shape facts of a causal LM, read from its config alone.

Every closed-form count (methods) and memory estimate (estimate.py) is arithmetic over these
numbers, so they must be exact. We get them by instantiating the model on PyTorch's ``meta``
device: no memory is allocated and no weights are read (a 70B Llama builds in ~0.3 s), yet every
module exists with its real shape. That is more reliable than reading config keys, because
families name their sizes differently (GPT-2: ``n_embd``/``n_inner``; Gemma: explicit
``head_dim``) and fuse projections differently (GPT-2 ``c_attn``, NeoX ``query_key_value``).

``ArchInfo`` is plain data (JSON round-trip) so the UI can cache it and never import torch again
for estimates.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

_LAYER_INDEX = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<rest>.+)$")
_ATTENTION_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class LinearGroup:
    """All Linear-like modules that share a path inside the decoder block and a shape.

    ``path`` is the module's name relative to its block (``self_attn.q_proj``), ``leaf`` its last
    component (``q_proj``): PEFT's ``target_modules`` match on that suffix.
    """

    path: str
    leaf: str
    in_features: int
    out_features: int
    count: int
    kind: str  # "linear" | "conv1d" (GPT-2 style, weight stored transposed)
    bias: bool
    role: str  # "attention" | "mlp" | "other"
    in_blocks: bool  # inside the repeated decoder blocks (False: e.g. lm_head)

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    total_params: int
    embedding_params: int  # input token (+ position) embeddings
    lm_head_params: int  # 0 when tied to the input embedding
    block_params: tuple[int, ...] = ()  # parameters of each decoder block, in order
    param_tensors: tuple[tuple[int, int], ...] = ()  # (numel, how many tensors), whole model
    block_tensors: tuple[tuple[int, int], ...] = ()  # (numel, how many tensors), last block
    linears: tuple[LinearGroup, ...] = field(default_factory=tuple)

    @property
    def kv_dim(self) -> int:
        """Width of the key (or value) projection: smaller than hidden_size under GQA / MQA."""
        return self.num_kv_heads * self.head_dim

    @property
    def block_linears(self) -> tuple[LinearGroup, ...]:
        return tuple(g for g in self.linears if g.in_blocks)

    @property
    def target_leaves(self) -> list[str]:
        """Leaf names a method can target inside the blocks, in model order, unique."""
        return list(OrderedDict.fromkeys(g.leaf for g in self.block_linears))

    @property
    def linear_params(self) -> int:
        return sum(g.weight_params * g.count for g in self.block_linears)

    def matching(self, targets: list[str] | tuple[str, ...]) -> list[LinearGroup]:
        """Block linears that PEFT's suffix matching would pick for ``targets``."""
        wanted = set(targets)
        return [
            g
            for g in self.block_linears
            if g.leaf in wanted or g.path in wanted or any(g.path.endswith("." + t) for t in wanted)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchInfo":
        data = dict(data)
        data["block_params"] = tuple(data.get("block_params", ()))
        for key in ("param_tensors", "block_tensors"):
            data[key] = tuple(tuple(pair) for pair in data.get(key, ()))
        data["linears"] = tuple(LinearGroup(**g) for g in data.get("linears", ()))
        return cls(**data)

    @classmethod
    def from_config(cls, cfg: Any, trust_remote_code: bool = False) -> "ArchInfo":
        """Build the model on the meta device and read its shapes (no weights, no memory)."""
        model = build_on_meta(cfg, trust_remote_code)
        return cls.from_model(model, cfg)

    @classmethod
    def from_model(cls, model: Any, cfg: Any | None = None) -> "ArchInfo":
        cfg = cfg if cfg is not None else model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        hidden = _first_attr(text_cfg, "hidden_size", "n_embd", "d_model")
        heads = _first_attr(text_cfg, "num_attention_heads", "n_head")
        kv_heads = _first_attr(text_cfg, "num_key_value_heads", "multi_query_group_num") or heads
        head_dim = _first_attr(text_cfg, "head_dim") or hidden // heads
        linears = _linear_groups(model)
        return cls(
            model_type=str(getattr(cfg, "model_type", "")),
            architecture=type(model).__name__,
            hidden_size=int(hidden),
            intermediate_size=int(_intermediate_size(text_cfg, linears, hidden)),
            num_layers=int(_first_attr(text_cfg, "num_hidden_layers", "n_layer")),
            num_heads=int(heads),
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(text_cfg.vocab_size),
            tie_word_embeddings=_is_tied(model),
            max_position_embeddings=int(
                _first_attr(text_cfg, "max_position_embeddings", "n_positions") or 0
            ),
            total_params=sum(p.numel() for p in model.parameters()),
            embedding_params=_embedding_params(model),
            lm_head_params=0 if _is_tied(model) else _lm_head_params(model),
            block_params=_block_params(model, int(_first_attr(text_cfg, "num_hidden_layers", "n_layer"))),
            param_tensors=_histogram(model.parameters()),
            block_tensors=_histogram(_last_block_parameters(model, int(_first_attr(text_cfg, "num_hidden_layers", "n_layer")))),
            linears=linears,
        )


def build_on_meta(cfg: Any, trust_remote_code: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)


def _first_attr(cfg: Any, *names: str) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def _linear_kind(module: Any) -> str | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


def _shape(module: Any, kind: str) -> tuple[int, int]:
    if kind == "linear":
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D stores weight as (in, out)
    return int(in_features), int(out_features)


def _role(path: str) -> str:
    lowered = path.lower()
    if any(h in lowered for h in _ATTENTION_HINTS):
        return "attention"
    if any(h in lowered for h in _MLP_HINTS):
        return "mlp"
    return "other"


def _linear_groups(model: Any) -> tuple[LinearGroup, ...]:
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, module in model.named_modules():
        kind = _linear_kind(module)
        if kind is None:
            continue
        match = _LAYER_INDEX.match(name)
        path = match.group("rest") if match else name
        in_f, out_f = _shape(module, kind)
        bias = getattr(module, "bias", None) is not None
        key = (path, in_f, out_f, kind, bias, match is not None)
        if key in groups:
            groups[key]["count"] += 1
        else:
            groups[key] = dict(
                path=path, leaf=path.rsplit(".", 1)[-1], in_features=in_f, out_features=out_f,
                count=1, kind=kind, bias=bias, role=_role(path), in_blocks=match is not None,
            )
    return tuple(LinearGroup(**g) for g in groups.values())


def _intermediate_size(cfg: Any, linears: tuple[LinearGroup, ...], hidden: int) -> int:
    value = _first_attr(cfg, "intermediate_size", "n_inner", "ffn_dim")
    if value:
        return int(value)
    # GPT-2 leaves n_inner None (meaning 4 * n_embd): read it off the MLP's input projection.
    mlp_out = [g.out_features for g in linears if g.in_blocks and g.role == "mlp"]
    return max(mlp_out) if mlp_out else 4 * hidden


def _is_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _embedding_params(model: Any) -> int:
    import torch

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def _block_params(model: Any, num_layers: int) -> tuple[int, ...]:
    """Parameter count of each decoder block: the first ModuleList with one entry per layer."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return tuple(sum(p.numel() for p in block.parameters()) for block in module)
    return ()


def _last_block_parameters(model: Any, num_layers: int) -> list:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return list(module[-1].parameters())
    return []


def _histogram(parameters: Any) -> tuple[tuple[int, int], ...]:
    """(numel, count) pairs of parameter tensors, shared tensors once (optimizers see them once)."""
    from collections import Counter

    return tuple(sorted(Counter(p.numel() for p in parameters).items()))


def _lm_head_params(model: Any) -> int:
    out = model.get_output_embeddings()
    if out is None:
        return 0
    return out.weight.numel() + (out.bias.numel() if getattr(out, "bias", None) is not None else 0)
