"""Exporting what a run trained: a merged Hugging Face model folder (plain transformers loads
it) or adapter-only files (the standard PEFT layout, or ours for bottleneck adapters), each
verified against the trained model before it is marked good.

Modules: ``load`` (rebuild a trained model from a run), ``build`` (write an export atomically and
record it), ``verify`` (reload it in a clean child process and compare), ``card`` (README.md).
"""

from studio.export.build import ExportError, export_run, exports_dir

__all__ = ["ExportError", "export_run", "exports_dir"]
