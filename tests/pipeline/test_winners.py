"""RSFT winners: which samples win, and the rows that consolidation trains on."""

import json

import pytest

from tracer.errors import TracerError
from tracer.pipeline.consolidate import consolidation_rows
from tracer.pipeline.rsft import read_partial, round_questions, select_winners, winner_rows


def _row(qid: str, hop_len: int, prompt: str = "", answer: str = "A") -> dict:
    return {"id": qid, "hop_len": hop_len, "path_star": {"entities": [qid, "end"]}, "prompt": prompt or f"q {qid}", "answer_star": answer,
            "ref": {"trace": "TRACE: gold\nANSWER: " + answer}}


def _sample(qid: str, rnd: int, kept: bool, completion: str, prompt: str = "", correct: bool = True) -> dict:
    return {"ex_id": qid, "round": rnd, "kept": kept, "completion": completion, "prompt": prompt or f"q {qid}",
            "correct": correct}


def test_last_round_winners_plus_short_training_questions():
    pool = [_row("p1", 4), _row("p2", 5), _row("p3", 4)]
    train = [_row("t1", 1), _row("t2", 2), _row("t3", 1), _row("t4", 3), _row("cf1", 3)]
    for r in train:
        r["meta"] = {"counterfactual": r["id"].startswith("cf")}
    samples = [
        _sample("p1", 1, True, "TRACE: r1\nANSWER: A"),
        _sample("p2", 2, True, "TRACE: x -r-> y\nANSWER: A\nthen some rambling"),
        _sample("p3", 2, False, "TRACE: lost\nANSWER: B"),
        _sample("p1", 2, True, "TRACE: a -r-> b\nANSWER: A"),
    ]
    parts = consolidation_rows(samples, pool, train, hops=[1])
    assert parts["round"] == 2
    # round 2's kept samples only, cut at their ANSWER line, on the pool's rows
    assert [(r["id"], r["ref"]["trace"]) for r in parts["winners"]] == [
        ("p2", "TRACE: x -r-> y\nANSWER: A"), ("p1", "TRACE: a -r-> b\nANSWER: A")]
    # short questions, and renamed ones of any length
    assert [r["id"] for r in parts["facts"]] == ["t1", "t3", "cf1"]
    assert [r["id"] for r in consolidation_rows(samples, pool, train, hops=[1, 3])["facts"]] == ["t1", "t3", "t4", "cf1"]
    assert consolidation_rows([s | {"kept": False} for s in samples], pool, train, [1])["round"] is None


def test_winner_traces_are_cut_where_the_parser_reads():
    from tracer.format import answer_span, parse_completion
    from tracer.reward import EntityMatcher

    m = EntityMatcher(["x", "y"])
    for text in ["TRACE: x -r-> y\nanswer: D\nANSWER: D",  # a lower-case line is part of the trace
                 "Answer: the dashboards.\nTRACE: x -r-> y\nANSWER: D\nmore",  # a preamble is dropped
                 "  TRACE: x -r-> y\n  ANSWER: D.\nANSWER: B"]:
        span = answer_span(text)
        assert span.startswith("TRACE:") and span.splitlines()[-1].strip().startswith("ANSWER: D")
        assert parse_completion(span, m) == parse_completion(text, m) and parse_completion(span, m).valid_format
    rows = winner_rows([_sample("p1", 1, True, "Answer: D\nTRACE: x -r-> y\nANSWER: A")], {"p1": _row("p1", 4)})
    assert rows[0]["ref"]["trace"] == "TRACE: x -r-> y\nANSWER: A"


def test_winners_drawn_under_another_prompt_take_the_rows_letter():
    # the same question with facts in the prompt: its options were drawn anew, the answer is now C
    pool = [_row("p1", 4, prompt="Facts: ... q p1", answer="C")]
    rows = winner_rows([_sample("p1", 1, True, "TRACE: a -r-> b\nANSWER: A")], {"p1": pool[0]})
    assert rows[0]["ref"]["trace"] == "TRACE: a -r-> b\nANSWER: C" and rows[0]["prompt"] == "Facts: ... q p1"
    with pytest.raises(TracerError, match="not correct"):
        winner_rows([_sample("p1", 1, True, "TRACE: a\nANSWER: A", correct=False)], {"p1": pool[0]})
    with pytest.raises(TracerError, match="not in the RSFT pool"):
        winner_rows([_sample("zz", 1, True, "TRACE: a\nANSWER: A")], {"p1": pool[0]})
    # the same id in another pool is another question: refused, not trained under this row's prompt
    other = _sample("p1", 1, True, "TRACE: a -r-> b\nANSWER: A") | {"parsed": {"path_entities": ["p9", "end"]}}
    with pytest.raises(TracerError, match="another RSFT pool"):
        winner_rows([other], {"p1": pool[0]})
    same = other | {"parsed": {"path_entities": ["p1", "end"]}}
    assert winner_rows([same], {"p1": pool[0]})[0]["ref"]["trace"].endswith("ANSWER: C")


