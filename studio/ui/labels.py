"""User-visible text of the app, in one place so it reads consistently and can be translated."""

from studio.runs import outcome

TITLE = "PEFT Studio"
TAGLINE = "Fine-tune a language model with any parameter-efficient method, on your own machine."

TABS = ["Data", "Method", "Train", "Compare", "History", "Export", "Serve"]

PROJECT_LABEL = "Project"
NEW_PROJECT = "New project name"
CREATE = "Create"
RENAME_TO = "Rename to"
RENAME = "Rename"
DELETE = "Delete project…"
DELETE_CONFIRM = "Delete for good"
CANCEL = "Cancel"
MANAGE = "Manage projects"
SYSTEM = "System"
SYSTEM_READING = "Reading the machine…"
REFRESH = "Refresh"
PROJECT_MSG = {
    "done": "**Done:** {what}",
    "failed": "**Could not do that:** {reason}",
    "created": "Created '{name}'.",
    "renamed": "Renamed to '{name}'.",
    "deleted": "Deleted '{name}'.",
    "pick_rename": "Pick a project to rename first.",
    "pick_delete": "Pick a project to delete first.",
    "gone": "That project no longer exists.",
}


def delete_warning(name: str) -> str:
    return (
        f"**Delete '{name}'?** Its datasets, runs, checkpoints and exports will be removed "
        "from disk and from the history. This cannot be undone."
    )

# ---- Data tab ----
DATA = {
    "train_at_once": ("**New here?** The Train tab can start a run at once on a sample task; no "
                      "dataset needed. Import your own data here when you are ready."),
    "samples": "**Start from a sample task** (imported into the current project):",
    "upload": "Upload a dataset (JSONL, JSON, CSV, TSV, Parquet, TXT)",
    "path": "…or a file path, a saved dataset folder, or a hub dataset id",
    "text_mode": "Plain text: one example per",
    "text_mode_help": "line, or block of lines separated by a blank line",
    "inspect": "Inspect",
    "raw": "First rows as read",
    "format": "Format",
    "format_help": "Change it if the detection is wrong",
    "options": "Import options",
    "name": "Dataset name (default: from the file)",
    "eval_ratio": "Held-out eval share",
    "invalid": "Invalid rows",
    "invalid_help": "drop them (listed in the report) or refuse the whole import",
    "max_tokens": "Max tokens per example",
    "max_tokens_help": "Rows longer than this are counted (or cut or dropped, below); the Train tab's "
                       "default max length",
    "long": "Longer rows",
    "import": "Import",
    "dataset": "Dataset",
    "max_len": "Max length for the preview (tokens)",
    "loss_on": "Loss on",
    "lengths": "Token lengths",
    "choose_first": "**Choose a file or type a path first.**",
    "cannot_read": "**Cannot read it:** {reason}",
    "detected": "**Detected: {format}** (confidence {confidence:.0%}) — {evidence}",
    "file_kind": "File kind: {kind}. Columns: {columns}.",
    "no_project": "**Pick or create a project first.**",
    "inspect_first": "**Inspect a file first.**",
    "inspect_failed": "**The last Inspect failed, so there is nothing to import:** {reason}",
    "refused": "**Import refused:** {reason}",
    "imported": "**{how}: {name}** — {train} training / {eval} eval examples, format {format}.",
    "reused": "Already imported",
    "new": "Imported",
    "sampled": " (first {n:,} of {total:,} rows)",
    "length_stats": ("**Token lengths{sampled}**: min {min}, median {median:.0f}, mean {mean:.1f}, p90 {p90:.0f}, "
                     "p99 {p99:.0f}, max {max}. {over:,} rows longer than {max_length} tokens."),
}

# ---- data choices (Train, Bake-off, Compare's eval sets) ----
DATA_SAMPLE = "Sample task: {title}"
DATA_DATASET = "Dataset: {name} ({train} train / {eval} eval)"

