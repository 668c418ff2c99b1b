"""User-visible text of the app, in one place so it reads consistently and can be translated."""

TITLE = "PEFT Studio"
TAGLINE = "Fine-tune a language model with any parameter-efficient method, on your own machine."

TABS = ["Data", "Method", "Train", "Compare", "History", "Export"]

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
REFRESH = "Refresh"


def delete_warning(name: str) -> str:
    return (
        f"**Delete '{name}'?** Its datasets, runs, checkpoints and exports will be removed "
        "from disk and from the history. This cannot be undone."
    )

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
    "seed": ("Seed", "The same seed and settings give the same run."),
    "eval_steps": ("Eval every (steps)", "Evaluate on the held-out split every this many steps (0: only "
                   "at the end)."),
    "exact_match_limit": ("Exact-match eval rows", "Held-out rows the model answers at each evaluation for "
                          "the exact-match score: a sample task's answers, or an imported chat dataset's "
                          "final assistant turns (0: skip; generating is slow on a CPU, most with long "
                          "answers)."),
}
TRAIN_HELP = {
    "data": "A sample task (imported into this project on first use and scored by exact match) "
            "or a dataset you imported in the Data tab.",
    "method": "Shared with the Method tab, whose settings (e.g. the LoRA rank) are used too.",
    "run": "Every run of this project, newest first. Pick one to see its curves and summary.",
}
TRAIN_MSG = {
    "no_project": "**Not started:** pick or create a project first.",
    "refused": "**Not started:** {reason}",
    "too_big": "**Not started: it would not fit.** {estimate} Lower the batch size or max length, turn "
               "on gradient checkpointing, or pick QLoRA.",
    "busy": "run #{id} ('{name}') is training on this machine; two trainings would fight for the same "
            "device. Stop it or wait for it to finish.",
    "started": "**Started run #{id}** ({name}).",
    "not_running": "**Nothing to stop:** the selected run is not running.",
    "stopping": "**Stopping run #{id}** after its current step, {kept}.",
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
    "log": "Worker log (last lines)",
    "cloned": ("**Cloned run #{id} ('{name}') into the Train tab.** Change what you want there and press "
               "**Start training**."),
    "clone_no_data": "Its dataset is no longer in this project: choose what to train on.",
    "clone_skipped": "Not settable in the Train tab, so the new run uses the defaults for: {fields}.",
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
