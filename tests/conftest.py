"""Set up the backend (OpenBLAS, heap) before any test module imports MLX, as the CLI does; shared fixtures."""

import shutil
from pathlib import Path

import pytest

from tracer import backend

backend.setup()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_work(tmp_path, monkeypatch):
    """A scratch directory with the tiny KG and a tiny config whose caches stay inside it."""
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "tiny_kg.json", tmp_path / "data" / "tiny_kg.json")
    text = (ROOT / "configs" / "tiny.toml").read_text()
    text = text.replace('path = "tiny"', f'path = "tiny"\ncache_dir = "{tmp_path / "cache"}"')
    (tmp_path / "tiny.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path
