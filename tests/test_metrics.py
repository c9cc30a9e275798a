"""Tests for tracer.metrics."""

from __future__ import annotations

import pytest

from tracer.format import trace_hops, trace_nodes
from tracer.metrics import aggregate, hop_recall, shuffle_agreement, wilson


def test_wilson_known_values():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4)
    assert hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert wilson(0, 0) == (0.0, 0.0)


def ep(ex_id, hop, correct, valid=True, answer="A", cov=0.0, total=0.0, ep_prec=0.0, hops=None):
    trace = " ".join(f"E{i} -r->" for i in range(hop if hops is None else hops)) + " E9"
    return {"ex_id": ex_id, "hop_len": hop, "correct": correct,
            "parsed": {"valid_format": valid, "answer": answer, "trace_text": trace},
            "reward": {"path_coverage": cov, "total": total, "edge_precision": ep_prec}}


EPS = [
    ep("a", 4, True, cov=1.0, total=1.5, ep_prec=1.0),
    ep("b", 4, False, cov=0.5, total=-1.75, ep_prec=0.5, hops=3),
    ep("c", 5, True, cov=0.0, total=1.0, ep_prec=0.0),
    ep("d", 5, False, valid=False, answer=None, cov=0.2, total=-2.0, ep_prec=0.9),
]


def test_aggregate_totals():
    m = aggregate(EPS)
    assert m["n"] == 4 and m["correct"] == 2
    assert m["accuracy"] == 0.5
    assert m["accuracy_ci"] == pytest.approx(list(wilson(2, 4)))
    assert m["path_coverage"] == pytest.approx(1.7 / 4)
    assert m["reward"] == pytest.approx((1.5 - 1.75 + 1.0 - 2.0) / 4)
    assert m["format_rate"] == 0.75
    assert m["edge_precision"] == pytest.approx(1.5 / 3)  # invalid episode excluded
    assert m["length_match"] == 0.5  # "b" stops a hop short; "d" has 5 arrows but no valid format


def test_aggregate_per_hop():
    ph = aggregate(EPS)["per_hop"]
    assert list(ph) == ["4", "5"]
    h4, h5 = ph["4"], ph["5"]
    assert h4["n"] == 2 and h4["accuracy"] == 0.5
    assert h4["path_coverage"] == pytest.approx(0.75)
    assert h4["reward"] == pytest.approx(-0.125)
    assert h4["format_rate"] == 1.0
    assert h4["edge_precision"] == pytest.approx(0.75)
    assert h4["accuracy_ci"] == pytest.approx(list(wilson(1, 2)))
    assert h5["format_rate"] == 0.5
    assert h5["edge_precision"] == 0.0
    assert h5["path_coverage"] == pytest.approx(0.1)
    assert h4["length_match"] == 0.5 and h5["length_match"] == 0.5


def test_trace_hops_counts_arrows_even_for_unknown_entities():
    assert trace_hops("A -leads_to-> B -related_to-> NotInTheKG -fixed_by-> C") == 3
    assert trace_hops("A") == 0 and trace_hops("") == 0
    m = aggregate([ep("a", 4, True, hops=5), ep("b", 4, True, hops=4)])
    assert m["length_match"] == 0.5  # one hop too many is a mismatch too


def chain(trace, gold, valid=True):
    return {"parsed": {"valid_format": valid, "trace_text": " -r-> ".join(trace), "path_entities": gold}}


def test_hop_recall_counts_each_position_given_a_correct_prefix():
    gold = ["S", "A", "B", "C"]
    r = hop_recall([
        chain(["S", "A", "B", "C"], gold),       # all three hops right
        chain(["S", "A", "X", "C"], gold),       # hop 2 wrong: hop 3 is never reached
        chain(["S", "A"], gold),                 # stopped after hop 1
        chain(["S", "A", "B", "C", "D"], gold, valid=False),  # right, then ran on: counts
        chain(["T", "A", "B", "C"], gold),       # wrong start: reaches no hop
    ])
    assert list(r) == ["1", "2", "3"]
    assert r["1"] == {"n": 4, "recall": 1.0, "stopped": 0.0}
    assert r["2"] == {"n": 4, "recall": 0.5, "stopped": 0.25}
    assert r["3"] == {"n": 2, "recall": 1.0, "stopped": 0.0}
    assert hop_recall([]) == {} and aggregate([])["hop_recall"] == {}


def test_hop_recall_reads_the_written_hops():
    gold = ["S", "A", "B"]
    made_up = chain(["S", "Invented", "B"], gold)  # a name that is no entity: a wrong hop, not a stop
    repeat = chain(["S", "S", "A"], gold)  # a repeated entity is a hop too
    r = hop_recall([made_up, repeat])
    assert r["1"] == {"n": 2, "recall": 0.0, "stopped": 0.0} and "2" not in r
    old_row = {"parsed": {"valid_format": True, "trace_entities": ["S", "A"], "path_entities": gold}}
    assert hop_recall([old_row])["1"]["recall"] == 1.0  # rows without trace_text: named entities
    assert trace_nodes("`S` -r-> A ->B.") == ["S", "A", "B"] and trace_nodes("  ") == []


