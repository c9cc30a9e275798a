"""Renamed (counterfactual) copies of facts-mode questions (tracer.dataset.counterfactual)."""

from __future__ import annotations

import re

import pytest

from tracer import dataset as ds
from tracer.config import DataConfig
from tracer.dataset.counterfactual import _row_entities
from tracer.format import reference_trace


def _follow_facts(facts, start, rels):
    """Entities reached from ``start`` along ``rels`` using only the listed facts."""
    edges = [re.match(r"^(\S+) -(\S+)-> (\S+)$", f).groups() for f in facts]
    now = {start}
    for rel in rels:
        now = {d for s, r, d in edges if s in now and r == rel}
    return now


def test_counterfactual_copies_contradict_the_kg_but_not_their_facts(kg):
    base = dict(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    plain = ds.generate_splits(kg, DataConfig(**base))
    sp = ds.generate_splits(kg, DataConfig(**base, counterfactual=0.25))
    n = len(plain["train"])
    # the ordinary splits are unchanged; the copies are added to train only
    assert sp["train"][:n] == plain["train"] and sp["eval"] == plain["eval"] and sp["rsft"] == plain["rsft"]
    cf = sp["train"][n:]
    assert len(cf) == round(0.25 * n) and len({r["id"] for r in cf}) == len(cf)
    held = {ds.path_key(r) for r in sp["eval"] + sp["rsft"]}
    by_id = {r["id"]: r for r in plain["train"]}
    for r in cf:
        src = by_id[r["meta"]["renamed_from"]]
        assert r["meta"]["counterfactual"] and r["hop_len"] == src["hop_len"]
        assert r["answer_star"] == src["answer_star"] and r["options"][r["answer_star"]] == r["path_star"]["entities"][-1]
        start, rels, answer = ds.path_key(r)
        # the prompt's facts lead to the gold option and to no other option ...
        reached = _follow_facts(r["meta"]["facts"], start, rels)
        assert [L for L, e in r["options"].items() if e in reached] == [r["answer_star"]]
        # ... while the KG (what a closed-book model remembers) does not lead to it
        assert answer not in kg.follow(start, list(rels))
        assert (start, rels, answer) not in held
        assert "Facts:\n" + "\n".join(r["meta"]["facts"]) + "\n\n" in r["prompt"]
        assert start in r["question"] and r["prompt"].endswith(
            "\n".join(f"{L}) {r['options'][L]}" for L in "ABCD"))
        assert r["ref"]["trace"] == reference_trace(r["path_star"]["entities"], r["path_star"]["edges"],
                                                       r["answer_star"])
        for e in r["path_star"]["entities"]:  # renamed within type
            assert e in kg.entities
        assert [kg.entities[e].type for e in r["path_star"]["entities"]] == \
            [kg.entities[e].type for e in src["path_star"]["entities"]]
    # the copies do not count as coverage of real KG edges
    assert ds.train_edge_coverage(sp["train"], kg) == ds.train_edge_coverage(plain["train"], kg)


def test_counterfactual_from_any_hop_keeps_a_real_prefix_and_renames_the_rest(kg):
    base = dict(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    plain = ds.generate_splits(kg, DataConfig(**base))
    sp = ds.generate_splits(kg, DataConfig(**base, counterfactual=0.25, counterfactual_from="any_hop"))
    n = len(plain["train"])
    assert sp["train"][:n] == plain["train"] and sp["eval"] == plain["eval"]
    cf, by_id = sp["train"][n:], {r["id"]: r for r in plain["train"]}
    assert len(cf) == round(0.25 * n)
    held = {ds.path_key(r) for r in sp["eval"] + sp["rsft"]}
    real_prefix = []
    for r in cf:
        src = by_id[r["meta"]["renamed_from"]]
        new, old = r["path_star"]["entities"], src["path_star"]["entities"]
        j = next(i for i, (a, b) in enumerate(zip(new, old)) if a != b)  # first renamed entity
        assert j >= 1 and new[-1] != old[-1] and new[:j] == old[:j]
        assert [kg.entities[e].type for e in new] == [kg.entities[e].type for e in old]
        assert len(_row_entities(r)) == len(_row_entities(src))  # fresh names: no two entities merged
        edges = r["path_star"]["edges"]
        for e in edges[: j - 1]:  # the hops before the renamed entity are KG facts, the one into it is not
            assert e["dst"] in kg.follow(e["src"], [e["rel"]])
        assert edges[j - 1]["dst"] not in kg.follow(edges[j - 1]["src"], [edges[j - 1]["rel"]])
        start, rels, answer = ds.path_key(r)
        assert answer not in kg.follow(start, list(rels)) and (start, rels, answer) not in held
        assert [L for L, e in r["options"].items() if e in _follow_facts(r["meta"]["facts"], start, rels)] == \
            [r["answer_star"]]
        real_prefix.append(j)
    assert max(real_prefix) >= 2  # some copies diverge mid-chain, not only at the answer


def test_counterfactual_pool_copies_follow_their_originals(kg):
    base = dict(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    plain = ds.generate_splits(kg, DataConfig(**base))
    sp = ds.generate_splits(kg, DataConfig(**base, counterfactual_pool=0.5))
    assert sp["train"] == plain["train"] and sp["eval"] == plain["eval"]
    originals = [r for r in sp["rsft"] if not r["meta"].get("counterfactual")]
    assert originals == plain["rsft"]
    copies = [r for r in sp["rsft"] if r["meta"].get("counterfactual")]
    assert len(copies) == 30 and len({r["id"] for r in sp["rsft"]}) == len(sp["rsft"])
    held = {ds.path_key(r) for r in plain["eval"] + plain["rsft"]}
    for prev, r in zip(sp["rsft"], sp["rsft"][1:]):
        if r["meta"].get("counterfactual"):
            assert r["meta"]["renamed_from"] == prev["id"] and r["hop_len"] == prev["hop_len"]
            start, rels, answer = ds.path_key(r)
            assert answer not in kg.follow(start, list(rels)) and (start, rels, answer) not in held
            assert _follow_facts(r["meta"]["facts"], start, rels) & set(r["options"].values()) == {answer}


def test_counterfactual_needs_facts_mode():
    with pytest.raises(ValueError, match="context = 'facts'"):
        DataConfig(counterfactual=0.2)
    with pytest.raises(ValueError, match="counterfactual_pool"):
        DataConfig(counterfactual_pool=0.2)


def test_renamed_copies_of_tagged_questions_are_tagged(kg):
    cfg = DataConfig(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts",
                     max_facts=8, counterfactual=0.25, option_tags=True)
    cf = [r for r in ds.generate_splits(kg, cfg)["train"] if r["meta"].get("counterfactual")]
    assert cf
    for r in cf:
        letter, answer = r["answer_star"], r["options"][r["answer_star"]]
        assert r["meta"]["option_tags"] and r["prompt"].endswith(f"{r['options']['D']} (D)")
        assert r["ref"]["trace"] == reference_trace(r["path_star"]["entities"], r["path_star"]["edges"], letter, True)
        assert r["ref"]["trace"].startswith("TRACE: ") and f"{answer} ({letter})\nANSWER: {letter}" in r["ref"]["trace"]