# ---- Method tab ----
METHOD = {
    "model": "Model",
    "model_help": "'default' (the embedded SmolLM2-135M), a model folder, config.json, .gguf file or hub id. "
                  "Only its config is read. Follows the project's model; change it to plan for another.",
    "read_model": "Read model",
    "method": "Method",
    "setup": "Training setup (shared with the Train tab)",
    "quant": "Base quantisation",
    "quant_help": "For planning; QLoRA always uses NF4",
    "optimizer": "Optimizer",
    "optimizer_help": "adamw8bit keeps the optimizer states in 8 bits (needs bitsandbytes and a GPU).",
    "gpu": "GPU memory available (GiB)",
    "gpu_help": "Read from your GPU when there is one; set it to plan for another (0: this machine, "
                "judged against its available RAM when it has no GPU).",
    "bar": "Training memory by term",
    "cannot_estimate": "**Cannot estimate:** {reason}",
    "cannot_read": "**Cannot read that model:** {reason}",
    "card": "**{title}** — {family} · merges into the base: {merge} · inference overhead: {overhead}  \n{guidance}",
    "count": "## {params:,} trainable parameters\n{percent:.4f} % of {total:,}",
    "total": "### Estimated training memory: {gib:.2f} GiB — {verdict}\nas {precision}: {why}  \n{notes}{terms}",
    # {where}: "GPU" (its free memory, or the figure planned for) or "RAM" (available, on a CPU).
    "verdicts": {"fits": "fits in {budget:.1f} GiB of {where}",
                 "tight": "tight: close to the {budget:.1f} GiB of {where} available",
                 "exceeds": "exceeds the {budget:.1f} GiB of {where} available",
                 "unknown": "no memory figure: the available RAM could not be read; enter the GPU "
                            "you plan to train on"},
    "ram_exceeds": "Over the available RAM the system swaps: the run is slow, but it is not refused.",
    "cpu_4bit": ("On a CPU, 4-bit training (bitsandbytes {version}) de-quantises every frozen weight "
                 "at every matmul: it saves RAM but trains slower than the same adapter over a "
                 "bf16/fp32 base (bitsandbytes' fast CPU 4-bit kernel serves inference only and "
                 "carries no gradient). Choose it on a CPU only when the model does not fit in RAM "
                 "otherwise."),
    "advisor": "Advisor: which method for me?",
    "examples": "Training examples",
    "must_merge": "Must merge into the base",
    "many_tasks": "Many tasks on one base",
    "quality": "Quality first",
    "rank": "Rank the methods",
    "advisor_columns": ["method", "score", "reasons", "params", "GiB", "verdict"],
    "advanced": "Advanced settings",
}

