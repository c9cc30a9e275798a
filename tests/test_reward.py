"""Tests for tracer.reward (pure Python; a tiny KG stand-in is used)."""

from __future__ import annotations

import pytest

from tracer.config import RewardConfig
from tracer.kg import KG, Edge, Entity, Relation
from tracer.reward import EntityMatcher, episode, parse_completion, score


def graph(triples):
    names = {x for s, _, d in triples for x in (s, d)} | {"DiskFull", "DiskFullError", "Other", "Noise"}
    return KG("1.0", "test", {n: Entity(n, n, "t") for n in sorted(names)},
              {r: Relation(r, r) for r in sorted({r for _, r, _ in triples})}, [Edge(*t) for t in triples])


KG_ = graph([("E0", "a", "E1"), ("E1", "b", "E2"), ("E2", "c", "E3")])
M = EntityMatcher(KG_.entities)
CFG = RewardConfig()
EX = {
    "id": "eval-00001", "split": "eval", "hop_len": 3, "prompt": "Q?",
    "options": {"A": "E3", "B": "Other", "C": "Noise", "D": "DiskFull"},
    "answer_star": "A",
    "path_star": {"entities": ["E0", "E1", "E2", "E3"],
                  "edges": [{"src": "E0", "rel": "a", "dst": "E1"}, {"src": "E1", "rel": "b", "dst": "E2"},
                            {"src": "E2", "rel": "c", "dst": "E3"}]},
}


def run(text, cfg=CFG):
    return score(text, EX, M, KG_, cfg)


def test_correct_with_path_is_positive_bonus():
    r = run("TRACE: E0 -a-> E1\nANSWER: A")
    assert r["valid_format"] and r["correct"]
    assert r["hits"] == 2
    assert r["path_coverage"] == pytest.approx(0.5)
    assert r["path_reward"] == pytest.approx(0.5)
    assert r["total"] == pytest.approx(1.25)
    assert r["total"] > 1.0


def test_full_path_reward():
    r = run("TRACE: E0 -a-> E1 -b-> E2 -c-> E3\nANSWER: A")
    assert r["path_coverage"] == 1.0
    assert r["total"] == pytest.approx(1.5)
    assert r["edge_precision"] == 1.0
    assert r["hallucinated_hops"] == []


@pytest.mark.parametrize("trace", ["E0", "Other -x-> Noise", "something", "E0 E1 E2 E3",
                                   "E1 -b-> E2 -c-> E3"])
def test_correct_with_no_chain_from_the_start_is_exactly_one(trace):
    # entities named without the chain's arrows, or a chain that skips the start, earn no path credit
    r = run(f"TRACE: {trace}\nANSWER: A")
    assert r["correct"]
    assert r["path_reward"] == 0.0
    assert r["total"] == 1.0


# --- many-to-many: judged against the graph, not one reference path ----------------------------

# S -r-> {A, B}; A -s-> {T, X}; B -s-> {T}; X is a dead end of the right relation; S -q-> C -s-> T
M2M = graph([("S", "r", "A"), ("S", "r", "B"), ("A", "s", "T"), ("A", "s", "X"), ("B", "s", "T"),
             ("S", "q", "C"), ("C", "s", "T"), ("B", "s", "Y")])
M2M_EX = {"id": "q", "hop_len": 2, "answer_star": "A", "options": {"A": "T", "B": "Other", "C": "Noise", "D": "Y2"},
          "path_star": {"entities": ["S", "A", "T"], "edges": [{"src": "S", "rel": "r", "dst": "A"},
                                                             {"src": "A", "rel": "s", "dst": "T"}]}}
M2M_M = EntityMatcher(M2M.entities)


def m2m(trace):
    return score(f"TRACE: {trace}\nANSWER: A", M2M_EX, M2M_M, M2M, CFG)


def test_another_valid_branch_gets_full_path_credit():
    ref, alt = m2m("S -r-> A -s-> T"), m2m("S -r-> B -s-> T")  # the reference path, and the other branch
    for r in (ref, alt):
        assert r["hits"] == 3 and r["path_coverage"] == 1.0 and r["total"] == pytest.approx(1.5)
        assert r["edge_precision"] == 1.0


