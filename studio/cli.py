"""``peft-studio``: the command line. Everything the UI does, headless.

Sub-commands: ``ui`` (the web app), ``setup`` (prepare the embedded model), ``info``
(architecture facts of a model source), ``estimate`` (trainable count and memory), ``train``
and ``stop`` (a run from a runspec file, through the same worker the UI uses; in
``studio/cli_train.py``), ``export`` (merged or adapter-only files of a run's final weights or
one of its checkpoints, verified), ``bakeoff`` (several methods, one budget, one
table; in ``studio/bakeoff/cli.py``), ``serve`` (an OpenAI-compatible endpoint over one base and
many adapters; in ``studio/cli_serve.py``), ``compose`` (trained LoRA adapters combined into a
derived run; in ``studio/cli_compose.py``), ``job`` (cluster jobs; ``studio/cli_job.py``),
``projects``, ``data``, ``runs`` (``studio/cli_projects.py``, ``cli_data.py``, ``cli_runs.py``; ``runs
export`` in ``studio/trackers/cli.py``) and ``compare`` (``studio/cli_compare.py``); ``export
--push-to-hub`` uploads through ``studio/export/hub.py``. Each sub-command's heavy imports stay in
its handler.
"""

from __future__ import annotations

import argparse
import json
import sys

from studio import config


def _cmd_ui(args: argparse.Namespace) -> int:
    from studio.ui.launch import LaunchError, resolve_auth, serve

    try:
        auth = resolve_auth(args.host, args.auth, args.auth_file)
    except LaunchError as exc:
        print(f"peft-studio ui: {exc}", file=sys.stderr)
        return 2
    serve(args.host, args.port, auth, block=True)
    return 0


