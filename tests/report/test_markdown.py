"""The report as markdown (tracer.report.markdown)."""

from __future__ import annotations

from tracer import report


def test_to_markdown(run_a, run_b):
    md = report.to_markdown(report.load_runs([run_a, run_b]), per_hop=True)
    assert "## run-a" in md and "## run-b" in md
    assert "| sft | 300 | 61.0% [55.4–66.4] | 72.4% | +0.45 | 100.0% | 93.4% | 87.0% | 1m 21s |" in md
    assert "| rsft | _pending_ |" in md
    assert "**67.0% [61.5–72.0]**" in md and "**72.4%**" in md
    assert "| sft.iters | 200 | 400 |" in md
    assert "| rsft.temperature | — | 0.8 |" in md
    assert "| sft | 70.0% (n=150) | 80.0% | — | 52.0% (n=150) | 64.8% | 36.7% |" in md
    assert "| sft | 98.0% (300) | 90.0% (294) |" in md
    single = report.to_markdown([report.load_run(run_a)])
    assert "Comparison" not in single and "**" not in single