@pytest.mark.parametrize("trace, hits, walked", [
    ("S -r-> A -s-> X", 2, 3),        # real edges, but the last one leaves the answer behind
    ("S -r-> B -s-> Y", 2, 3),        # the same on the other branch
    ("S -q-> C -s-> T", 1, 1),        # reaches the answer through another relation chain
    ("S -r-> C -s-> T", 1, 1),        # S -r-> C is no edge: the chain breaks at once
    ("S -r-> Made_Up -s-> T", 1, 1),  # a hallucinated middle
    ("S -> A -> T", 1, 1),            # bare arrows name no relation
    ("A -s-> T", 0, 0),               # does not start at the question's start
])
def test_a_path_that_breaks_the_chain_gets_no_credit_past_the_break(trace, hits, walked):
    r = m2m(trace)
    assert r["hits"] == hits and r["path_coverage"] == pytest.approx(hits / 3) and r["walked"] == walked
    assert r["path_reward"] == (pytest.approx(hits / 3) if hits >= CFG.min_hits else 0.0)


def test_edge_precision_checks_the_relation_and_both_endpoints():
    assert m2m("S -r-> B -s-> T")["edge_precision"] == 1.0
    r = m2m("S -q-> A -s-> T")  # S -> A is an edge, but under r, not q
    assert r["edge_precision"] == pytest.approx(0.5) and r["hallucinated_hops"] == [["S", "A"]]
    assert m2m("S -> A -> T")["edge_precision"] == 0.0


# --- frontier traces: every entity each hop reaches -------------------------------------------


@pytest.mark.parametrize("trace, hits, walked, precision", [
    ("S -r-> {A, B} -s-> {T, X, Y}", 3, 3, 1.0),   # the exact frontiers
    ("S -r-> {B} -s-> {T}", 3, 3, 1.0),            # a subset that still holds a path to the answer
    ("S -r-> {A, B, C} -s-> {T}", 3, 3, 0.75),     # C is listed though S -r-> C is no edge
    ("S -r-> {A} -s-> {X}", 2, 3, 1.0),            # real edges that leave the answer behind
    ("S -r-> {B} -s-> {X}", 2, 2, 0.5),            # B -s-> X is no edge: the walk stops at B
    ("S -r-> {C} -s-> {T}", 1, 1, 0.5),            # the chain breaks at once
    ("S -r-> {} -s-> {T}", 1, 1, 0.0),             # an empty frontier reaches nothing
])
def test_a_frontier_trace_is_judged_entity_by_entity(trace, hits, walked, precision):
    r = m2m(trace)
    assert (r["hits"], r["walked"]) == (hits, walked)
    assert r["edge_precision"] == pytest.approx(precision)


def test_a_frontier_names_its_wrong_entities_as_hallucinated_hops():
    r = m2m("S -r-> {A, B, C} -s-> {T, Z}")
    assert r["hallucinated_hops"] == [["S", "C"], ["{A, B, C}", "Z"]]


def test_a_frontier_trace_may_repeat_an_entity_across_hops_but_not_within_one():
    # S -r-> {A, B} -s-> {T} -s-> ... : T may come back in a later frontier; listed twice in one it is spam
    ok = m2m("S -r-> {A, B} -s-> {T, X, Y}")
    assert ok["spam_penalty"] == 0.0
    assert m2m("S -r-> {A, B, A} -s-> {T}")["spam_penalty"] == CFG.spam_penalty
    assert m2m("S -r-> {A, B} -s-> {T} -s-> {T}")["spam_penalty"] == CFG.spam_penalty  # more hops than the chain


def test_wrong_with_all_path_entities_is_negative():
    r = run("TRACE: E0 -a-> E1 -b-> E2 -c-> E3\nANSWER: B")
    assert not r["correct"]
    assert r["correctness"] == -2.0
    assert r["path_coverage"] == 1.0
    assert r["total"] == pytest.approx(-1.5)
    assert r["total"] < 0


def test_spam_penalty():
    r = run("TRACE: E0 -a-> E1 -b-> E2, see E1 E1 E1\nANSWER: A")  # the last node is not E2 alone
    assert r["spam_penalty"] == 0.5
    assert r["total"] == pytest.approx(1.0 + 0.5 * 0.5 - 0.5)
    ok = run("TRACE: E0 E1 E1 E2\nANSWER: A")  # twice is allowed (repeat_max = 2)
    assert ok["spam_penalty"] == 0.0


