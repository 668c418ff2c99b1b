"""llama.cpp as the GGUF export's verifier and k-quant quantiser, where llama-cpp-python is installed.

A GGUF export is made to be run by llama.cpp (and Ollama, built on it), so llama.cpp is the
loader that proves it: the export is loaded there and its greedy answers on the run's eval
prompts are compared with transformers' answers on the trained model (the same tokens for f16
and q8_0; for the k-quants the share that agree is stated), and llama.cpp must treat the chat
template's end-of-turn token as the end of generation and stop there (the "babbles, never stops"
bug). The k-quants users ask for (Q4_K_M, Q5_K_M, Q6_K) come from llama.cpp's own quantiser,
run on our f16 file: the ``gguf`` package writes those formats' bytes only through llama.cpp's
reference code, which is what ``llama_model_quantize`` is (with its per-tensor type choices,
the "_M" mixes).

llama-cpp-python is an optional extra (``peft-studio[llamacpp]``): it compiles llama.cpp from
source when installed. Without it f16 and q8_0 are still written and verified by transformers,
and the result says what was not verified and how to get it; a k-quant is refused with the same
advice. ``PEFT_STUDIO_NO_LLAMACPP=1`` makes the studio act as if it were not installed.

Everything llama.cpp does runs in a child process (``llamacpp_child.py``, by path, never the
studio): a crash there fails the export with its message, never the studio.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

EXTRA = "llamacpp"
INSTALL = f"pip install 'peft-studio[{EXTRA}]'"
# Measured: 10 min 38 s wall (6 min CPU) for llama-cpp-python 0.3.36 on 2 cores shared with other
# work (load average 5-6), CMAKE_BUILD_PARALLEL_LEVEL=2.
BUILD_NOTE = "it compiles llama.cpp from source: about 10 minutes on 2 cores"
DISABLE_ENV = "PEFT_STUDIO_NO_LLAMACPP"
KQUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K")
STRICT = ("f16", "q8_0")  # every prompt must give the same tokens (but for near-ties, below)
# A departure counts as a near-tie when llama.cpp's token beat transformers' by less than twice
# the largest first-token logit difference between the two (the rounding this file carries),
# within [floor, cap]. Measured on SmolLM2-135M (4 prompts, 16 tokens): f16 differs by at most
# 0.05 in the logits and gives the same tokens; q8_0 by 1.2 (llama.cpp's own Q8_0 by 1.3, and
# transformers' reload of it by 1.0), and every prompt departs somewhere, by margins of 0.03-0.28.
# A random test model's logits lie within hundredths of each other (the floor). The cap keeps a
# broken file, whose logits differ by a lot, from calling every departure a tie.
NEAR_TIE_FLOOR, NEAR_TIE_CAP = 1e-3, 0.5
TOP = 5  # and each side's first token must be among the other's top 5 (a broken file's is not)
REQUIRED = {True: "the same tokens on every prompt, but at near-ties, and llama.cpp tokenizing the prompts "
                  "as transformers does", False: "agreement stated, not required"}
_CHILD = Path(__file__).with_name("llamacpp_child.py")
TIMEOUT_S = 3600


class LlamaCppError(Exception):
    """llama.cpp failed (its process exited with an error, or crashed), with what it said."""


def available() -> bool:
    """llama-cpp-python is installed and not switched off (``PEFT_STUDIO_NO_LLAMACPP``)."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return False
    return importlib.util.find_spec("llama_cpp") is not None


def missing_note() -> str:
    """What a GGUF export without llama.cpp leaves unverified, and how to get it."""
    return ("Not verified: loading in llama.cpp and stopping at the end-of-turn token (llama-cpp-python "
            f"is not installed; checked with transformers only). To verify with llama.cpp: {INSTALL} "
            f"({BUILD_NOTE}).")


