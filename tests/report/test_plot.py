"""PNG plots, matplotlib optional (tracer.report.plot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tracer import report
from tracer.errors import TracerError


def test_plot_writes_png(tmp_path, run_a, run_b):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = report.plot(report.load_runs([run_a, run_b]), tmp_path / "plots" / "report.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300


def test_plot_without_matplotlib(tmp_path, run_a, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TracerError, match=r"plotting needs matplotlib: pip install 'tracer\[plot\]'"):
        report.plot([report.load_run(run_a)], tmp_path / "x.png")


def test_plot_draws_the_grpo_step_log(tmp_path, run_a):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    plain = matplotlib.image.imread(report.plot([report.load_run(run_a)], tmp_path / "plain.png"))
    log = Path(run_a) / "models" / "grpo" / "grpo_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": i, "reward_mean": -1 + i / 5, "reward_std": 0.5, "accuracy": i / 10,
                                       "format_rate": 0.9, "kl": None if i == 1 else 0.01 * i, "clip_frac": 0.0}) + "\n"
                           for i in range(1, 6)))
    assert [r["step"] for r in report.grpo_log(report.load_run(run_a))] == [1, 2, 3, 4, 5]
    img = matplotlib.image.imread(report.plot([report.load_run(run_a)], tmp_path / "grpo.png"))
    assert img.shape[0] > 1.5 * plain.shape[0]  # a second row of panels: the GRPO steps
