"""Adapters beyond what one training run makes: ``bottleneck`` (the Houlsby adapter module PEFT
does not provide, written here), ``compose`` / ``compose_build`` / ``compose_child`` (trained
LoRA adapters combined into a new one with PEFT's ``add_weighted_adapter``: recipe and checks,
the torch side, the UI's child process) and ``derived`` (how the app reads a composed run)."""
