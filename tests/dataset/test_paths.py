"""Question paths: listed by a sorted DFS, sampled past a budget, each with its canonical path
(tracer.dataset.paths)."""

from __future__ import annotations

import random

from tracer.dataset.paths import (canonical_path, enumerate_paths, path_key, question_key, sample_paths,
                                  unique_edges)
from tracer.kg import KG, Edge, Entity, Relation


def diamond() -> KG:
    """S -r-> {A, B} -s-> T, and A -s-> U: two simple paths S -r-> ? -s-> T."""
    names = ["S", "A", "B", "T", "U"]
    edges = [Edge("S", "r", "B"), Edge("S", "r", "A"), Edge("A", "s", "T"), Edge("B", "s", "T"),
             Edge("A", "s", "U"), Edge("S", "r", "A")]
    return KG("1", "test", {n: Entity(n, n, "x") for n in names}, {r: Relation(r, r) for r in "rs"}, edges)


def test_enumerate_paths_lists_each_key_once_with_its_canonical_path():
    kg = diamond()
    paths = enumerate_paths(kg, [2, 1])
    assert sorted(paths) == [1, 2]
    assert {question_key(p) for p in paths[1]} == {("S", ("r",), "A"), ("S", ("r",), "B"),
                                                   ("A", ("s",), "T"), ("B", ("s",), "T"), ("A", ("s",), "U")}
    assert paths[2] == [(("S", "A", "T"), ("r", "s")), (("S", "A", "U"), ("r", "s"))]  # via A, not B
    assert canonical_path(kg, "S", ("r", "s"), "T") == ("S", "A", "T")
    assert canonical_path(kg, "S", ("s",), "T") is None
    assert enumerate_paths(kg, []) == {}


def test_enumerate_paths_gives_way_to_sampling_past_its_budget():
    kg = diamond()
    assert enumerate_paths(kg, [2], budget=2) is None
    sampled = sample_paths(kg, {2: 5}, random.Random(0))
    assert {question_key(p) for p in sampled[2]} == {("S", ("r", "s"), "T"), ("S", ("r", "s"), "U")}
    for ents, rels in sampled[2]:
        assert ents == canonical_path(kg, ents[0], rels, ents[-1])


def test_path_key_of_rows_with_and_without_edges():
    row = {"path_star": {"entities": ["S", "A", "T"], "edges": [{"src": "S", "rel": "r", "dst": "A"},
                                                                  {"src": "A", "rel": "s", "dst": "T"}]}}
    assert path_key(row) == ("S", ("r", "s"), "T")
    bare = {"path_star": {"entities": ["S", "A", "T"]}, "meta": {"relations": ["r", "s"]}}
    assert path_key(bare) == path_key(row)


def test_unique_edges_keeps_file_order():
    assert unique_edges(diamond()) == [("S", "r", "B"), ("S", "r", "A"), ("A", "s", "T"), ("B", "s", "T"),
                                       ("A", "s", "U")]
