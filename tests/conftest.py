"""Set up the backend (OpenBLAS, heap) before any test module imports MLX, as the CLI does; shared fixtures."""

import shutil
from pathlib import Path

import pytest

from tracer import backend

backend.setup()

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_MODEL_PATH = 'path = "tiny-model"'  # fixtures/tiny.toml's model.path, a stand-in for the built model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random llama of fixtures/tiny.toml, built once per session (tests/tiny_model.py)."""
    from tiny_model import build_for_config

    from tracer.config import load_config, override

    work = tmp_path_factory.mktemp("tiny_model")
    cfg = override(load_config(FIXTURES / "tiny.toml"), data__kg=str(FIXTURES / "tiny_kg.json"),
                   data__out_dir=str(work / "data"))
    return build_for_config(cfg, work / "model")


@pytest.fixture
def tiny_work(tmp_path, monkeypatch, tiny_model):
    """A scratch directory with the tiny KG and a tiny config on the tiny model, its caches inside it."""
    (tmp_path / "data").mkdir()
    shutil.copy(FIXTURES / "tiny_kg.json", tmp_path / "data" / "tiny_kg.json")
    text = (FIXTURES / "tiny.toml").read_text()
    assert TINY_MODEL_PATH in text
    text = text.replace(TINY_MODEL_PATH, f'path = "{tiny_model}"\ncache_dir = "{tmp_path / "cache"}"')
    (tmp_path / "tiny.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_blas_thread():
    """Tiny matmuls gain nothing from BLAS threads, and OpenBLAS's spinning threads slow these tests
    when other processes share the cores; restore the thread count afterwards (use it with
    ``pytestmark = pytest.mark.usefixtures("one_blas_thread")``)."""
    import ctypes

    from tracer.blas import blas_info

    path = blas_info()["openblas"]
    lib = ctypes.CDLL(path) if path else None
    if lib is None or not hasattr(lib, "openblas_set_num_threads"):
        yield
        return
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(1)
    yield
    lib.openblas_set_num_threads(before)
