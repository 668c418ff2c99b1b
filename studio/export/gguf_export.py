"""GGUF export of a merged Llama-family model, written with the ``gguf`` package (no download).

Why our own writer: llama.cpp's converter (convert_hf_to_gguf.py) is not part of the ``gguf``
package on PyPI, only the file format is (GGUFWriter, tensor-name maps, quantisers). This module
covers the architectures whose layout we can verify here: Llama (and Mistral, Llama's layout).

What it writes:
* hyperparameters under the ``llama.*`` keys (context, width, blocks, MLP, heads, KV heads,
  rope dimension and base, RMS epsilon);
* the tokenizer as a GPT-2-style BPE (token list, token types, merges, special ids and the chat
  template, via ``gguf.SpecialVocab``), and the chat template's end-of-turn token as the
  end-of-turn id (``tokenizer.ggml.eot_token_id``): llama.cpp and Ollama stop generating there.
  A model whose end-of-turn token differs from its end-of-sequence token (most chat models) and
  a file that does not say so is the GGUF that "never stops";
* every tensor under its GGUF name (``gguf.get_tensor_name_map``). q_proj and k_proj rows are
  permuted from Hugging Face's rotary layout (first half / second half of each head) to GGML's
  interleaved pairs — the inverse of what transformers' GGUF loader undoes on reading;
* f16 (``--dtype f16``) or q8_0 (blocks of 32 int8 values with one f16 scale) for the 2-D
  weights; norms stay f32. The k-quants (Q4_K_M, ...) are llama.cpp's own quantiser applied to
  the f16 file (``llamacpp``).
The result is verified by loading it back with ``transformers`` (``gguf_file=``) and, where
llama.cpp is installed, in llama.cpp itself (``llamacpp``), comparing with the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED = ("llama", "mistral")
# Llama 3's split before byte-level BPE (its tokenizer.json), which llama.cpp calls "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
OUTTYPES = ("f16", "q8_0")


class GGUFExportError(Exception):
    """A model this writer cannot convert, with the reason."""


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from [x0..x(h/2-1), y0..] to interleaved (x0, y0, x1, y1, ...)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The id of the token that ends an assistant turn in ``tokenizer``'s chat template (SmolLM2's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``): the first special token
    the template writes after an answer. None without a chat template or when no special token
    follows the answer (the end-of-sequence token then ends a turn)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "PEFTSTUDIOANSWERMARK"
    try:  # a template may insist on a system turn or on alternating roles: give it both
        text = tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no turn to end
        return None
    if marker not in text:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special), None)


def pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name for how ``tokenizer.json`` (``data``) splits text before BPE: a plain
    byte-level split with GPT-2's regex is "gpt-2", Llama 3's split "llama-bpe"; anything else
    "default" (llama.cpp's own split, which separates punctuation: "8601 (" then tokenizes
    differently, and the llama.cpp verifier's tokenization check says so)."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    splits = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel" and not p.get("use_regex", True)]
    if splits == [LLAMA3_SPLIT] and len(byte_level) == 1 and len(parts) == 2:
        return "llama-bpe"
    return "default"


def _tokenizer(writer: Any, folder: Path, end_of_turn: int | None) -> None:
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
    writer.add_tokenizer_pre(pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=size).add_to_gguf(writer)
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)


def write_gguf(folder: Path, out_file: Path, outtype: str = "f16", end_of_turn: int | None = None) -> Path:
    """Convert the merged Hugging Face folder ``folder`` into ``out_file``; ``end_of_turn``: the
    chat template's end-of-turn token id (``end_of_turn_token``), written as the EOT id."""
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
    _tokenizer(writer, folder, end_of_turn)

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
