"""Building a composed LoRA adapter with PEFT (the torch side of ``studio.adapters.compose``).

The base is loaded once (``studio.models.load_model``: safetensors only, remote code only if
the first parent's run asked for it), every parent adapter is attached by name, PEFT's
``add_weighted_adapter`` makes the new one, and ``save_pretrained`` writes only that one.

Choices:
* The new adapter is named ``default``: PEFT saves any other name in a subfolder of its own,
  and the folder must load with plain ``PeftModel.from_pretrained(base, folder)``.
* The base is loaded in fp32 and never quantised, even for QLoRA parents: the combination only
  reads the adapters' factors, but PEFT creates the new adapter in the base's dtype and ``cat``
  writes into it in place, so a bf16 base rounded the result (measured: logits off by 6e-3).
* PEFT gives the new adapter α = r, so its scaling is 1 — except when the first parent is
  rsLoRA, whose config it copies (``use_rslora``): α/√r = √r. The combined factors already hold
  every parent's scaling, so B is divided by the new layer's scaling to keep the update exact.
* DARE's random drop runs under a fixed seed: composing one recipe twice gives one adapter.
* The first parent's tokenizer files are copied beside the adapter, as the worker saves them,
  so a server or Compare reading the folder finds the same chat template.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

NEW = "default"  # saved at the folder's top, where plain PEFT looks
SEED = 0  # DARE's random drop: one recipe, one adapter
# Files of a parent's adapter folder that are not the tokenizer: never copied.
_NOT_TOKENIZER = ("adapter_config.json", "adapter_model.safetensors", "README.md")
_TRAINING_STATE = (".bin", ".pt", ".pth", ".pkl", ".safetensors")


def build(spec: dict, folders: list[Path], weights: list[float], recipe: Any, dest: Path,
          device: str = "cpu") -> None:
    """Compose the adapters in ``folders`` (parents, in order) per ``recipe`` into ``dest``."""
    import torch
    from peft import PeftModel

    from studio.models import load_model

    base = load_model(str(spec.get("model", "default")), dtype="float32", device=device,
                      trust_remote_code=bool(spec.get("trust_remote_code", False)))
    names = [f"parent_{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    _check_svd_rank(model, names, recipe)
    kwargs: dict[str, Any] = {}
    if recipe.density is not None:
        kwargs["density"] = float(recipe.density)
    if recipe.svd_rank is not None:
        kwargs["svd_rank"] = int(recipe.svd_rank)
    # DARE drops values at random (torch.bernoulli): a fixed seed, in a forked RNG so the
    # caller's stream is untouched, makes a recipe give the same adapter every time.
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(SEED)
        model.add_weighted_adapter(names, [float(w) for w in weights], NEW,
                                   combination_type=recipe.combination, **kwargs)
        _unit_scaling(model)
    # A composed adapter never carries whole embedding matrices (no parent with modules_to_save is
    # accepted); "auto" would add them when the base differs from the config's base_model path.
    model.save_pretrained(str(dest), selected_adapters=[NEW], save_embedding_layers=False)
    _copy_tokenizer(folders[0], dest)


def _check_svd_rank(model: Any, names: list[str], recipe: Any) -> None:
    """An SVD combination keeps at most min(in, out) singular vectors of a layer; a larger rank
    would give factors narrower than the saved config's ``r`` (an adapter that does not load)."""
    from peft.tuners.lora import LoraLayer

    from studio.adapters.compose import SVD, CompositionError

    if recipe.combination not in SVD:
        return
    rank = recipe.svd_rank or max(model.peft_config[name].r for name in names)
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and any(name in module.lora_A for name in names):
            width = min(module.in_features, module.out_features)
            if rank > width:
                raise CompositionError(f"svd_rank: {rank} is more than {path.removeprefix('base_model.model.')} "
                                       f"can hold ({module.in_features} in, {module.out_features} out); "
                                       f"give at most {width}")


def _unit_scaling(model: Any) -> None:
    """Make each new layer's update exactly B·A: divide B by the scaling PEFT gave the layer."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer) or NEW not in module.scaling:
            continue
        scaling = float(module.scaling[NEW])
        if scaling == 1.0:
            continue
        if NEW in module.lora_B:
            module.lora_B[NEW].weight.data /= scaling
        elif NEW in module.lora_embedding_B:
            module.lora_embedding_B[NEW].data /= scaling


def _copy_tokenizer(parent: Path, dest: Path) -> None:
    for item in parent.iterdir():
        if (item.is_file() and not item.is_symlink() and item.name not in _NOT_TOKENIZER
                and not item.name.endswith(_TRAINING_STATE)):
            shutil.copy2(item, dest / item.name)
