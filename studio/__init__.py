"""PEFT Studio: fine-tune, compare and export parameter-efficient adapters from a local web app."""

__version__ = "0.1.0"
