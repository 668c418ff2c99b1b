"""Shared helpers for the serving tests: adapters of every method for the tiny chat model, and the
reference answer each must equal (a freshly loaded base with only that adapter, plain greedy
``generate``), independent of anything in ``studio.serve``."""

from __future__ import annotations

from pathlib import Path

from chat_helpers import save_bottleneck_adapter, save_peft_adapter

# name -> (method, seed). Two plain LoRAs with different seeds so mixed rows really differ.
ADAPTERS = {"lora1": ("lora", 1), "lora2": ("lora", 2), "dora": ("dora", 10), "ia3": ("ia3", 11),
            "prompt": ("prompt", 12), "prefix": ("prefix", 13), "bottleneck": ("bottleneck", 20)}


def make_adapters(base_dir: Path, root: Path, names=None) -> dict[str, Path]:
    """Adapter folders with random, non-trivial weights (``chat_helpers``), one per name in
    ``ADAPTERS`` (or the ``names`` given), saved under ``root``."""
    root = Path(root)
    folders = {}
    for name in names or ADAPTERS:
        method, seed = ADAPTERS[name]
        if method == "bottleneck":
            folders[name] = save_bottleneck_adapter(base_dir, root / name, seed=seed)
        else:
            folders[name] = save_peft_adapter(base_dir, root / name, method, seed=seed)
    return folders


def load_reference_model(base_dir: Path, folder: Path | None = None):
    """A fresh base with only ``folder``'s adapter (or none), in eval mode."""
    from peft import PeftModel

    from studio.adapters import bottleneck
    from studio.models import load_model

    model = load_model(str(base_dir))
    if folder is not None:
        model = (bottleneck.load_bottleneck(model, folder) if bottleneck.is_bottleneck_folder(folder)
                 else PeftModel.from_pretrained(model, str(folder)))
    return model.eval()


def reference_ids(base_dir: Path, folder: Path | None, prompt_ids: list[int], max_new_tokens: int,
                  model=None) -> list[int]:
    """The new token ids of a plain greedy ``generate`` on the base with only this adapter, cut
    at the first end-of-sequence (pass ``model`` from ``load_reference_model`` to reuse one).

    Prompt and prefix tuning generate correctly only with ``studio.peft_compat`` installed
    (``load_model`` installs it; ``tests/test_peft_compat.py`` checks it against the forward)."""
    import torch

    model = model if model is not None else load_reference_model(base_dir, folder)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=next(iter(eos), 0))
    new = out[0, len(prompt_ids):].tolist()
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


def chat_prompt(tokenizer, text: str) -> list[int]:
    """A user message through the chat template, as ids (what the API does for a chat request)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def serving(base_dir: Path, folders: dict[str, Path]):
    """A ``ServeEngine`` on ``base_dir`` with ``folders`` registered (a module fixture's body:
    ``yield from serving(...)``); closed when the fixture ends."""
    from studio.serve.engine import ServeEngine

    engine = ServeEngine.load(str(base_dir), "tiny", max_active=8)
    for name, folder in folders.items():
        engine.register(name, folder)
    yield engine
    engine.close()
