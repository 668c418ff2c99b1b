"""``peft-studio compare``: one prompt answered by the base model and chosen adapters side by side,
as the Compare tab does (the same ``ChatEngine``: one base in memory, adapters attached as views,
plain LoRA columns batched), with ``--json`` output.

    peft-studio compare --project demo --adapters 3,lora-on-dates@20 --prompt "When was ...?"

Everything that can be checked is checked before the model loads (``studio.compare.picks``: the
project, each run, its base model, its weights; the generation settings; the GPU memory check
the tab makes). A refusal is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap

BASE_COLUMN = "base"  # how the base column is named in the output


def _settings(args: argparse.Namespace):
    from studio.compare.settings import GenerationSettings

    if args.temperature < 0:
        raise ValueError(f"generation settings: --temperature must be 0 (greedy) or in (0, 5], "
                         f"got {args.temperature}")
    try:
        return GenerationSettings(sample=args.temperature > 0, temperature=args.temperature or 0.7,
                                  top_p=args.top_p, max_new_tokens=args.max_tokens, seed=args.seed).validated()
    except ValueError as exc:
        raise ValueError(f"generation settings: {exc}") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    from studio.compare.picks import PickError, choose_project, resolve, split_items
    from studio.compare.sources import AdapterSourceError, chat_memory_refusal
    from studio.db import Database
    from studio.models import ModelSourceError

    db = Database()
    try:
        prompt = (args.prompt or "").strip()
        if not prompt:
            raise ValueError("--prompt is empty: give the message the base and the adapters answer")
        settings = _settings(args)
        project = choose_project(db, args.project)
        source = (args.model or project.model_source or "default").strip()
        picks = resolve(db, project, split_items(args.adapters), source)
        refusal = chat_memory_refusal(db, source) if args.device != "cpu" else None  # RAM: the OS arbitrates
        if refusal:
            raise ValueError(refusal)
        from studio.compare.engine import BASE, MAX_ADAPTERS, ChatEngine  # torch: only once all is checked

        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
        if len(picks) > MAX_ADAPTERS:
            raise ValueError(f"--adapters names {len(picks)} runs; at most {MAX_ADAPTERS} answer side by side")
        print(f"Loading {source} and {len(picks)} adapter(s)...", file=sys.stderr, flush=True)
        engine = ChatEngine.load(source, device=args.device)
        for pick in picks:
            engine.add_adapter(pick.label, pick.folder, pick.method)
        system = (args.system or "").strip() or None
        conversation = [{"role": "user", "content": prompt}]
        columns = [BASE, *(p.label for p in picks)]
        answers = engine.answer({c: list(conversation) for c in columns}, settings, system)
    except (PickError, AdapterSourceError, ModelSourceError, ValueError) as exc:
        print(f"peft-studio compare: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    rows = [_row(BASE_COLUMN, None, answers[BASE], "base")]
    rows += [_row(p.label, p, answers[p.label], p.method) for p in picks]
    if args.json:
        print(json.dumps({"project": project.name, "model": source, "prompt": prompt, "system": system,
                          "settings": {"decoding": "sampling" if settings.sample else "greedy",
                                       "temperature": settings.temperature if settings.sample else None,
                                       "top_p": settings.top_p if settings.sample else None,
                                       "max_new_tokens": settings.max_new_tokens, "seed": settings.seed},
                          "columns": rows}, indent=2, ensure_ascii=False))
    else:
        print(side_by_side(rows))
    return 0


def _row(column: str, pick, answer, method: str) -> dict:
    return {"column": column, "run_id": pick.run_id if pick else None, "run_name": pick.run_name if pick else None,
            "checkpoint_step": pick.step if pick else None, "method": method, "text": answer.text,
            "tokens": answer.tokens, "seconds": round(answer.seconds, 3), "path": answer.path}


def side_by_side(rows: list[dict], width: int | None = None) -> str:
    """The answers in columns as wide as the terminal allows; one block per answer below each
    other when a column would be narrower than 24 characters."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    gap = " │ "
    each = (width - len(gap) * (len(rows) - 1)) // len(rows)
    heads = [f"{r['column']} ({r['method']})" for r in rows]
    feet = [f"{r['tokens']} tokens, {r['seconds']:.1f} s, {r['path']}" for r in rows]
    if each < 24:
        return "\n\n".join(f"== {h}\n{r['text'] or '(empty answer)'}\n-- {f}" for h, r, f in zip(heads, rows, feet))

    def wrap(text: str) -> list[str]:
        lines = [part for line in (text or "(empty answer)").splitlines()
                 for part in (textwrap.wrap(line, each) or [""])]
        return lines

    cells = [wrap(r["text"]) for r in rows]
    height = max(len(c) for c in cells)
    out = [gap.join(h[:each].ljust(each) for h in heads), gap.join("─" * each for _ in rows)]
    out += [gap.join((c[i] if i < len(c) else "").ljust(each) for c in cells).rstrip() for i in range(height)]
    out += [gap.join("─" * each for _ in rows), gap.join(f[:each].ljust(each) for f in feet).rstrip()]
    return "\n".join(out)


def add_parser(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("compare", help="answer a prompt with the base model and adapters side by side")
    cmd.add_argument("--project", default=None, help="the project, by name (or id); default: the only project")
    cmd.add_argument("--adapters", action="append", default=[], metavar="RUN[,RUN...]",
                     help="runs by id or name, comma-separated (or repeat the option); RUN@STEP for "
                          "one of its checkpoints; default weights as an export takes them; at most 6")
    cmd.add_argument("--prompt", default=None, help="the user message every column answers")
    cmd.add_argument("--system", default=None, help="a system prompt for every column")
    cmd.add_argument("--model", default=None,
                     help="the base model to compare over (default: the project's model)")
    cmd.add_argument("--device", choices=["cuda", "cpu"], default=None,
                     help="where the model answers (default: the GPU if there is one, in bf16; the CPU in fp32)")
    cmd.add_argument("--max-tokens", type=int, default=64, help="new tokens per answer, 1 to 4096 (default 64)")
    cmd.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy, the same answer every time; above 0 (up to 5): sampling")
    cmd.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling share, in (0, 1] (sampling only)")
    cmd.add_argument("--seed", type=int, default=0, help="the sampling seed")
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.set_defaults(handler=_cmd_compare)