def test_aggregate_empty_and_no_valid():
    m = aggregate([])
    assert m["n"] == 0 and m["accuracy"] == 0.0 and m["accuracy_ci"] == [0.0, 0.0] and m["per_hop"] == {}
    m = aggregate([ep("x", 4, False, valid=False, answer=None, ep_prec=0.7)])
    assert m["edge_precision"] == 0.0 and m["format_rate"] == 0.0


def test_hop_ordering_is_numeric():
    m = aggregate([ep("a", 10, True), ep("b", 2, True)])
    assert list(m["per_hop"]) == ["2", "10"]


def test_shuffle_agreement():
    orig_ex = [{"id": f"q{i}", "options": {"A": "X", "B": "Y", "C": "Z", "D": "W"}} for i in range(4)]
    shuf_ex = [{"id": f"q{i}-shuf", "options": {"A": "Y", "B": "X", "C": "W", "D": "Z"}} for i in range(4)]
    orig = [ep("q0", 4, True, answer="A"), ep("q1", 4, True, answer="A"),
            ep("q2", 4, True, answer="C"), ep("q3", 4, True, answer="A")]
    shuf = [ep("q0-shuf", 4, True, answer="B"),        # X == X: agree
            ep("q1-shuf", 4, True, answer="A"),        # X vs Y: disagree
            ep("q2-shuf", 4, True, answer="D"),        # Z == Z: agree
            ep("q3-shuf", 4, False, valid=False, answer="B")]  # invalid: disagree
    assert shuffle_agreement(orig, shuf, orig_ex, shuf_ex) == 0.5
    # unpaired questions are ignored; no pairs -> None: nothing was measured (not 0% agreement)
    assert shuffle_agreement(orig[:2], shuf[:1], orig_ex, shuf_ex) == 1.0
    assert shuffle_agreement(orig, [], orig_ex, shuf_ex) is None
    # both invalid (None answers) is not agreement
    o = [ep("q0", 4, False, valid=False, answer=None)]
    s = [ep("q0-shuf", 4, False, valid=False, answer=None)]
    assert shuffle_agreement(o, s, orig_ex, shuf_ex) == 0.0


def test_failure_kinds_read_how_far_the_trace_follows_the_chain():
    from tracer.metrics import failure, failures

    def ep(trace, on_path, walked, valid=True, correct=False, hop=2):
        return {"correct": correct, "hop_len": hop, "parsed": {
            "valid_format": valid, "trace_text": trace, "chain_nodes": on_path, "walk_nodes": walked}}

    cases = {
        "format": ep("S -r-> A", 2, 2, valid=False),
        "letter": ep("S -r-> A -s-> T", 3, 3),
        "start": ep("A -s-> T", 0, 0),
        "broken": ep("S -r-> Made_Up -s-> T", 1, 1),
        "branch": ep("S -r-> A -s-> X", 2, 3),
        "short": ep("S -r-> A", 2, 2),
    }
    # a wrong branch first, then a made-up hop to reach an option: the branch is the first mistake
    assert failure(ep("S -r-> B -s-> Q -t-> T", 1, 2, hop=3)) == "branch"
    assert failure(ep("S -r-> A -s-> Made_Up -t-> T", 2, 2, hop=3)) == "broken"  # on the answer's branch
    for kind, e in cases.items():
        assert failure(e) == kind
    right = ep("S -r-> A -s-> T", 3, 3, correct=True)
    old = {"correct": False, "hop_len": 2, "parsed": {"valid_format": True, "trace_text": "S"}}
    assert failure(right) is None and failure(old) is None
    assert failures(list(cases.values()) + [right, old, cases["branch"]]) == {
        "format": 1, "start": 1, "broken": 1, "branch": 2, "short": 1, "letter": 1}
    assert failures([cases["short"], right]) == {"short": 1}


def test_mcnemar_exact_pairs_by_question():
    from tracer.metrics import mcnemar

    def eps(flags, prefix="q"):
        return [{"ex_id": f"{prefix}{i}", "correct": c} for i, c in enumerate(flags)]

    a = eps([False] * 6 + [True] * 4)
    b = eps([True] * 6 + [True] * 3 + [False])  # fixes 6, breaks 1
    r = mcnemar(a, b)
    assert (r["n"], r["fixed"], r["broken"]) == (10, 6, 1)
    assert r["p"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # two-sided binomial tail, hand-computed: 0.125
    assert mcnemar(a, a)["p"] == 1.0 and mcnemar(a, a)["fixed"] == 0
    assert mcnemar(a, eps([True], "other"))["n"] == 0  # no shared questions
    assert mcnemar(eps([False] * 10), eps([True] * 10))["p"] == pytest.approx(2 / 2 ** 10)
