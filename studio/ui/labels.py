"""User-visible text of the app, in one place so it reads consistently and can be translated."""

TITLE = "PEFT Studio"
TAGLINE = "Fine-tune a language model with any parameter-efficient method, on your own machine."

TABS = ["Data", "Method", "Train", "Compare", "History", "Export"]

# What each tab will do, shown until the tab is built.
COMING = {
    "Data": (
        "Import a dataset (JSONL, JSON, CSV/TSV, Parquet, plain text or a saved Hugging Face "
        "dataset), let the studio detect its format, map columns, validate every row with "
        "row-numbered errors, and preview rows exactly as the model will see them, with the "
        "tokens that count in the loss highlighted and token-length statistics."
    ),
    "Method": (
        "Pick LoRA, QLoRA, DoRA, rsLoRA, LoRA+, bottleneck adapters, prefix or prompt tuning, "
        "IA3 and more; see the exact number of trainable parameters and a term-by-term GPU "
        "memory estimate for your settings before any weights load."
    ),
    "Train": (
        "Train in a background worker on your GPU (or CPU) with live loss, learning rate, "
        "throughput and progress; stop, resume, and survive crashes and app restarts."
    ),
    "Compare": (
        "Ask one question and read the answers of the base model and several adapters side "
        "by side, over one copy of the base weights; score them on a sample task's eval set."
    ),
    "History": (
        "Every project, dataset, run, metric and export kept: filter, compare curves, diff "
        "configurations, and run a bake-off of methods on your own data."
    ),
    "Export": (
        "Save a merged model that plain transformers loads, or adapter-only files in the "
        "standard PEFT layout, each verified against the trained model before it is marked good."
    ),
}
NOT_BUILT = "This tab is being built. Here is what it will do:"

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
