"""Tests for tracer.kg and the shipped data/kg.json."""

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tracer.errors import TracerError
from tracer.kg import KG, Edge, kg_from_dict, kg_to_dict, load_kg, validate_kg_dict

KG_PATH = Path(__file__).resolve().parents[1] / "data" / "kg.json"


@pytest.fixture(scope="module")
def kg() -> KG:
    return load_kg(KG_PATH)


def small() -> dict:
    return {
        "version": "1.0",
        "domain": "test",
        "entities": [
            {"id": "A", "label": "a", "type": "symptom"},
            {"id": "B", "label": "b", "type": "cause"},
            {"id": "C", "label": "c", "type": "fix"},
        ],
        "relations": [{"id": "caused_by", "label": "caused by"}, {"id": "fixed_by", "label": "fixed by"}],
        "edges": [{"src": "A", "rel": "caused_by", "dst": "B"}, {"src": "B", "rel": "fixed_by", "dst": "C"}],
    }


def simple_paths(kg: KG, length: int) -> list[tuple[str, tuple[str, ...]]]:
    """(start, relation chain) pairs of `length` hops with a unique target at every hop and no repeated node."""
    found = []

    def walk(node: str, chain: tuple[str, ...], visited: tuple[str, ...]) -> None:
        if len(chain) == length:
            found.append((visited[0], chain))
            return
        for rel in kg.relations:
            dsts = kg.targets(node, rel)
            if len(dsts) == 1 and dsts[0] not in visited:
                walk(dsts[0], chain + (rel,), visited + (dsts[0],))

    for start in kg.entities:
        walk(start, (), (start,))
    return found


# --- shipped data -----------------------------------------------------------


def test_shipped_kg_validates(kg: KG) -> None:
    assert validate_kg_dict(json.loads(KG_PATH.read_text())) == []
    assert kg.domain == "software_troubleshooting"
    assert set(kg.relations) == {"caused_by", "leads_to", "diagnosed_by", "fixed_by", "uses_tool", "related_to"}


def test_shipped_kg_size(kg: KG) -> None:
    assert 190 <= len(kg.entities) <= 210
    assert 580 <= len(kg.edges) <= 620


def test_shipped_kg_ids_and_types(kg: KG) -> None:
    assert all(re.fullmatch(r"[A-Z][A-Za-z0-9]+", i) for i in kg.entities)
    counts = Counter(e.type for e in kg.entities.values())
    for t in ("symptom", "cause", "diagnostic", "fix", "tool"):
        assert counts[t] >= 20, (t, counts[t])


def test_shipped_kg_functional_and_connected(kg: KG) -> None:
    pairs = Counter((e.src, e.rel) for e in kg.edges)
    assert max(pairs.values()) == 1
    assert all(kg.neighbors(x) for x in kg.entities)


def test_shipped_kg_has_many_long_paths(kg: KG) -> None:
    four, five = simple_paths(kg, 4), simple_paths(kg, 5)
    assert len(set(four) | set(five)) >= 300
    assert len(four) >= 300 and len(five) >= 300
    start, chain = five[0]
    assert len(kg.follow(start, chain)) == 1


def test_round_trip(kg: KG) -> None:
    again = kg_from_dict(kg_to_dict(kg))
    assert again.entities == kg.entities and again.edges == kg.edges
    assert kg_to_dict(again) == json.loads(KG_PATH.read_text())


# --- KG methods ---------------------------------------------------------------


def test_kg_methods() -> None:
    g = kg_from_dict(small())
    assert g.targets("A", "caused_by") == ["B"]
    assert g.targets("A", "fixed_by") == []
    assert g.out_edges("B") == [Edge("B", "fixed_by", "C")]
    assert g.has_edge("A", "B") and not g.has_edge("B", "A")
    assert g.neighbors("B") == {"A", "C"}
    assert g.follow("A", ["caused_by", "fixed_by"]) == {"C"}
    assert g.follow("A", ["fixed_by"]) == set()
    assert g.follow("A", []) == {"A"}


def test_defaults_for_version_and_domain() -> None:
    data = small()
    del data["version"], data["domain"]
    g = kg_from_dict(data)
    assert (g.version, g.domain) == ("1.0", "unknown")


# --- validation -----------------------------------------------------------------


def problems_after(mutate) -> list[str]:
    data = copy.deepcopy(small())
    mutate(data)
    return validate_kg_dict(data)


