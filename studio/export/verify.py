"""Verifying an export: reload it in a clean child process and compare with the trained model.

The child imports transformers (and peft only for adapter exports) but never the studio, so a
merged export is proven loadable by plain transformers. It writes its logits and greedy tokens
for a few eval prompts to a safetensors file; this process computes the same with the trained
model and compares: the maximum absolute logit difference and the share of prompts whose greedy
continuation is identical. torch is imported only when a check runs, so that listing what can be
exported (the UI) never loads it.

A GGUF export (``verify_gguf``) is checked by the loaders its users run: transformers' GGUF
reader as above (f16, q8_0), llama.cpp where it is installed (``llamacpp``: the same greedy
tokens, and a stop at the chat template's end-of-turn token), and the file's own metadata (it
must mark that token). The result names the verifiers that ran and what was not verified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GREEDY_TOKENS = 16
FP32_MAX_DIFF = 1e-3  # fp32 merges differ by ~1e-5..1e-4 (rounding of W + BA)
# Half-precision exports round every weight; a near-tie between two tokens may flip. We accept
# a bf16/fp16 export when at least this share of prompts continue identically.
HALF_MIN_AGREEMENT = 0.75

_CHILD = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, kind, base, texts_file, out_file, compat_file, blockdiag_file = sys.argv[1:8]
texts = json.load(open(texts_file))
if kind == "gguf":
    import os
    name = [f for f in os.listdir(folder) if f.endswith(".gguf")][0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
elif kind == "merged":
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
else:
    import runpy
    from peft import PeftModel
    # PEFT 0.21 under transformers 5 generates prompt-learning adapters wrongly: the studio's fix,
    # run from its file (no studio import), as a user of plain PEFT needs it too (see the card).
    runpy.run_path(compat_file)["install"]()
    # PEFT 0.21's BOFT without its CUDA extension (built per layer, or butterfly factors silently
    # dropped to 1 so the adapter does not load): the studio's pure-torch block diagonal.
    runpy.run_path(blockdiag_file)["install"]()
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, use_safetensors=True), folder)
model = (model if kind == "gguf" else model.float()).eval()  # a GGUF load is float32 already
tensors = {}
with torch.no_grad():
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        tensors[f"logits_{i}"] = model(input_ids=ids).logits[0].contiguous()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=%d,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        tensors[f"greedy_{i}"] = out[0, ids.shape[1]:].contiguous()
save_file(tensors, out_file)
studio_loaded = [m for m in sys.modules if m == "studio" or m.startswith("studio.")]
print(json.dumps({"studio_modules": studio_loaded, "peft_loaded": "peft" in sys.modules}))
""" % GREEDY_TOKENS


def reference_outputs(model: Any, tokenizer: Any, texts: list[str]) -> list[tuple[Any, Any]]:
    """(logits, greedy tokens) of ``model`` for each text: what the reloaded export must match.
    Call it on the trained model before anything is merged into it."""
    import torch

    results = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
            logits = model(input_ids=ids).logits[0].float().cpu()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            results.append((logits, out[0, ids.shape[1]:].cpu()))
    return results