def test_missing_answer_line_invalid():
    r = run("TRACE: E0 -a-> E1 -b-> E2")
    assert r["valid_format"] is False
    assert r["total"] == -2.0
    assert r["correctness"] == 0.0
    assert r["correct"] is False
    assert r["path_coverage"] == pytest.approx(0.75)  # diagnostics still computed


@pytest.mark.parametrize("text", [
    "TRACE: E0 E1\nANSWER: E",
    "TRACE: E0 E1\nANSWER: AB",
    "TRACE:\nANSWER: A",
    "TRACE:   \nANSWER: A",
    "E0 E1\nANSWER: A",
    "ANSWER: A\nTRACE: E0 E1",
    "TRACE: E0 E1 ANSWER: A",
    "",
])
def test_invalid_formats(text):
    r = run(text)
    assert r["valid_format"] is False
    assert r["total"] == CFG.invalid
    assert r["correct"] is False


def test_tolerant_answer_line_and_trailing_text():
    r = run("Let me think.\n  TRACE: E0 -a-> E1\n  ANSWER:  A.  \nANSWER: B\nE2 E3 E3 E3")
    assert r["valid_format"] and r["answer"] == "A" and r["correct"]
    assert r["trace_entities"] == ["E0", "E1"]
    assert r["spam_penalty"] == 0.0


def test_multiline_trace_between_markers():
    p = parse_completion("TRACE: E0 -a-> E1\n-b-> E2\nANSWER: C\nE3", M)
    assert p.valid_format and p.answer == "C"
    assert p.trace_text == "E0 -a-> E1\n-b-> E2"
    assert p.trace_entities == ["E0", "E1", "E2"]


def test_crlf_line_endings():
    p = parse_completion("TRACE: E0 -a-> E1\r\nANSWER: D\r\n", M)
    assert p.valid_format and p.answer == "D"


def test_longest_match_first():
    m = EntityMatcher(["DiskFull", "DiskFullError", "Disk"])
    assert m.find("DiskFullError then DiskFull then Disk") == ["DiskFullError", "DiskFull", "Disk"]


def test_word_boundaries():
    m = EntityMatcher(["DiskFull"])
    assert m.find("XDiskFull DiskFullX DiskFull_ a_DiskFull 1DiskFull") == []
    assert m.find("(DiskFull), -x->DiskFull.") == ["DiskFull", "DiskFull"]


def test_matcher_order_and_repeats_and_empty():
    assert M.find("E2 E0 E2") == ["E2", "E0", "E2"]
    assert EntityMatcher([]).find("E0") == []


def test_edge_precision_with_hallucinated_hop():
    r = run("TRACE: E0 -a-> E1 -b-> E3 -c-> E3\nANSWER: A")
    # hops as written: E0->E1 ok, E1->E3 not an edge, E3->E3 (a repeat) not an edge either
    assert r["edge_precision"] == pytest.approx(1 / 3)
    assert r["hallucinated_hops"] == [["E1", "E3"], ["E3", "E3"]]


def test_edge_precision_counts_hops_to_names_that_are_no_entity():
    # E0 -> E1 is a KG edge, but the trace never wrote it: both written hops go through a made-up name
    r = run("TRACE: E0 -a-> NotAnEntity -b-> E1\nANSWER: A")
    assert r["edge_precision"] == 0.0
    assert r["hallucinated_hops"] == [["E0", "NotAnEntity"], ["NotAnEntity", "E1"]]
    assert r["trace_entities"] == ["E0", "E1"]  # coverage still reads the entities it names
    r = run("TRACE: `E0` -a-> E1.\nANSWER: A")  # quotes and a trailing period are not part of a name
    assert r["edge_precision"] == 1.0 and r["hallucinated_hops"] == []


def test_edge_precision_direction_and_no_pairs():
    r = run("TRACE: E1 -> E0\nANSWER: A")
    assert r["edge_precision"] == 0.0
    assert r["hallucinated_hops"] == [["E1", "E0"]]
    assert run("TRACE: E0\nANSWER: A")["edge_precision"] == 0.0


