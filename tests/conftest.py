"""Shared fixtures: an isolated studio home per test, family configs, the real 135M model."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"
CONFIGS = ASSETS / "configs"


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch) -> Path:
    """Every test works in its own PEFT_STUDIO_HOME: nothing touches the real projects/."""
    home = tmp_path / "studio-home"
    home.mkdir()
    monkeypatch.setenv("PEFT_STUDIO_HOME", str(home))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded model converted once per test session (about 20 s)."""
    from studio.models import convert_gguf, embedded_gguf_path

    dest = tmp_path_factory.mktemp("smollm2") / "model"
    return convert_gguf(embedded_gguf_path(), dest)