def verify_export(folder: Path, kind: str, base_folder: Path, reference: list, texts: list[str],
                  dtype: str, four_bit_reference: list | None = None) -> dict[str, Any]:
    """Run the child, compare with ``reference`` (from ``reference_outputs``); a JSON-able result.

    QLoRA: ``reference`` is the de-quantised base with the adapter unmerged (what the merged
    weights must reproduce, checked as strictly as any fp32 merge), and ``four_bit_reference``
    the 4-bit model exactly as trained. bitsandbytes' 4-bit kernel accumulates differently from
    a plain matmul over the same de-quantised weights (~4e-3 in the logits of the tiny test
    model), so near-ties may flip: that agreement is reported, not required."""
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        texts_file, out_file = Path(tmp) / "texts.json", Path(tmp) / "out.safetensors"
        texts_file.write_text(json.dumps(texts))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        studio_dir = Path(__file__).resolve().parent.parent
        compat, blockdiag = studio_dir / "peft_compat.py", studio_dir / "methods" / "boft_blockdiag.py"
        child = subprocess.run([sys.executable, "-c", _CHILD, str(folder), kind, str(base_folder),
                                str(texts_file), str(out_file), str(compat), str(blockdiag)],
                               capture_output=True, text=True,
                               timeout=1800, cwd=tmp, env=env)
        if child.returncode != 0:
            return {"ok": False, "error": child.stderr.strip()[-2000:], "loader": "transformers"}
        loaded = json.loads(child.stdout.strip().splitlines()[-1])
        got = load_file(str(out_file))
    max_diff, agreement = _compare(got, reference)
    if dtype in ("f16", "q8_0"):  # GGUF: rounded (or 8-bit) weights; greedy output must agree
        ok = agreement >= HALF_MIN_AGREEMENT
    elif dtype == "float32":
        ok = agreement == 1.0 and max_diff <= FP32_MAX_DIFF
    else:
        ok = agreement >= HALF_MIN_AGREEMENT
    result = {"ok": ok, "max_abs_diff": max_diff, "greedy_agreement": agreement, "prompts": len(texts),
              "greedy_tokens": GREEDY_TOKENS, "loader": "transformers" + (" + peft" if loaded["peft_loaded"] else ""),
              "studio_imported_by_loader": loaded["studio_modules"]}
    if four_bit_reference is not None:
        result["four_bit_max_abs_diff"], result["four_bit_greedy_agreement"] = _compare(got, four_bit_reference)
    return result


def _compare(got: dict, reference: list) -> tuple[float, float]:
    """(the largest absolute logit difference, the share of prompts whose greedy continuation
    is identical) between the child's outputs and ``reference``."""
    import torch

    diffs, agree = [], 0
    for i, (logits, greedy) in enumerate(reference):
        diffs.append(float((got[f"logits_{i}"] - logits).abs().max()))
        agree += int(torch.equal(got[f"greedy_{i}"], greedy))
    return (max(diffs) if diffs else 0.0), (agree / len(reference) if reference else 1.0)


def gguf_loaders(dtype: str) -> list[str]:
    """Who verifies a GGUF export of ``dtype`` here: transformers reads f16 and q8_0, llama.cpp
    every type where it is installed."""
    from studio.export import llamacpp

    return (["transformers"] if dtype in llamacpp.STRICT else []) + (["llama.cpp"] if llamacpp.available() else [])


def verify_gguf(folder: Path, file: Path, dtype: str, base_folder: Path, reference: list, texts: list[str],
                tokenizer: Any) -> dict[str, Any]:
    """Verify the GGUF export ``file`` in ``folder`` against ``reference``: transformers (f16 and
    q8_0, whose layout it reads), llama.cpp when available (every type; the k-quants only
    there), the end-of-turn token the file marks. The result's ``verifiers`` names who checked."""
    from studio.export import llamacpp
    from studio.export.gguf_export import end_of_turn_token

    end_of_turn, eos = end_of_turn_token(tokenizer), tokenizer.eos_token_id
    marked = llamacpp.marked_end_ids(file)
    result: dict[str, Any] = {"ok": True, "verifiers": [], "end_of_turn_id": end_of_turn, "marked_end_ids": marked,
                              "end_of_turn_marked": end_of_turn is None or end_of_turn in marked.values()}
    if dtype in llamacpp.STRICT:
        result.update(verify_export(folder, "gguf", base_folder, reference, texts, dtype))
        result["verifiers"].append("transformers")
    if llamacpp.available():
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        try:
            checked = llamacpp.verify(file, dtype, texts, ids, reference, end_of_turn, eos)
        except llamacpp.LlamaCppError as exc:
            checked = {"ok": False, "loader": "llama.cpp", "error": str(exc)}
        result["llama_cpp"] = checked
        result["verifiers"].append("llama.cpp")
        if "transformers" not in result["verifiers"]:  # the k-quants: llama.cpp's figures are the export's
            result["greedy_agreement"] = checked.get("greedy_agreement")
            result["prompts"], result["loader"] = checked.get("prompts"), "llama.cpp"
    else:
        result["not_verified"] = llamacpp.missing_note()
    result["ok"] = (result.get("ok") is not False and result["end_of_turn_marked"]
                    and result.get("llama_cpp", {}).get("ok") is not False)
    return result
