"""The liger-kernel switch (``studio.worker.kernels``) refuses, with the reason, every case in
which it could not do what the run asked for, instead of training without it."""

from __future__ import annotations

import importlib.util

import pytest

from studio.worker.kernels import KernelError, liger_patcher


def test_liger_on_a_cpu_is_refused_with_the_way_out():
    with pytest.raises(KernelError, match=r"needs a CUDA GPU.*CPU: turn liger_kernel off"):
        liger_patcher("llama", "cpu")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_without_the_package_names_the_install_command():
    with pytest.raises(KernelError, match=r"not installed.*peft-studio\[cuda\]"):
        liger_patcher("llama", "cuda")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_liger_for_a_family_it_does_not_know_is_refused():
    with pytest.raises(KernelError, match=r"no kernels for model type 'gpt2'"):
        liger_patcher("gpt2", "cuda")
    assert callable(liger_patcher("llama", "cuda"))


def test_a_cpu_run_asking_for_liger_fails_before_loading_the_model(tiny_chat_model, monkeypatch):
    """The worker's model build refuses at once (not after loading, not by training without it)."""
    from studio import models
    from studio.runspec import RunSpec
    from studio.worker.prepare import Compute, build_model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(models, "load_model", no_load)
    spec = RunSpec(model=str(tiny_chat_model), sample_task="dates", liger_kernel=True)
    with pytest.raises(KernelError, match="needs a CUDA GPU"):
        build_model(spec, Compute("cpu", "float32", False, False))