def kquant_refusal(dtype: str) -> str:
    return (f"{dtype} is made by llama.cpp's own quantiser, and llama-cpp-python is not installed. "
            f"Install it with {INSTALL} ({BUILD_NOTE}), or export f16 or q8_0, which need nothing more.")


def _run(args: list[str], what: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as cwd:
        try:
            child = subprocess.run([sys.executable, str(_CHILD), *args], capture_output=True, text=True,
                                   timeout=TIMEOUT_S, cwd=cwd, env=env)
        except subprocess.TimeoutExpired:
            raise LlamaCppError(f"llama.cpp did not finish {what} within {TIMEOUT_S} s") from None
    if child.returncode != 0:
        how = f"exit code {child.returncode}" if child.returncode > 0 else f"signal {-child.returncode}"
        said = " / ".join(line for line in child.stderr.strip().splitlines()[-3:] if line.strip())
        raise LlamaCppError(f"llama.cpp failed {what} ({how}): {said[-1500:] or 'it said nothing'}")


def quantize(source: Path, dest: Path, name: str) -> dict[str, Any]:
    """``source`` (f16 GGUF) quantised by llama.cpp into ``dest`` as ``name`` (one of
    ``KQUANTS``); what it did, with the tensor types the file holds (llama.cpp keeps tensors
    whose rows are not a multiple of 256 in another type: small models have many)."""
    if name not in KQUANTS:
        raise ValueError(f"{name}: llama.cpp's k-quants here are {KQUANTS}")
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / "answer.json"
        _run(["quantize", str(source), str(dest), name, str(answer)], f"quantising to {name}")
        done = json.loads(answer.read_text(encoding="utf-8"))
    types = tensor_types(dest)
    done["tensor_types"] = types
    main = name.split("_M")[0]  # Q4_K_M's main type is Q4_K
    if main not in types:
        done["note"] = (f"no tensor of this model could take {main}: llama.cpp needs rows of a multiple of 256 "
                        f"values, and used {', '.join(sorted(t for t in types if t not in ('F32', 'F16')))} "
                        "instead (a small model's layers are narrower; the file is still valid)")
    return done


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (read with the ``gguf`` package)."""
    return dict(_facts(str(path), *_stamp(path))["types"])


def marked_end_ids(path: Path) -> dict[str, int | None]:
    """The end-of-sequence and end-of-turn ids the file's metadata declares (``gguf`` reader)."""
    return dict(_facts(str(path), *_stamp(path))["ends"])


def _stamp(path: Path) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _facts(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """One read of the file (``GGUFReader`` takes ~1.6 s over a 49k-token vocabulary), shared by
    the quantiser's report and the verifier while the file is unchanged."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(path)
    ends = {}
    for name, key in (("eos", gguf.Keys.Tokenizer.EOS_ID), ("eot", gguf.Keys.Tokenizer.EOT_ID)):
        field = reader.get_field(key)
        ends[name] = int(field.contents()) if field is not None else None
    return {"types": dict(Counter(t.tensor_type.name for t in reader.tensors)), "ends": ends}


def verify(path: Path, dtype: str, texts: list[str], prompt_ids: list[list[int]], reference: list,
           end_of_turn: int | None, eos: int | None) -> dict[str, Any]:
    """Load ``path`` in llama.cpp and compare with ``reference`` (``verify.reference_outputs``:
    transformers' logits and greedy tokens per prompt). A JSON-able result; ``ok`` False when
    llama.cpp answers differently (f16, q8_0), does not treat the end-of-turn token as the end of
    generation, or runs past it."""
    ends = [i for i in (end_of_turn, eos) if i is not None]
    budget = max((len(r[1]) for r in reference), default=0)
    wanted = [_until_end([int(t) for t in greedy.tolist()], ends) for _, greedy in reference]
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({"texts": texts, "prompt_ids": prompt_ids, "max_new_tokens": budget,
                                       "end_ids": ends, "reference_tokens": wanted}), encoding="utf-8")
        _run(["verify", str(path), str(request), str(answer)], f"loading {path.name}")
        got = json.loads(answer.read_text(encoding="utf-8"))
    return judge(got, dtype, prompt_ids, reference, ends, end_of_turn)


def _until_end(tokens: list[int], ends: list[int]) -> list[int]:
    """``tokens`` up to and including the first end token: transformers stops only at its
    generation config's ids, a chat answer ends at the template's end of turn."""
    cut = next((k + 1 for k, t in enumerate(tokens) if t in ends), None)
    return tokens[:cut] if cut else tokens


def _in_top(mine: Any, theirs: Any) -> bool:
    """Each side's first greedy token is among the other's ``TOP`` most likely."""
    import numpy as np

    return bool(int(np.argmax(mine)) in np.argsort(theirs)[-TOP:] and int(np.argmax(theirs)) in np.argsort(mine)[-TOP:])


def judge(got: dict, dtype: str, prompt_ids: list[list[int]], reference: list, ends: list[int],
          end_of_turn: int | None) -> dict[str, Any]:
    """The verdict on llama.cpp's answers ``got`` (the child's JSON) against transformers'."""
    import numpy as np

    n, strict = len(reference), dtype in STRICT
    answers = got["answers"]
    wants = [_until_end([int(t) for t in greedy.tolist()], ends) for _, greedy in reference]
    diffs = [float(np.abs(np.asarray(a["first_logits"]) - logits[-1].numpy()).max())
             for a, (logits, _) in zip(answers, reference)]
    tolerance = min(max(2 * max(diffs, default=0.0), NEAR_TIE_FLOOR), NEAR_TIE_CAP)
    top_agrees = sum(_in_top(np.asarray(a["first_logits"]), logits[-1].numpy())
                     for a, (logits, _) in zip(answers, reference))
    differ = [i for i, (a, want) in enumerate(zip(answers, wants)) if a["tokens"] != want]
    near_ties = [{"prompt": i, "at_token": d["at"], "margin": d["margin"]} for i in differ
                 if (d := answers[i]["departure"]) is not None and d["margin"] <= tolerance]
    unexplained = [i for i in differ if i not in {t["prompt"] for t in near_ties}]
    tokenized_same = sum(a["tokenized"] == list(ids) for a, ids in zip(answers, prompt_ids))
    # Where transformers' answer ended at an end token and llama.cpp said the same up to it,
    # llama.cpp must stop right there (an answer that left the reference earlier is judged above).
    ending = [i for i, want in enumerate(wants)
              if want[-1:] and want[-1] in ends and answers[i]["tokens"][:len(want)] == want]
    runs_on = [i for i in ending if not (answers[i]["stopped"] and len(answers[i]["tokens"]) == len(wants[i])
                                         and answers[i]["completion_finish"] == "stop")]
    stops_expected, stopped_right, same = len(ending), len(ending) - len(runs_on), n - len(differ)
    eog = all(got["is_eog"].values())
    agrees = (not unexplained and tokenized_same == n and top_agrees == n) if strict else n > 0
    result = {"ok": eog and not runs_on and agrees, "loader": "llama.cpp",
              "greedy_agreement": same / n if n else 1.0, "prompts": n,
              "max_abs_diff_first_token": max(diffs, default=0.0), "near_tie_tolerance": tolerance,
              "first_token_in_top5": top_agrees / n if n else 1.0,
              "tokenization_agreement": tokenized_same / n if n else 1.0,
              "end_of_turn_id": end_of_turn, "end_ids_are_end_of_generation": got["is_eog"],
              "llama_cpp_eos": got["eos"], "llama_cpp_eot": got["eot"],
              "answers_ending_at_end_of_turn": stops_expected, "stopped_there": stopped_right,
              "required": REQUIRED[strict]}
    if near_ties:
        result["near_ties"] = near_ties
    if unexplained:
        result["different_answers"] = unexplained
    if runs_on:
        result["ran_past_end_of_turn"] = runs_on
    return result
