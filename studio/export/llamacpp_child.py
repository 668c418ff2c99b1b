"""The llama.cpp side of a GGUF export, run as a script in its own process (never imported).

llama.cpp is C++ behind ctypes: a file it cannot read may abort the process instead of raising,
so the studio never loads it in its own process. ``llamacpp`` runs this file by path with a
clean ``PYTHONPATH`` (it imports llama_cpp, numpy and the standard library, never the studio),
hands it a JSON request and reads a JSON answer; a failure is one line on stderr, exit code 1:

``quantize IN OUT NAME ANSWER``
    llama.cpp's own quantiser (``llama_model_quantize``) from the f16 file ``IN`` to ``OUT`` as
    ``LLAMA_FTYPE_MOSTLY_<NAME>`` (Q4_K_M, Q5_K_M, Q6_K).
``verify GGUF REQUEST ANSWER``
    load the file as llama.cpp does for its users, then for each prompt: how llama.cpp tokenizes
    its text, the greedy continuation from the prompt's transformers token ids (argmax of the
    logits llama.cpp computes, ending at the first token llama.cpp treats as end of generation,
    as llama-cli, llama-server and Ollama do), its first logits, where it first departs from
    transformers' tokens by how much its logit beat the reference token's, and, where the answer
    ended at an end token, the high-level completion's finish reason; and whether llama.cpp
    treats each of the expected end-of-turn ids as end of generation.
"""

import json
import sys


def quantize(source: str, dest: str, name: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    code = llama_cpp.llama_model_quantize(source.encode(), dest.encode(), params)
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code} for {name}")
    return {"ftype": name, "llama_cpp_version": llama_cpp.__version__}


def verify(path: str, request: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama, llama_model_get_vocab, llama_vocab_eos, llama_vocab_eot, llama_vocab_is_eog

    budget = request["max_new_tokens"]
    longest = max((len(ids) for ids in request["prompt_ids"]), default=0)
    llm = Llama(model_path=path, n_ctx=longest + budget + 8, n_batch=max(32, longest + budget),
                logits_all=True, verbose=False, seed=0)
    vocab = llama_model_get_vocab(llm.model)
    answers = []
    for text, ids, want in zip(request["texts"], request["prompt_ids"], request["reference_tokens"]):
        llm.reset()
        tokenized = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.eval(ids)
        first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tokens, stopped, departure = [], False, None
        for k in range(budget):
            scores = llm.scores[llm.n_tokens - 1]
            token = int(np.argmax(scores))
            if departure is None and k < len(want) and token != want[k]:  # how near a tie was it, here?
                departure = {"at": k, "margin": float(scores[token] - scores[want[k]])}
            tokens.append(token)
            if llama_vocab_is_eog(vocab, token):
                stopped = True
                break
            llm.eval([token])
        finish = None
        if stopped:  # the path a chat client takes: does the high-level completion stop there too?
            llm.reset()
            done = llm.create_completion(prompt=list(ids), max_tokens=budget, temperature=0.0, top_k=1)
            finish = done["choices"][0]["finish_reason"]
        answers.append({"tokens": tokens, "stopped": stopped, "completion_finish": finish, "departure": departure,
                        "tokenized": list(tokenized), "first_logits": first.tolist()})
    return {"answers": answers, "eos": int(llama_vocab_eos(vocab)), "eot": int(llama_vocab_eot(vocab)),
            "is_eog": {str(i): bool(llama_vocab_is_eog(vocab, i)) for i in request["end_ids"]}}


def main(argv: list[str]) -> None:
    if argv[0] == "quantize":
        answer, out = quantize(argv[1], argv[2], argv[3]), argv[4]
    else:
        with open(argv[2], encoding="utf-8") as fh:
            request = json.load(fh)
        answer, out = verify(argv[1], request), argv[3]
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(answer, fh)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as exc:  # noqa: BLE001 - one line for the studio's message, not a traceback
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
