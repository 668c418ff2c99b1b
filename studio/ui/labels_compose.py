"""User-visible text of adapter composition: the Export tab's "Combine adapters" section, and how
History, the Train tab and Compare speak of a combined (derived) run. Kept apart from
``labels.py`` so that file stays under its size budget; the same rules apply (one place, plain
words, the reason with every refusal)."""

COMPOSE = {
    "section": "Combine adapters",
    "intro": ("Combine two or more trained LoRA adapters of this project's base model into a new adapter "
              "(PEFT's `add_weighted_adapter`). The result is saved as a run of its own: it is listed in "
              "Compare, History and the run list above, and exports like any other run."),
    "parents": "Adapters to combine",
    "parents_help": "Two or more finished LoRA runs of this project (the same method and base model).",
    "weights": "Weights",
    "weights_help": "One number per chosen adapter, in the order chosen, separated by commas (e.g. 0.6, 0.4).",
    "combination": "Combination",
    "density": "Density",
    "density_help": "The share of each adapter's values kept before combining (TIES, DARE, magnitude pruning).",
    "svd_rank": "Rank of the result",
    "svd_help": "0: the largest rank among the chosen adapters.",
    "name": "Name of the combined run",
    "name_help": "Empty: a name made from the recipe.",
    "go": "Combine",
    "working": "Combining: loading the base model and the adapters…",
    "preview": "**Recipe:** {text}",
    "problem": "**Cannot combine these yet:** {reason}",
    "pick": "Choose at least two adapters to combine.",
    "none": ("No finished LoRA run in this project yet: train two (the Train tab, or a bake-off) and "
             "they will be listed here."),
    "no_project": "**Pick or create a project first.**",
    "refused": "**Not combined:** {reason}",
    "done": ("**Saved as run #{id} {name}:** {recipe}. It is listed in Compare, History and Export "
             "(picked above, ready to export)."),
    "bad_weights": ("weights: {text!r} is not a list of numbers; write one number per chosen adapter, "
                    "separated by commas (e.g. 0.6, 0.4)"),
    "weight_count": "weights: {n} adapters are chosen but {k} weight(s) were given; write one per adapter",
    "bad_rank": ("rank of the result: {value!r} is not a whole number of at least 1 (or 0 for the largest "
                 "parent rank)"),
    "default_name": "{combination} of {parents}",
}

# How a combined run is spoken of outside the Export tab.
DERIVED = {
    "marker": "combined",  # after the method in History's runs table: "lora · combined"
    "recipe_row": "recipe",  # the run panel's row title
    "deleted": "(deleted)",  # a parent run deleted since: "#5 (deleted)"
    "panel_note": ("**A combined adapter**, made from trained runs, not trained itself: it has no curves, "
                   "nothing to resume, and Clone is not offered for it (clone one of its parents)."),
    "no_clone": ("run #{id} is a combination of trained adapters ({recipe}), not a training run: clone one "
                 "of its parents ({parents}) to train again, or combine them anew in the Export tab"),
    "no_resume": ("**Nothing to resume:** run #{id} is a combination of trained adapters, made in the "
                  "Export tab; it was never trained."),
}