def test_valid_small_has_no_problems() -> None:
    assert validate_kg_dict(small()) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["edges"].append({"src": "A", "rel": "caused_by", "dst": "Foo"}),
         "edges[2]: unknown entity 'Foo' in dst"),
        (lambda d: d["edges"].append({"src": "Foo", "rel": "caused_by", "dst": "A"}),
         "edges[2]: unknown entity 'Foo' in src"),
        (lambda d: d["edges"].append({"src": "A", "rel": "nope", "dst": "B"}),
         "edges[2]: unknown relation 'nope' in rel"),
        (lambda d: d["edges"].append({"src": "A", "rel": "caused_by", "dst": "A"}),
         "edges[2]: self-loop on 'A'"),
        (lambda d: d["edges"].append({"src": "A", "rel": "caused_by", "dst": "B"}),
         "edges[2]: duplicate edge (A, caused_by, B)"),
        (lambda d: d["entities"].append({"id": "A", "label": "x", "type": "tool"}),
         "entities[3].id: duplicate id 'A'"),
        (lambda d: d["relations"].append({"id": "fixed_by", "label": "x"}),
         "relations[2].id: duplicate id 'fixed_by'"),
        (lambda d: d["entities"][2].pop("type"), "entities[2]: missing 'type'"),
        (lambda d: d["edges"][1].pop("dst"), "edges[1]: missing 'dst'"),
        (lambda d: d["relations"][0].pop("label"), "relations[0]: missing 'label'"),
        (lambda d: d["entities"][1].update(label=3), "entities[1].label: expected a non-empty string, got 3"),
        (lambda d: d["entities"].__setitem__(0, "A"), "entities[0]: expected an object, got str"),
        (lambda d: d.update(edges={}), "edges: expected a list, got dict"),
        (lambda d: d.pop("relations"), "missing 'relations'"),
        (lambda d: d.update(version=2), "version: expected a string, got 2"),
        # traces and facts are written `src -rel-> dst`
        (lambda d: d["entities"][0].update(id="Disk full"), "entities[0].id: 'Disk full' contains whitespace or '->' (use _ between words)"),
        (lambda d: d["entities"][0].update(id="a->b"), "entities[0].id: 'a->b' contains whitespace or '->' (use _ between words)"),
        (lambda d: d["relations"][0].update(id="caused-by"), "relations[0].id: 'caused-by' must be letters, digits and _ only"),
        # a trace parser trims these off every node, so `.env` would never match its own entity
        (lambda d: d["entities"][0].update(id=".env"), "entities[0].id: '.env' starts or ends with punctuation a trace drops"),
        (lambda d: d["entities"][0].update(id="Restart:"), "entities[0].id: 'Restart:' starts or ends with punctuation a trace drops"),
    ],
)
def test_each_problem_reported_with_location(mutate, expected: str) -> None:
    assert expected in problems_after(mutate)


def test_top_level_not_object() -> None:
    assert validate_kg_dict([1, 2]) == ["expected a JSON object at top level, got list"]


def test_all_problems_reported() -> None:
    def mutate(d):
        d["edges"].append({"src": "A", "rel": "caused_by", "dst": "A"})
        d["edges"].append({"src": "A", "rel": "caused_by", "dst": "Zed"})

    assert len(problems_after(mutate)) == 2


def test_kg_from_dict_raises_first_problem_and_count() -> None:
    data = small()
    data["edges"].append({"src": "A", "rel": "caused_by", "dst": "A"})
    data["edges"].append({"src": "A", "rel": "caused_by", "dst": "Zed"})
    with pytest.raises(TracerError, match=r"^my\.json: edges\[2\]: self-loop on 'A' \(\+1 more\)$"):
        kg_from_dict(data, "my.json")


# --- load_kg errors ---------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(TracerError, match=re.escape(f"{path}: no such file")):
        load_kg(path)


def test_load_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "entities": [,]\n}\n')
    with pytest.raises(TracerError) as info:
        load_kg(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid JSON at line 2 column")


def test_load_invalid_kg_names_file(tmp_path: Path) -> None:
    path = tmp_path / "kg.json"
    data = small()
    data["edges"][0]["dst"] = "Nope"
    path.write_text(json.dumps(data))
    with pytest.raises(TracerError, match=re.escape(f"{path}: edges[0]: unknown entity 'Nope' in dst")):
        load_kg(path)
