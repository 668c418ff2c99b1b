"""Exporting what a run trained: a merged Hugging Face model folder (plain transformers loads
it) or adapter-only files (the standard PEFT layout, or ours for bottleneck adapters), each
verified against the trained model before it is marked good.

Modules: ``load`` (rebuild a trained model from a run), ``weights`` (which of a run's weights can
be exported: final or a checkpoint), ``build`` (write an export atomically and record it),
``target`` (where it goes, what it may replace), ``verify`` (reload it in a clean child process
and compare), ``card`` (README.md, the base model's portable name), ``gguf_export`` (the GGUF
writer), ``llamacpp`` / ``llamacpp_child`` (llama.cpp as a GGUF verifier and k-quant quantiser,
where installed), ``modelfile`` / ``ollama_template`` (the Ollama Modelfile beside a GGUF),
``hub`` (``--push-to-hub``), ``child`` (an export in a ``peft-studio export`` child process, for
the UI). Importing the package loads no torch: the UI lists what can be exported without it.
"""

from studio.export.build import ExportError, export_run, exports_dir

__all__ = ["ExportError", "export_run", "exports_dir"]