# ---- Train tab ----
TRAIN_DATA = "Train on"
TRAIN_METHOD = "Method"
TRAIN_STEPS = "Max steps"
TRAIN_ADVANCED = "Advanced training settings"
TRAIN_START = "Start training"
TRAIN_STOP = "Stop and save"
TRAIN_DISCARD = "Stop and discard"
TRAIN_RESUME = "Resume selected run"
TRAIN_RUN = "Run"
TRAIN_NO_RUN = "No run yet: choose what to train on and press **Start training**."
TRAIN_LOG = "Worker log (last lines)"
PLOTS = {"loss": "Loss", "lr": "Learning rate", "speed": "Tokens per second"}
TRAIN_PREPARING = "Starting: loading the model and tokenising the data…"
# Label and help of each training setting, by RunSpec field.
TRAIN_FIELDS = {
    "max_steps": ("Max steps", "Optimizer steps to train. 0 uses the number of epochs instead."),
    "epochs": ("Epochs", "Passes over the training split; only used when max steps is 0."),
    "batch_size": ("Batch size", "Examples per step. Larger is faster per example but needs more memory."),
    "grad_accum": ("Gradient accumulation", "Steps whose gradients are added up before one update: a "
                   "larger effective batch without more memory."),
    "learning_rate": ("Learning rate", "2e-4 suits LoRA-type methods; full fine-tuning wants ~1e-5."),
    "lr_scheduler": ("Schedule", "How the learning rate changes over training (after a 5 % warm-up)."),
    "max_length": ("Max length (tokens)", "Longer examples are cut to this many tokens. Memory grows with it."),
    "packing": ("Packing", "Join short examples into full-length rows: fewer padding tokens, faster epochs."),
    "grad_checkpointing": ("Gradient checkpointing", "Recompute activations in the backward pass: much "
                           "less memory, about 30 % slower."),
    "precision": ("Precision", "auto: bf16 (or fp16) on a GPU; on the CPU bf16 only where a short "
                  "measurement shows a bf16 training step clearly faster (≥ 1.15×), else fp32. bf16 "
                  "moves the losses a little (a few %); fp32 keeps them exact. The run says what it "
                  "chose and why."),
    "liger_kernel": ("Liger kernels (GPU)", "NVIDIA GPUs with liger-kernel installed: fused RMSNorm, RoPE, "
                     "SwiGLU and loss kernels, less memory and usually faster; results move by rounding "
                     "only. Refused on a CPU."),
    "optimizer": ("Optimizer", "adamw suits most runs; adamw8bit keeps its states in 8 bits (needs "
                  "bitsandbytes and a GPU); sgd keeps none."),
    "seed": ("Seed", "The same seed and settings give the same run."),
    "eval_steps": ("Eval every (steps)", "Evaluate on the held-out split every this many steps (0: only "
                   "at the end)."),
    "nproc_per_node": ("Processes (DDP)", "Worker processes on this machine, one per GPU, each training on "
                       "its share of every step (DDP under torchrun): the batch size is per process, so a step "
                       "trains on processes × batch examples. 0 uses every visible GPU."),
    "exact_match_limit": ("Exact-match eval rows", "Held-out rows the model answers at each evaluation for "
                          "the exact-match score: a sample task's answers, or an imported chat dataset's "
                          "final assistant turns (0: skip; generating is slow on a CPU, most with long "
                          "answers)."),
}
# Experiment trackers (studio/trackers/): per-run switches; a tracker whose package is missing is
# shown off and greyed, its help replaced by the install line (trackers.choice.missing).
TRAIN_TRACKERS = {
    "tensorboard": ("Log to TensorBoard", "A copy of the run's curves in its folder (tensorboard/); the "
                    "studio's History stays the record."),
    "mlflow": ("Log to MLflow", "A copy of the run's curves and settings in the project's local MLflow store "
               "(mlflow/mlflow.db); the studio's History stays the record."),
}
TRAIN_TRACKER_LOGS = "{title}: `{where}` — view: `{view}`{note}"
TRAIN_HELP = {
    "data": "A sample task (imported into this project on first use and scored by exact match) "
            "or a dataset you imported in the Data tab.",
    "method": "The same choice as the Method tab's, whose settings (e.g. the LoRA rank) are used too.",
    "run": "Every run of this project, newest first. Pick one to see its curves and summary.",
}
TRAIN_ESTIMATE = {
    "head": ("**Estimated training memory: {gib:.2f} GiB** for {title} ({params:,} trainable parameters), "
             "batch {batch} × {length} tokens, {precision} ({why})"),
    "cpu": ". No GPU found: training runs on the CPU, in RAM.",
    "GPU": " — GPU has {free:.1f} GiB free: **{verdict}**.",
    "RAM": " — no GPU: training runs on the CPU, with {free:.1f} GiB of RAM available: **{verdict}**.",
    "swap": " Over the available RAM the system swaps: slow, but the run is not refused.",
    "failed": "**Cannot estimate:** {reason}",
    "no_project": "Pick or create a project to see the memory estimate.",
}
# What the Method and Train tabs add below a memory verdict (ui/estimates.fit_notes).
FIT = {
    "warning": "**Warning:** {text}.",
    "advice": "**To fit, change one thing** (estimated):  \n{lines}",
    "no_advice": "(could not estimate the alternatives: {reason})",
    "per_process": "**Per GPU**, for {n} processes under {strategy}{offload}: each term below is one "
                   "process's share (the formulas say what is divided by {n}).",
    "offload": " with CPU offload (the offloaded states are a RAM term, outside the GPU total)",
}
STRATEGY_NAMES = {"ddp": "DDP (everything replicated)", "fsdp": "FSDP (full shard)",
                  "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
TRAIN_MSG = {
    "no_project": "**Not started:** pick or create a project first.",
    "refused": "**Not started:** {reason}",
    "started": "**Started run #{id}** ({name}).",
    "not_running": "**Nothing to stop:** the selected run is not running.",
    "stopping": "**Stopping run #{id}** after its current step (at once if it is evaluating), {kept}.",
    "kept": {"save": "saving a checkpoint", "discard": "discarding its checkpoints"},
    "stopped": {"save": "**Run #{id} stopped** ({status}); its checkpoint is kept: *Resume selected run* "
                        "continues it.",
                "discard": "**Run #{id} stopped** ({status}); its checkpoints were discarded."},
    "no_resume": "**Nothing to resume:** select a failed, cancelled or out-of-memory run.",
    "not_resumed": "**Not resumed:** {reason}",
    "resumed": "**Resumed run #{id}** from its latest checkpoint.",
}

# ---- History tab ----
HISTORY = {
    "runs": "Runs",
    "compare": "Run comparison",  # no main tab name inside a sub-tab name: tests find tabs by name
    "project": "Project overview",
    "search": "Search",
    "search_hint": "name, note, method, setting or #id",
    "status": "Status",
    "method": "Method",
    "sort": "Sort by",
    "descending": "Largest / newest first",
    "runs_table": "Runs of this project (click a row to open it)",
    "open": "Open run",
    "open_help": "Its curves, runspec and log; rename, note, delete or clone it below.",
    "name": "Name",
    "rename": "Rename",
    "notes": "Note",
    "save_note": "Save note",
    "clone": "Clone into Train tab",
    "delete": "Delete run…",
    "delete_warning": ("**Delete run #{id} '{name}'?** Its metrics, checkpoints and folder `{folder}` "
                       "(adapter, log, runspec) are removed from disk and from the history. Exports made "
                       "from it are kept. This cannot be undone."),
    "runspec": "Runspec (runspec.json)",
    "pick_run": "Pick a run in the table (or the list above) to open it.",
    "renamed": "renamed to '{name}'.",
    "noted": "note saved.",
    "deleted": "deleted run #{id}.",
    "deleted_folder": "deleted run #{id} and its folder `{folder}`.",
    "log": "Worker log (last lines)",
    "cloned": ("**Cloned run #{id} ('{name}') into the Train tab.** Change what you want there and press "
               "**Start training**."),
    "clone_no_data": "Its dataset is no longer in this project: choose what to train on.",
    "clone_hidden": "Kept from that run, though no widget shows them: {fields}.",
    "clone_failed": "**Could not clone:** {reason}",
    "done": "**Done:** {what}",
    "failed": "**Could not do that:** {reason}",
    "clone_model": "It trained on '{model}'; a new run uses this project's model '{project_model}'.",
    "compare_label": "Runs to compare",
    "compare_help": "Tick 2 to 8 runs: their loss curves are overlaid and their configurations diffed.",
    "compare_pick": "Tick at least two runs to compare them.",
    "compare_too_many": "Tick at most {n} runs: more lines than that cannot be told apart.",
    "compare_same": "**The selected runs have the same configuration.**",
    "compare_diff": "**{n} configuration field(s) differ** (listed below the curves).",
    "compare_train": "Train loss",
    "compare_eval": "Eval loss",
    "compare_results": "Results",
    "compare_diff_label": "Configuration fields that differ",
    "projects": "All projects",
    "datasets": "Datasets of this project",
    "exports": "Exports of this project",
}

# ---- Bake-off (a section of the History tab) ----
BAKEOFF = {
    "intro": ("**Bake-off:** the same data and budget for several methods, one table. One run per method "
              "is queued and trained in turn by the background worker (it continues with the app closed); "
              "after training each adapter is reloaded, merged where the method merges, scored by exact "
              "match on the eval split and timed generating."),
    "data": "Data",
    "methods": "Methods",
    "steps": "Steps (each method)",
    "batch": "Batch size",
    "max_length": "Max length (tokens)",
    "eval_rows": "Eval rows scored by exact match",
    "lr": "Learning rate for all (0: each method's usual rate)",
    "queue": "Queue bake-off",
    "bakeoff": "Bake-off",
    "cancel": "Cancel the rest",
    "refresh": "Refresh",
    "csv": "Download CSV",
    "markdown": "Download Markdown",
    "plot": "Quality against trainable parameters",
    "no_project": "**Pick or create a project first.**",
    "refused": "**Not queued:** {reason}",
    "queued": ("**Bake-off #{id} queued:** {n} runs ({methods}). {state}"),
    "started": "Run #{run} is training now.",
    "waiting": "Another run is training; the bake-off starts after it.",
    "none": "No bake-off in this project yet: choose methods and press **Queue bake-off**.",
    "cancelled": "**Cancelled {n} run(s)** of bake-off #{id}.",
}


EXPORT = {
    "run": "Run",
    "weights": "Weights",
    "weights_help": "A completed run's final weights, or a checkpoint (a run stopped with Stop and save "
                    "keeps its latest one).",
    "nothing": "Nothing to export yet: a run's final weights or its checkpoints appear here once it "
               "has finished, or has been stopped with Stop and save.",
    "pick": "**Pick a run first.**",
    "failed": "**Export failed:** {reason}",
    "done": "**Export {status}:** `{path}` ({mb:.1f} MiB, {weights}). {checked}",
    "ollama": "\n\n**Run it in Ollama:** `cd {path}`, then `ollama create {name} -f Modelfile` and `ollama run {name}` "
              "(the Modelfile carries the chat template, the stop tokens and the system prompt).",
    "checked": "max |Δlogit| {diff:.2e}, greedy agreement {agree:.0%} over {prompts} prompts, loaded with {loader}",
    "no_merge": "**{title} cannot be merged.** {notes} Choose *adapter* to export it.",
    "qlora": "**QLoRA:** the merged export is the 4-bit base de-quantised to the chosen dtype with the adapter "
             "merged in; its outputs are compared with the 4-bit model as trained.",
    "merges": "{title}: merges into the base with no inference overhead.",
    "llamacpp_checked": "llama.cpp: greedy agreement {agree:.0%} over {prompts} prompts{ties} ({required}); {stop}",
    "llamacpp_ties": ", {n} more departing at a near-tie (logit margin at most {margin:.2g}, within the file's "
                     "rounding)",
    "llamacpp_stopped": "{stopped} of {ending} answers that end stopped at the end-of-turn token",
    "llamacpp_no_end": "no answer reached the end-of-turn token within the tokens compared (llama.cpp treats "
                       "it as the end of generation: {eog})",
    "gguf_types": "f16, q8_0: written by the studio. Q4_K_M, Q5_K_M, Q6_K: llama.cpp's own quantiser{missing}.",
    "kquant_missing": " (needs llama-cpp-python, not installed: {install})",
}

TRAIN_VIEW = {
    "evaluating": "evaluating at step {step}: {part} {done} of {total}",
    "evaluating_start": "evaluating at step {step}…",
    "parts": {"eval loss": "eval loss, batch", "exact match": "exact match, answer"},
    "preparing": "loading the model and data…",
    "finishing": "finishing (final save and measurements)…",
    "untimed": " + {n} evaluation(s), not timed yet",
    "resumed": "**Resumed run #{id}** from its checkpoint at step {step}.",
    "restarted": "**Restarted run #{id} from step 0:** it has no checkpoint to continue from{why}.",
    "restart_why": {outcome.DISCARDED: " (Stop and discard removed its checkpoints)",
                    outcome.NEVER_STARTED: " (it never started)"},
}

SERVE = {
    "intro": ("**Serve this project's adapters** over one copy of the base model, at an OpenAI-compatible "
              "endpoint (`/v1/chat/completions`, `/v1/completions`, `/v1/models`): any tool that speaks the "
              "OpenAI API picks an adapter by sending its name as `model`. The server is a separate "
              "process; it keeps running while you use the other tabs, and stops when the app stops."),
    "planned": "What will be served",
    "runs": "Runs to serve",
    "runs_help": "Empty: every finished run of the project (each one's trained adapter).",
    "host": "Host",
    "host_help": "127.0.0.1: this machine only. Any other address needs an API key.",
    "port": "Port",
    "port_help": "0 picks a free port.",
    "key": "API key",
    "key_help": "Clients send it as 'Authorization: Bearer KEY'. Required unless the host is 127.0.0.1.",
    "generate": "Generate a key",
    "max_active": "Max active adapters",
    "max_active_help": "How many adapters are attached at once; others load on first request, the least "
                       "recently used is detached.",
    "start": "Start server",
    "stop": "Stop server",
    "status": "Status",
    "models": "Served models (GET /v1/models)",
    "curl": "curl",
    "python": "Python (openai client)",
    "no_project": "**Pick a project first.**",
    "not_running": "**Not running.**",
    "starting": "Starting the server: loading the base model ({seconds:.0f} s)…",
    "running": "**Running** at `{url}` (pid {pid}, since {since}): {models} models. Log: `{log}`",
    "stopped": "**Stopped.** {reason}",
    "refused": "**Not started:** {reason}",
    "no_adapters": "No finished run with an adapter in this project yet: only the base model would be served.",
    "skipped": "Not served: {notes}",
    "cannot_list": "**Cannot list what would be served:** {reason}",
    "models_failed": "The server did not answer GET /v1/models: {reason}",
    "key_note": "The key is read from `$PEFT_STUDIO_API_KEY` in these snippets: `export PEFT_STUDIO_API_KEY=...` first.",
    "snippet_idle": "Start the server to see the lines to use, with its real address.",
}
