"""Tests for tracer.report (pure Python; matplotlib optional)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tracer import report
from tracer.errors import TracerError
from tracer.kg import KG, Edge, Entity, Relation

CONFIG_A = """\
seed = 7

[model]
source = "tiny"

[sft]
iters = 200
lr = 1e-4

[rsft]
rounds = 1
"""

CONFIG_B = """\
seed = 7

[model]
source = "tiny"

[sft]
iters = 400
lr = 1e-4

[rsft]
rounds = 1
temperature = 0.8
"""


def phase_entry(n, correct, lo, hi, cov, reward, fmt, prec, shuf, wall, per_hop):
    return {"n": n, "accuracy": correct / n, "accuracy_ci": [lo, hi], "correct": correct,
            "path_coverage": cov, "reward": reward, "format_rate": fmt, "edge_precision": prec,
            "shuffle_agreement": shuf, "wall_s": wall, "finished_at": "2026-11-24T12:00:00+00:00",
            "per_hop": per_hop}


BASE = phase_entry(300, 75, 0.2041, 0.3009, 0.312, -0.874, 0.82, 0.611, None, 12.4, {
    "2": {"n": 150, "accuracy": 0.32, "path_coverage": 0.41, "reward": -0.5, "format_rate": 0.85, "edge_precision": 0.7},
    "4": {"n": 150, "accuracy": 0.18, "path_coverage": 0.214, "reward": -1.2, "format_rate": 0.79, "edge_precision": 0.52},
})
SFT = phase_entry(300, 183, 0.5538, 0.6636, 0.724, 0.452, 1.0, 0.934, 0.87, 81.2, {
    "2": {"n": 150, "accuracy": 0.7, "path_coverage": 0.8, "reward": 0.6, "format_rate": 1.0, "edge_precision": 0.95},
    "4": {"n": 150, "accuracy": 0.52, "path_coverage": 0.648, "reward": 0.3, "format_rate": 1.0, "edge_precision": 0.918,
          "length_match": 0.367},
})
SFT["hop_recall"] = {"1": {"n": 300, "recall": 0.98, "stopped": 0.0},
                    "2": {"n": 294, "recall": 0.9, "stopped": 0.05}}
SFT_B = phase_entry(300, 201, 0.6148, 0.7198, 0.698, 0.517, 0.99, 0.901, 0.9, 190.0, {
    "2": {"n": 150, "accuracy": 0.74, "path_coverage": 0.77, "reward": 0.7, "format_rate": 1.0, "edge_precision": 0.93},
    "4": {"n": 150, "accuracy": 0.6, "path_coverage": 0.626, "reward": 0.33, "format_rate": 0.98, "edge_precision": 0.87},
})


def episode(ex_id, hop, correct, answer, star, trace, trace_entities, path_entities, hallucinated, valid=True):
    completion = f"TRACE: {trace}\nANSWER: {answer}" if valid else f"TRACE: {trace}\nANSWER: maybe"
    return {"phase": "sft", "ex_id": ex_id, "split": "eval", "hop_len": hop, "prompt": "...",
            "completion": completion, "answer_star": star, "correct": correct,
            "parsed": {"valid_format": valid, "answer": answer if valid else None, "trace_text": trace,
                       "trace_entities": trace_entities, "path_entities": path_entities},
            "reward": {"correctness": 1.0 if correct else -1.0, "path_coverage": 0.5, "path_reward": 0.5,
                       "spam_penalty": 0.0, "total": 1.25 if correct else -0.75, "edge_precision": 1.0},
            "hallucinated_hops": hallucinated}


EPISODES = [
    episode("eval-00000", 2, True, "A", "A", "E0 -caused_by-> E1 -fixed_by-> E2",
            ["E0", "E1", "E2"], ["E0", "E1", "E2"], []),
    episode("eval-00001", 2, False, "B", "C", "E0 -caused_by-> E7 -fixed_by-> E2",
            ["E0", "E7", "E2"], ["E0", "E1", "E2"], [["E0", "E7"]]),
    episode("eval-00002", 4, True, "D", "D", "E3 -caused_by-> E4", ["E3", "E4"], ["E3", "E4", "E5", "E6", "E0"], []),
    episode("eval-00003", 4, False, None, "B", "E3 -caused_by-> E4 -b-> E10", ["E3", "E4", "E10"],
            ["E3", "E4", "E5", "E6", "E1"], [["E4", "E10"]], valid=False),
    episode("eval-00004", 2, False, "A", "D", "E1 -fixed_by-> E2", ["E1", "E2"], ["E1", "E2", "E3"], []),
]


def write_run(root: Path, name: str, config: str, entries: dict, planned=("base", "sft", "rsft"),
              contaminated=False, episodes=True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(config)
    meta = {"run_id": name, "created_at": "2026-11-24T11:00:00+00:00", "platform": "linux-x86_64",
            "versions": {"python": "3.11.7"}, "seed": 7, "phases": list(planned),
            "timings": {k: v["wall_s"] for k, v in entries.items() if "wall_s" in v}, "contaminated": contaminated}
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    (d / "metrics.json").write_text(json.dumps({"run_id": name, "contaminated": contaminated, "phases": entries}))
    if episodes:
        (d / "episodes").mkdir()
        (d / "episodes" / "sft.jsonl").write_text("\n".join(json.dumps(e) for e in EPISODES) + "\n")
    return d


@pytest.fixture
def run_a(tmp_path):
    return write_run(tmp_path, "run-a", CONFIG_A, {"base": BASE, "sft": SFT})


@pytest.fixture
def run_b(tmp_path):
    return write_run(tmp_path, "run-b", CONFIG_B, {"base": BASE, "sft": SFT_B})


def render(*renderables) -> str:
    console = Console(record=True, width=200, color_system="truecolor")
    for r in renderables:
        console.print(r)
    return console.export_text()


def render_styled(renderable) -> str:
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text(styles=True)


# -- loading / rows ---------------------------------------------------------------------------


def test_load_run(run_a):
    run = report.load_run(run_a)
    assert run["name"] == "run-a" and run["dir"] == str(run_a)
    assert run["meta"]["phases"] == ["base", "sft", "rsft"]
    assert run["config"]["sft"]["iters"] == 200
    assert set(run["metrics"]["phases"]) == {"base", "sft"}


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


# -- errors -----------------------------------------------------------------------------------


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
    assert msg.startswith(f"{run_a}/metrics.json: invalid JSON: ") and "\n" not in msg


def test_invalid_toml(run_a):
    (run_a / "config.toml").write_text("[sft\niters = ")
    with pytest.raises(TracerError, match="config.toml: invalid TOML"):
        report.load_run(run_a)


# -- rich tables ------------------------------------------------------------------------------


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


def test_duplicate_names_are_disambiguated(tmp_path):
    a = write_run(tmp_path / "x", "same", CONFIG_A, {"base": BASE})
    b = write_run(tmp_path / "y", "same", CONFIG_A, {"base": BASE})
    assert [r["name"] for r in report.load_runs([a, b])] == ["x/same", "y/same"]


# -- markdown / JSON --------------------------------------------------------------------------


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


# -- plot -------------------------------------------------------------------------------------


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


# -- examples ---------------------------------------------------------------------------------


def small_kg() -> KG:
    ents = {f"E{i}": Entity(f"E{i}", f"thing {i}", "t") for i in range(11)}
    rels = {r: Relation(r, r) for r in ("caused_by", "fixed_by")}
    edges = [Edge("E0", "caused_by", "E1"), Edge("E1", "fixed_by", "E2"), Edge("E7", "fixed_by", "E2"),
             Edge("E3", "caused_by", "E4")]
    return KG("1", "test", ents, rels, edges)


def test_wrong_examples(run_a):
    run = report.load_run(run_a)
    rows = report.wrong_examples(run, "sft", 10)
    assert [r["ex_id"] for r in rows] == ["eval-00001", "eval-00003", "eval-00004"]
    assert all(not r["correct"] for r in rows)
    assert [r["status"] for r in rows] == ["wrong", "invalid", "wrong"]
    assert rows[0]["hops"] == [{"src": "E0", "dst": "E7", "real": False}, {"src": "E7", "dst": "E2", "real": True}]
    assert [r["ex_id"] for r in report.wrong_examples(run_a, "sft", 2)] == ["eval-00001", "eval-00003"]
    assert report.wrong_examples(run, "sft", 0) == []


def test_wrong_examples_with_kg(run_a):
    rows = report.wrong_examples(report.load_run(run_a), "sft", 3, kg=small_kg())
    # E4 -b-> E10 is not an edge in the KG, E3 -caused_by-> E4 is
    assert rows[1]["hops"] == [{"src": "E3", "dst": "E4", "real": True}, {"src": "E4", "dst": "E10", "real": False}]
    assert rows[0]["labels"]["E7"] == "thing 7"


def test_wrong_examples_missing_phase(run_a):
    with pytest.raises(TracerError) as ei:
        report.wrong_examples(report.load_run(run_a), "rsft", 5)
    assert "episodes/rsft.jsonl" in str(ei.value) and "available: sft" in str(ei.value)


def test_examples_renderables(run_a):
    rows = report.wrong_examples(report.load_run(run_a), "sft", 3)
    panels = report.examples_renderables(rows)
    assert len(panels) == 3
    out = render(*panels)
    assert "eval-00001 · 2 hops · wrong" in out and "eval-00003 · 4 hops · invalid" in out
    assert "answer: B" in out and "gold: C (E2)" in out
    assert "gold path: E0 → E1 → E2" in out
    assert "hallucinated hops: E0 → E7" in out
    assert "TRACE: E0 -caused_by-> E7 -fixed_by-> E2" in out
    styled = render_styled(panels[0])
    assert "\x1b[1;31m -caused_by-> E7" in styled  # hallucinated hop in red
    assert "\x1b[32m -fixed_by-> E2" in styled  # real KG edge in green


def test_examples_check_the_written_relation(tmp_path):
    ep = {"ex_id": "q", "hop_len": 2, "correct": False, "answer_star": "A",
          "parsed": {"valid_format": True, "answer": "B", "trace_text": "E0 -fixed_by-> E1 -fixed_by-> E2",
                     "trace_entities": ["E0", "E1", "E2"], "path_entities": ["E0", "E1", "E2"]}}
    # E0 -> E1 is an edge under caused_by, not fixed_by
    assert report._hop_list(ep, small_kg()) == [{"src": "E0", "dst": "E1", "real": False},
                                               {"src": "E1", "dst": "E2", "real": True}]


def test_episodes_that_are_not_utf8_are_one_error(run_a):
    path = Path(run_a) / "episodes" / "sft.jsonl"
    path.write_bytes(path.read_bytes() + b'{"ex_id": "\xff"}\n')
    lines = path.read_bytes().count(b"\n")
    with pytest.raises(TracerError, match=rf"sft.jsonl:{lines}: not UTF-8 text"):
        report.wrong_examples(report.load_run(run_a), "sft", 5)
    (Path(run_a) / "metrics.json").write_bytes(b'{"phases": {"\xff": 1}}')
    with pytest.raises(TracerError, match="metrics.json: not UTF-8 text"):
        report.load_run(run_a)


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