def _cmd_setup(args: argparse.Namespace) -> int:
    from studio.models import ModelSourceError, resolve_source

    try:
        folder = resolve_source(args.model)
    except ModelSourceError as exc:
        print(f"peft-studio setup: {exc}", file=sys.stderr)
        return 2
    print(f"Model ready at {folder}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from studio.arch import ArchInfo
    from studio.models import ModelSourceError, load_config

    try:
        info = ArchInfo.from_config(load_config(args.model, args.trust_remote_code),
                                    args.trust_remote_code)
    except ModelSourceError as exc:
        print(f"peft-studio info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info.to_dict(), indent=2))
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from studio.arch import ArchInfo
    from studio.estimate import TrainSetup
    from studio.methods import SettingError
    from studio.models import ModelSourceError, load_config
    from studio.planner import plan

    try:
        settings = dict(_key_value(item) for item in args.set)
        arch = ArchInfo.from_config(load_config(args.model, args.trust_remote_code), args.trust_remote_code)
        setup = TrainSetup(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                           quant=args.quant or "none", grad_checkpointing=args.grad_checkpointing,
                           optimizer=args.optimizer, device=args.device, processes=args.processes,
                           strategy=args.distributed, offload=args.offload)
        if args.offload and args.distributed == "ddp":
            raise ValueError("--offload needs --distributed fsdp, zero2 or zero3 (ddp keeps whole copies)")
        if not 1 <= args.processes <= 65_536:
            raise ValueError(f"--processes must be 1 to 65,536 GPUs in all (got {args.processes})")
        result = plan(arch, args.method, settings, setup)
    except (ModelSourceError, SettingError, ValueError) as exc:
        print(f"peft-studio estimate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['title']}: {result['trainable_params']:,} trainable "
              f"({result['trainable_percent']:.3f} %)\n  {result['formula']}")
        for name, value in result["memory_bytes"].items():
            print(f"  {name:12s} {value / 2**30:9.3f} GiB   {result['memory_formulas'][name]}")
        each = f" per GPU, {args.processes} processes, {args.distributed}" if args.processes > 1 else ""
        print(f"  {'total':12s} {result['total_bytes'] / 2**30:9.3f} GiB{each}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from studio.db import Database
    from studio.export import ExportError, export_run

    hub = None
    if args.push_to_hub is not None or args.private:  # checked before the (long) export, nothing written
        from studio.export.hub import HubError, preflight

        try:
            if args.push_to_hub is None:
                raise HubError("--private is for --push-to-hub REPO (a private repo on the hub)")
            hub = preflight(args.push_to_hub)
        except HubError as exc:
            print(f"peft-studio export: {exc}", file=sys.stderr)
            return 2
    db = Database()
    try:
        dtype = args.dtype or ("f16" if args.kind == "gguf" else "float32")
        row = export_run(db, args.run_id, args.kind, dtype, checkpoint=args.checkpoint,
                         shard_size=args.shard_size, dest=args.dest, overwrite=args.overwrite,
                         verify=not args.no_verify,
                         progress=lambda fraction, message: print(f"[{fraction:4.0%}] {message}", flush=True))
    except ExportError as exc:
        print(f"peft-studio export: {exc}", file=sys.stderr)
        return 2
    push_error = None
    if hub is not None and row.status in ("verified", "unverified"):
        from studio.export.hub import HubError, push_export

        print(f"Uploading {row.path} to {hub.repo_id} on {hub.endpoint}", file=sys.stderr, flush=True)
        try:
            row = push_export(db, row, hub, private=args.private)
        except HubError as exc:  # the export stays: its JSON first, then what to run to push it
            push_error = exc
    verification = {k: v for k, v in (row.verification or {}).items() if k != "folder_token"}  # internal
    print(json.dumps({"id": row.id, "path": row.path, "status": row.status, "size_bytes": row.size_bytes,
                      **({"pushed_to": verification["hub_url"]} if "hub_url" in verification else {}),
                      "verification": verification}, indent=2))
    if push_error is not None:
        print(f"peft-studio export: {push_error}", file=sys.stderr)
        return 130 if push_error.interrupted else 2
    return 0 if row.status in ("verified", "unverified") else 1


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects key=value, got {item!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-studio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ui = sub.add_parser("ui", help="open the studio in your browser")
    ui.add_argument("--host", default=config.DEFAULT_HOST,
                    help="address to listen on (default 127.0.0.1; others need --auth)")
    ui.add_argument("--port", type=int, default=config.DEFAULT_PORT)
    group = ui.add_mutually_exclusive_group()
    group.add_argument("--auth", metavar="USER[:PASSWORD]",
                       help="require this login; with USER alone the password is asked for "
                            "(USER:PASSWORD shows it to every user of the machine in ps)")
    group.add_argument("--auth-file", metavar="FILE",
                       help="logins, one user:password per line (chmod 600); preferred")
    ui.set_defaults(handler=_cmd_ui)

    setup = sub.add_parser("setup", help="prepare a model (convert and cache the embedded one)")
    setup.add_argument("--model", default=config.DEFAULT_MODEL)
    setup.set_defaults(handler=_cmd_setup)

    info = sub.add_parser("info", help="print a model's architecture facts (reads no weights)")
    info.add_argument("model", nargs="?", default=config.DEFAULT_MODEL,
                      help="'default', a model folder, a config.json, a .gguf file or a hub id")
    info.add_argument("--trust-remote-code", action="store_true",
                      help="allow the model's own Python code (only for sources you trust)")
    info.set_defaults(handler=_cmd_info)

    est = sub.add_parser("estimate", help="trainable parameters and training memory (no weights read)")
    est.add_argument("--model", default=config.DEFAULT_MODEL,
                     help="a model folder, a config.json, a .gguf file, a hub id or 'default'")
    est.add_argument("--method", required=True, help="lora, dora, rslora, loraplus, qlora, houlsby, "
                     "prefix, prompt, ia3, adalora, loha, lokr, vera, full, last_n")
    est.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a method setting, peft's own name (r, lora_alpha, target_modules=q_proj,v_proj, ...)")
    est.add_argument("--batch-size", type=int, default=4)
    est.add_argument("--seq-len", type=int, default=256)
    est.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    est.add_argument("--quant", choices=["none", "nf4", "int8"], default=None,
                     help="quantise the frozen base (qlora implies nf4)")
    est.add_argument("--grad-checkpointing", action="store_true")
    est.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default="adamw")
    est.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                     help="cuda adds the runtime allowance (~0.75 GiB)")
    est.add_argument("--processes", type=int, default=1, help="GPUs in all (nodes x GPUs per node): the "
                     "estimate is per GPU (studio/distributed/memory.py)")
    est.add_argument("--distributed", choices=["ddp", "fsdp", "zero2", "zero3"], default="ddp")
    est.add_argument("--offload", action="store_true", help="FSDP / ZeRO states in CPU RAM (a RAM term)")
    est.add_argument("--trust-remote-code", action="store_true")
    est.add_argument("--json", action="store_true", help="print one JSON object")
    est.set_defaults(handler=_cmd_estimate)

    from studio.cli_train import add_parsers as add_train

    add_train(sub)  # train, stop

    ex = sub.add_parser("export", help="export a run's trained weights: merged model or adapter, verified")
    ex.add_argument("run_id", type=int)
    ex.add_argument("--checkpoint", type=int, default=None, metavar="STEP",
                    help="export the checkpoint saved at this step (default: the final weights of a "
                         "completed run, else the run's latest checkpoint, e.g. after Stop and save)")
    ex.add_argument("--kind", choices=["merged", "adapter", "gguf"], default="merged")
    from studio.export.llamacpp import KQUANTS  # no torch: the k-quants' names

    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "f16", "q8_0", *KQUANTS], default=None,
                    help="float32/bfloat16/float16 (merged, adapter); f16/q8_0 (gguf), or the k-quants "
                         f"{'/'.join(KQUANTS)} through llama.cpp's quantiser (needs llama-cpp-python)")
    ex.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 500MB")
    ex.add_argument("--dest", default=None, help="a folder of your choice (default: the project's exports/)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    ex.add_argument("--no-verify", action="store_true", help="skip reloading and comparing")
    ex.add_argument("--push-to-hub", default=None, metavar="REPO",
                    help="then upload the export to this Hugging Face repo (user/name), README.md as its "
                         "model card; the token from `hf auth login` or HF_TOKEN; checked before exporting")
    ex.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    ex.set_defaults(handler=_cmd_export)

    from studio.bakeoff.cli import add_parser as add_bakeoff

    add_bakeoff(sub)

    from studio.cli_serve import add_parsers as add_serve

    add_serve(sub)

    from studio.cli_compose import add_parser as add_compose

    add_compose(sub)

    from studio.cli_job import add_parser as add_job

    add_job(sub)  # job export, job import

    from studio.cli_data import add_parser as add_data
    from studio.cli_runs import add_parser as add_runs
    from studio.cli_compare import add_parser as add_compare

    add_data(sub)  # data import, data sample, data list
    from studio.cli_projects import add_parser as add_projects

    add_projects(sub)  # projects list, create, rename, delete
    add_runs(sub)  # runs list, show, stop, resume, export
    add_compare(sub)
    return parser


# What Ctrl-C left behind, per command, when the command did not say it itself.
INTERRUPTED_NOTES = {
    "ui": "the web app stopped; runs that were training keep training in their workers",
    "export": "the partial export was removed and the export recorded as failed",
    "bakeoff": "the bake-off's runs keep training in the background (the queue goes on)",
    "serve": "the server stopped",
    "compose": "nothing was recorded and the unfinished adapter was removed",
    "job": "nothing was recorded; an unfinished job or import folder (a hidden .tmp one) was removed",
    "setup": "the model cache is only marked ready once complete; run setup again",
}


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Errors from the world (database locked or read-only, disk full,
    an unwritable folder) and Ctrl-C end in one line on stderr, not a traceback: exit code 2
    for an error, 130 for Ctrl-C. Anything else is a bug and keeps its traceback."""
    from studio import errors

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        note = INTERRUPTED_NOTES.get(args.command, "nothing was left half-done")
        print(f"\npeft-studio {args.command}: interrupted (Ctrl-C); {note}", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        line = errors.describe(exc)
        if line is None:
            raise
        print(f"peft-studio {args.command}: {line}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
