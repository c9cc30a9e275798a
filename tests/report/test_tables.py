"""Rich tables in the terminal, wide and narrow (tracer.report.tables)."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from tracer import report

from sample_runs import BASE, CONFIG_A, CONFIG_B, SFT_B, render, render_styled, write_run


def test_run_table(run_a):
    out = render(report.run_table(report.load_run(run_a)))
    assert "run-a" in out and "contaminated" not in out
    base_line = next(line for line in out.splitlines() if "│ base" in line)
    sft_line = next(line for line in out.splitlines() if "│ sft" in line)
    rsft_line = next(line for line in out.splitlines() if "│ rsft" in line)
    for s in ("300", "61.0% [55.4–66.4]", "72.4%", "+0.45", "100.0%", "93.4%", "87.0%", "1m 21s"):
        assert s in sft_line, s
    for s in ("25.0% [20.4–30.1]", "31.2%", "-0.87", "82.0%", "61.1%", "—", "12.4s"):
        assert s in base_line, s
    assert "pending" in rsft_line
    for header in ("Phase", "Accuracy", "Path cov.", "Avg reward", "Format", "Edge prec.", "Shuffle",
                   "Time"):
        assert header in out


def test_pending_is_dim_and_contaminated_title_red(tmp_path):
    d = write_run(tmp_path, "leaky", CONFIG_A, {"base": BASE}, contaminated=True)
    run = report.load_run(d)
    styled = render_styled(report.run_table(run))
    assert "[contaminated]" in render(report.run_table(run))
    assert "\x1b[1;31m [contaminated]" in styled  # bold red
    assert "\x1b[2;3mpending" in styled  # dim italic
    assert all(r["contaminated"] for r in report.phase_rows(run))


def test_per_hop_table(run_a):
    run = report.load_run(run_a)
    out = render(report.run_table(run, per_hop=True))
    assert "per hop length" in out
    for h in ("2-hop acc", "2-hop cov", "2-hop len", "4-hop acc", "4-hop cov", "4-hop len"):
        assert h in out
    by_length, by_position = out.split("hop recall given a correct prefix")
    sft_hop = [line for line in by_length.splitlines() if "│ sft" in line][-1]
    cells = [c.strip() for c in sft_hop.split("│")[2:-1]]
    assert cells == ["70.0% (n=150)", "80.0%", "—", "52.0% (n=150)", "64.8%", "36.7%"]  # old runs: no len
    rows = report.per_hop_rows(run)
    assert [(r["phase"], r["hop"]) for r in rows] == [("base", 2), ("base", 4), ("sft", 2), ("sft", 4)]
    assert rows[3]["length_match"] == pytest.approx(0.367) and rows[2]["length_match"] is None
    # hop recall: only phases that recorded it (base did not)
    assert "hop 1" in by_position and "hop 2" in by_position and "│ base" not in by_position
    sft_pos = [line for line in by_position.splitlines() if "│ sft" in line][0]
    assert [c.strip() for c in sft_pos.split("│")[2:-1]] == ["98.0% (300)", "90.0% (294)"]
    assert report.hop_recall_rows(run)[1] == {"phase": "sft", "hop": 2, "n": 294, "recall": 0.9, "stopped": 0.05}


def test_comparison_and_config_diff(run_a, run_b):
    runs = report.load_runs([run_a, run_b])
    rows = report.comparison_rows(runs)
    assert [r["phase"] for r in rows] == ["sft", "sft"]
    assert rows[0]["delta_base"] == pytest.approx(0.61 - 0.25)
    assert rows[1]["delta_base"] == pytest.approx(0.67 - 0.25)
    assert set(rows[1]["best"]) == {"accuracy", "delta_base", "reward", "shuffle_agreement"}
    assert set(rows[0]["best"]) == {"path_coverage", "format_rate", "edge_precision"}

    out = render(report.comparison_table(runs))
    a_line = next(line for line in out.splitlines() if "run-a" in line)
    b_line = next(line for line in out.splitlines() if "run-b" in line)
    assert "61.0% [55.4–66.4]" in a_line and "+36.0 pp" in a_line and "72.4%" in a_line
    assert "67.0% [61.5–72.0]" in b_line and "+42.0 pp" in b_line and "+0.52" in b_line and "3m 10s" in b_line
    styled = render_styled(report.comparison_table(runs))
    assert re.search(r"\x1b\[1;32m *67\.0% \[61\.5–72\.0\]", styled)  # best accuracy in bold green
    assert re.search(r"\x1b\[1;32m *72\.4%", styled)
    assert not re.search(r"\x1b\[1;32m *61\.0%", styled)

    diff = report.config_diff(runs)
    assert diff == [("rsft.temperature", [None, 0.8]), ("sft.iters", [200, 400])]
    out = render(report.config_diff_table(runs))
    assert "sft.iters" in out and "200" in out and "400" in out and "rsft.temperature" in out
    assert "sft.lr" not in out and "model.source" not in out


def test_comparison_skips_contaminated_for_best(tmp_path, run_a):
    leaky = write_run(tmp_path, "leaky", CONFIG_B, {"base": BASE, "sft": SFT_B}, contaminated=True)
    rows = report.comparison_rows(report.load_runs([run_a, leaky]))
    assert "accuracy" in rows[0]["best"] and rows[1]["best"] == []


def test_report_renderables(run_a, run_b):
    out = render(*report.report_renderables(report.load_runs([run_a, run_b]), per_hop=True))
    assert out.count("per hop length") == 2 and "Comparison" in out and "Config differences" in out


def test_tables_fit_80_columns_without_splitting_a_number(run_a, run_b):
    console = Console(record=True, width=80)
    for r in report.report_renderables(report.load_runs([run_a, run_b]), per_hop=True):
        console.print(r)
    out = console.export_text()
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    lines = out.splitlines()
    sft = next(line for line in lines if line.startswith("sft ") and "72.4%" in line)
    for s in ("300", "61.0% [55.4–66.4]", "72.4%", "+0.45", "100.0%", "93.4%", "87.0%", "1m 21s"):
        assert s in sft, s
    for header in ("Phase", "Accuracy", "Cov.", "Reward", "Format", "Edges", "Shuf.", "Time"):  # short headers
        assert header in out
    assert any("70.0% (n=150)" in line for line in lines)  # per hop length
    assert any(line.startswith("Accuracy") and "61.0% [55.4–66.4]" in line and "67.0% [61.5–72.0]" in line
               for line in lines)  # the comparison, one column per run