def test_a_tagged_winner_is_learned_with_the_tag_of_its_answer():
    row = _row("p1", 4, answer="C")
    # the tag disagrees with the (correct) answer: it is learned as the answer's
    rows = winner_rows([_sample("p1", 1, True, "TRACE: a -r-> b (A)\nANSWER: C.")], {"p1": row})
    assert rows[0]["ref"]["trace"] == "TRACE: a -r-> b (C)\nANSWER: C"
    other = _row("p1", 4, prompt="Facts: ... q p1", answer="B")  # drawn under another prompt
    rows = winner_rows([_sample("p1", 1, True, "TRACE: a -r-> {b (C), d}\nANSWER: C")], {"p1": other})
    assert rows[0]["ref"]["trace"] == "TRACE: a -r-> {b (B), d}\nANSWER: B"
    # two tagged entities: which one is the answer's is not known, so both stay as written
    rows = winner_rows([_sample("p1", 1, True, "TRACE: a -r-> {b (C), d (A)}\nANSWER: C")], {"p1": row})
    assert rows[0]["ref"]["trace"] == "TRACE: a -r-> {b (C), d (A)}\nANSWER: C"


def test_winner_ties_go_to_the_trace_with_real_edges():
    def scored(sample, total, edge_precision, completion, correct=True):
        return {"ex_id": "q", "sample": sample, "correct": correct, "completion": completion,
                "parsed": {"valid_format": True}, "reward": {"total": total, "edge_precision": edge_precision}}

    detour = scored(0, 1.5, 0.6, "TRACE: a -r-> x -r-> b\nANSWER: A")
    clean = scored(1, 1.5, 1.0, "TRACE: a -r-> b\nANSWER: A")
    assert select_winners([detour, clean], keep_top=1, min_reward=1.5) == [clean]
    # reward still comes first, and a wrong answer never wins
    better = scored(2, 1.6, 0.5, "TRACE: a -r-> y\nANSWER: A")
    assert select_winners([detour, clean, better], keep_top=1, min_reward=1.5) == [better]
    assert select_winners([scored(0, 2.0, 1.0, "x", correct=False)], keep_top=1, min_reward=0) == []


def test_rounds_rotate_through_the_pool():
    pool = [{"id": f"p{i}"} for i in range(10)]
    ids = lambda rows: [q["id"] for q in rows]  # noqa: E731
    assert ids(round_questions(pool, 4, 1, rotate=True)) == ["p0", "p1", "p2", "p3"]
    assert ids(round_questions(pool, 4, 2, rotate=True)) == ["p4", "p5", "p6", "p7"]
    assert ids(round_questions(pool, 4, 3, rotate=True)) == ["p8", "p9", "p0", "p1"]  # wraps
    assert ids(round_questions(pool, 4, 3, rotate=False)) == ["p0", "p1", "p2", "p3"]
    assert round_questions(pool, 0, 2, rotate=True) == pool
    assert round_questions(pool, 12, 2, rotate=True) == pool


def test_partial_samples_drop_a_cut_line_and_keep_the_latest_draw(tmp_path):
    rows = [{"ex_id": "q1", "sample": 0, "round": 2, "completion": "old"},
            {"ex_id": "q1", "sample": 1, "round": 2, "completion": "b"},
            {"ex_id": "q9", "sample": 0, "round": 1, "completion": "another round"},
            {"ex_id": "q1", "sample": 0, "round": 2, "completion": "new"}]  # the chunk drawn again
    path = tmp_path / "rsft_r2_samples.partial.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"ex_id": "q2", "sam')  # killed mid-line
    have = read_partial(path, 2)
    assert set(have) == {"q1"} and sorted(have["q1"]) == [0, 1]
    assert have["q1"][0]["completion"] == "new"
    assert read_partial(tmp_path / "missing.jsonl", 2) == {}
