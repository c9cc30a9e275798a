"""A run's metrics as rows, compared, paired, as JSON (tracer.report.rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracer import report

from sample_runs import BASE, CONFIG_A, EPISODES, SFT, render, write_run


def test_phase_rows(run_a):
    rows = report.phase_rows(report.load_run(run_a))
    assert [r["phase"] for r in rows] == ["base", "sft", "rsft"]
    assert [r["status"] for r in rows] == ["done", "done", "pending"]
    assert set(rows[0]) == set(report.ROW_KEYS)
    sft = rows[1]
    assert sft["n"] == 300 and sft["accuracy"] == pytest.approx(0.61)
    assert (sft["ci_lo"], sft["ci_hi"]) == (0.5538, 0.6636)
    assert sft["reward"] == 0.452 and sft["wall_s"] == 81.2 and sft["shuffle_agreement"] == 0.87
    assert rows[0]["shuffle_agreement"] is None
    assert rows[2]["accuracy"] is None and rows[2]["contaminated"] is False


def test_phase_order_extra_phases_and_wall_from_timings(tmp_path):
    extra = dict(SFT)
    del extra["wall_s"]
    d = write_run(tmp_path, "r", CONFIG_A, {"base": BASE, "continue": extra, "sft": SFT}, planned=("base", "sft"))
    meta = json.loads((d / "meta.json").read_text())
    meta["timings"]["continue"] = 3725.0
    (d / "meta.json").write_text(json.dumps(meta))
    rows = report.phase_rows(report.load_run(d))
    assert [r["phase"] for r in rows] == ["base", "sft", "continue"]
    assert rows[2]["wall_s"] == 3725.0
    assert "1h 02m" in render(report.run_table(report.load_run(d)))


def test_meta_only_run_is_all_pending(tmp_path):
    d = tmp_path / "fresh"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"run_id": "fresh", "phases": ["base", "sft"], "contaminated": False}))
    run = report.load_run(d)
    assert [r["status"] for r in report.phase_rows(run)] == ["pending", "pending"]
    out = render(report.run_table(run))
    assert out.count("pending") == 2
    assert report.config_diff([run, run]) == []


def test_paired_test_between_runs(run_a, run_b):
    path = Path(run_b) / "episodes" / "sft.jsonl"
    eps = [dict(e) for e in EPISODES]
    eps[1]["correct"], eps[3]["correct"], eps[4]["correct"], eps[0]["correct"] = True, True, True, False
    path.write_text("\n".join(json.dumps(e) for e in eps) + "\n")  # run-b fixes 3, breaks 1
    runs = [report.load_run(run_a), report.load_run(run_b)]
    (row,) = report.paired_rows(runs)
    assert (row["n"], row["fixed"], row["broken"]) == (5, 3, 1) and row["vs"] == "run-a/sft"
    assert row["p"] == pytest.approx(2 * (1 + 4) / 16)
    out = render(*report.report_renderables(runs))
    assert "Paired test vs run-a/sft" in out and "0.625" in out
    assert "| run-b | sft | 5 | 3 | 1 | 0.625 |" in report.to_markdown(runs)
    assert report.to_json(runs)["paired"][0]["fixed"] == 3
    assert report.paired_rows([runs[0]]) == []


def test_to_json_round_trips(run_a, run_b):
    data = report.to_json(report.load_runs([run_a, run_b]))
    assert json.loads(json.dumps(data)) == data
    a = data["runs"][0]
    assert a["name"] == "run-a" and a["phases"] == ["base", "sft", "rsft"]
    assert a["rows"][1]["accuracy"] == pytest.approx(0.61) and a["rows"][2]["status"] == "pending"
    assert len(a["per_hop"]) == 4 and [r["hop"] for r in a["hop_recall"]] == [1, 2]
    assert data["config_diff"] == [{"key": "rsft.temperature", "values": {"run-a": None, "run-b": 0.8}},
                                   {"key": "sft.iters", "values": {"run-a": 200, "run-b": 400}}]
    assert data["comparison"][1]["best"]
