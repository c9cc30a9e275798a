"""Fixtures of the report tests: two run directories with the same phases and different configs."""

from __future__ import annotations

import pytest

from sample_runs import BASE, CONFIG_A, CONFIG_B, SFT, SFT_B, write_run


@pytest.fixture
def run_a(tmp_path):
    return write_run(tmp_path, "run-a", CONFIG_A, {"base": BASE, "sft": SFT})


@pytest.fixture
def run_b(tmp_path):
    return write_run(tmp_path, "run-b", CONFIG_B, {"base": BASE, "sft": SFT_B})
