"""Reading run directories (tracer.report.load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracer import report
from tracer.errors import TracerError

from sample_runs import BASE, CONFIG_A, write_run


def test_load_run(run_a):
    run = report.load_run(run_a)
    assert run["name"] == "run-a" and run["dir"] == str(run_a)
    assert run["meta"]["phases"] == ["base", "sft", "rsft"]
    assert run["config"]["sft"]["iters"] == 200
    assert set(run["metrics"]["phases"]) == {"base", "sft"}


def test_missing_dir(tmp_path):
    with pytest.raises(TracerError, match="no such run directory"):
        report.load_run(tmp_path / "nope")


def test_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_text(CONFIG_A)
    with pytest.raises(TracerError, match=r"not a tracer run \(no meta.json or metrics.json\)"):
        report.load_run(tmp_path / "empty")


def test_invalid_json(run_a):
    (run_a / "metrics.json").write_text('{"phases": {')
    with pytest.raises(TracerError) as ei:
        report.load_run(run_a)
    msg = str(ei.value)
    assert msg.startswith(f"{run_a}/metrics.json: invalid JSON at line ") and "\n" not in msg


def test_invalid_toml(run_a):
    (run_a / "config.toml").write_text("[sft\niters = ")
    with pytest.raises(TracerError, match="config.toml: invalid TOML"):
        report.load_run(run_a)


def test_duplicate_names_are_disambiguated(tmp_path):
    a = write_run(tmp_path / "x", "same", CONFIG_A, {"base": BASE})
    b = write_run(tmp_path / "y", "same", CONFIG_A, {"base": BASE})
    assert [r["name"] for r in report.load_runs([a, b])] == ["x/same", "y/same"]


def test_episodes_that_are_not_utf8_are_one_error(run_a):
    path = Path(run_a) / "episodes" / "sft.jsonl"
    path.write_bytes(path.read_bytes() + b'{"ex_id": "\xff"}\n')
    lines = path.read_bytes().count(b"\n")
    with pytest.raises(TracerError, match=rf"sft.jsonl:{lines}: not UTF-8 text"):
        report.wrong_examples(report.load_run(run_a), "sft", 5)
    (Path(run_a) / "metrics.json").write_bytes(b'{"phases": {"\xff": 1}}')
    with pytest.raises(TracerError, match="metrics.json: not UTF-8 text"):
        report.load_run(run_a)
