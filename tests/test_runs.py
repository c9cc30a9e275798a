"""Run-directory helpers: atomic writes keep ordinary file modes, names stay one path component."""

import os
import stat

import pytest

from tracer import runs
from tracer.errors import TracerError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_respect_the_umask(tmp_path, umask_022):
    runs.write_text_atomic(tmp_path / "new.txt", "x")
    assert mode(tmp_path / "new.txt") == 0o644  # as open() would make it, not mkstemp's 0600
    os.umask(0o077)
    runs.write_json(tmp_path / "private.json", {})
    assert mode(tmp_path / "private.json") == 0o600


def test_rewriting_a_file_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "shared.json"
    path.write_text("{}")
    os.chmod(path, 0o664)
    runs.write_json(path, {"a": 1})
    assert mode(path) == 0o664 and path.read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]  # no temp file left


@pytest.mark.parametrize("name", ["", ".", "..", "../../evil", "a/b", "a\\b", "/abs"])
def test_names_are_one_path_component(name):
    with pytest.raises(TracerError, match="--phase: expected a name"):
        runs.check_name(name, "--phase")


def test_ordinary_names_pass():
    assert runs.check_name("rsft_r2", "--phase") == "rsft_r2"