def test_renamed_question_hops_are_checked_against_its_facts():
    # the prompt states E2 -> E0 -> E1 (contradicting the KG); the KG's own E0 -> E1 is stated too
    renamed = dict(EX, path_star={"entities": ["E2", "E0", "E1"], "edges": [
                       {"src": "E2", "rel": "a", "dst": "E0"}, {"src": "E0", "rel": "b", "dst": "E1"}]},
                   meta={"counterfactual": True, "facts": ["E2 -a-> E0", "E0 -b-> E1", "Noise -c-> E3"]})
    r = score("TRACE: E2 -a-> E0 -b-> E1 -b-> E2\nANSWER: A", renamed, M, KG_, CFG)
    assert r["hallucinated_hops"] == [["E1", "E2"]]  # a KG edge, but not a stated fact
    assert r["edge_precision"] == pytest.approx(2 / 3)
    assert run("TRACE: E2 -a-> E0 -a-> E1\nANSWER: A")["edge_precision"] == pytest.approx(0.5)  # vs the KG
    assert r["hits"] == 3 and r["path_coverage"] == 1.0  # its chain is judged against its facts too


def test_custom_weights_change_total():
    cfg = RewardConfig(correct=2.0, w_correct=0.5, w_path=2.0, min_hits=1, max_path_reward=0.6,
                       spam_penalty=1.0, repeat_max=1)
    r = run("TRACE: E0 -a-> E1 -b-> E2 -c-> E3\nANSWER: A", cfg)
    assert r["total"] == pytest.approx(0.5 * 2.0 + 2.0 * 0.6)
    r = run("TRACE: E0 -x-> E0\nANSWER: A", cfg)  # 1 hit counts with min_hits=1; spam with repeat_max=1
    assert r["total"] == pytest.approx(1.0 + 2.0 * 0.25 - 1.0)
    assert run("nope", RewardConfig(invalid=-5.0))["total"] == -5.0


def test_episode_row_format():
    text = "TRACE: E0 -a-> E1 -b-> E3\nANSWER: A"
    r = run(text)
    row = episode(EX, text, "sft", r)
    assert list(row) == ["phase", "ex_id", "split", "hop_len", "prompt", "completion", "answer_star",
                         "correct", "parsed", "reward", "hallucinated_hops"]
    assert row["phase"] == "sft" and row["ex_id"] == "eval-00001" and row["hop_len"] == 3
    assert row["correct"] is True
    assert row["parsed"] == {"valid_format": True, "answer": "A", "trace_text": "E0 -a-> E1 -b-> E3",
                             "trace_entities": ["E0", "E1", "E3"], "path_entities": ["E0", "E1", "E2", "E3"],
                             "chain_nodes": 2, "walk_nodes": 2}
    assert set(row["reward"]) == {"correctness", "path_coverage", "path_reward", "spam_penalty", "total",
                                  "edge_precision"}
    assert row["hallucinated_hops"] == [["E1", "E3"]]
    import json
    json.dumps(row)


def test_repetition_factor_hand_computed():
    from tracer.reward import repetition_factor

    assert repetition_factor("") == 1.0 and repetition_factor("the and of") == 1.0  # stop words only
    assert repetition_factor("a1 b2 c3 d4") == 1.0  # top share 0.25 <= 0.35
    # x x x x y: top share 0.8 -> 1 - 3 x 0.45 < 0; clipped to 0
    assert repetition_factor("x x x x y") == 0.0
    # x y x y z w v u t s: top share 0.2, no run: 1.0; runs of 5: 1 - 2 x 0.05
    assert repetition_factor("x x x x x y z w v u t s r q p o n m l k") == pytest.approx(
        (1 - 3 * max(0, 5 / 20 - 0.35)) * 0.9)


def test_paper_reward_preset():
    from tracer.config import load_config
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper_reward.toml").reward
    full = run("TRACE: E0 -a-> E1 -b-> E2 -c-> E3\nANSWER: A", cfg)
    assert full["total"] == pytest.approx(0.1 + 1.5)  # min(1.2 x 1 + 0.3, 1.5)
    # wrong, 2 of 4 nodes on the chain; words e0, e1 ("a" is a stop word): top share 0.5 -> factor 0.55
    half = run("TRACE: E0 -a-> E1\nANSWER: B", cfg)
    assert half["total"] == pytest.approx(-1.0 + (1.2 * 0.5 + 0.3) * 0.55)
    one = run("TRACE: E0 -x-> Foo_Bar\nANSWER: A", cfg)  # below min_hits: coverage counts, no bonus
    assert one["total"] == pytest.approx(0.1 + 1.2 * 0.25)  # words e0 x foo bar: factor 1
    assert run("no format", cfg)["total"] == -1.0
