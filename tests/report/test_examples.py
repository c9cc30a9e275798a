"""Wrong answers with their hops checked (tracer.report.examples)."""

from __future__ import annotations

import pytest

from tracer import report
from tracer.errors import TracerError
from tracer.kg import KG, Edge, Entity, Relation
from tracer.report.examples import _hop_list

from sample_runs import render, render_styled


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
    assert _hop_list(ep, small_kg()) == [{"src": "E0", "dst": "E1", "real": False},
                                               {"src": "E1", "dst": "E2", "real": True}]


def test_a_frontier_hop_is_real_when_every_entity_it_lists_is_reached():
    def ep(trace, bad=()):
        return {"ex_id": "q", "hop_len": 2, "correct": False, "answer_star": "A", "hallucinated_hops": list(bad),
                "parsed": {"valid_format": True, "answer": "B", "trace_text": trace, "trace_entities": [],
                           "path_entities": ["E0", "E1", "E2"]}}

    kg = small_kg()
    assert [h["real"] for h in _hop_list(ep("E0 -caused_by-> {E1} -fixed_by-> {E2}"), kg)] == [True, True]
    # E7 -fixed_by-> E2 is an edge, but E7 is not reached from E0; E3 -fixed_by-> E2 is none
    wrong = ep("E0 -caused_by-> {E1, E7} -fixed_by-> {E2}", bad=[["E0", "E7"]])
    assert [h["real"] for h in _hop_list(wrong, kg)] == [False, True]
    assert [h["real"] for h in _hop_list(wrong, None)] == [False, True]  # read from hallucinated_hops
