"""GGUF export of a merged Llama-family model, written with the ``gguf`` package (no download).

Why our own writer: llama.cpp's converter (convert_hf_to_gguf.py) is not part of the ``gguf``
package on PyPI, only the file format is (GGUFWriter, tensor-name maps, quantisers). This module
covers the architectures whose layout we can verify here: Llama (and Mistral, Llama's layout).

What it writes:
* hyperparameters under the ``llama.*`` keys (context, width, blocks, MLP, heads, KV heads,
  rope dimension and base, RMS epsilon);
* the tokenizer as a GPT-2-style BPE (token list, token types, merges, special ids and the chat
  template, via ``gguf.SpecialVocab``);
* every tensor under its GGUF name (``gguf.get_tensor_name_map``). q_proj and k_proj rows are
  permuted from Hugging Face's rotary layout (first half / second half of each head) to GGML's
  interleaved pairs — the inverse of what transformers' GGUF loader undoes on reading;
* f16 (``--dtype f16``) or q8_0 (blocks of 32 int8 values with one f16 scale) for the 2-D
  weights; norms stay f32.
The result is verified by loading it back with ``transformers`` (``gguf_file=``) and comparing
logits and greedy output with the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED = ("llama", "mistral")
OUTTYPES = ("f16", "q8_0")


class GGUFExportError(Exception):
    """A model this writer cannot convert, with the reason."""


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from [x0..x(h/2-1), y0..] to interleaved (x0, y0, x1, y1, ...)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer(writer: Any, folder: Path) -> None:
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer type {model.get('type')!r}: only BPE tokenizers are written")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=size).add_to_gguf(writer)


def write_gguf(folder: Path, out_file: Path, outtype: str = "f16") -> Path:
    """Convert the merged Hugging Face folder ``folder`` into ``out_file``."""
    import gguf
    from safetensors import safe_open

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype must be one of {OUTTYPES}")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") not in SUPPORTED:
        raise GGUFExportError(f"GGUF export supports {SUPPORTED} models, not {cfg.get('model_type')!r}")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    blocks = cfg["num_hidden_layers"]
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 10000.0)

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(rope))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    _tokenizer(writer, folder)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as fh:
            for key in fh.keys():
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise GGUFExportError(f"no GGUF name for tensor {key}")
                data = fh.get_tensor(key).astype(np.float32)
                if key.endswith("q_proj.weight"):
                    data = _permute(data, heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, kv_heads)
                if data.ndim == 1:
                    writer.add_tensor(new, data)
                elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
                    writer.add_tensor(new, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(new, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
