"""Knowledge graph: data model, validation, loading and saving."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tracer.errors import TracerError

ENTITY_KEYS = ("id", "label", "type")
RELATION_KEYS = ("id", "label")
EDGE_KEYS = ("src", "rel", "dst")
_RELATION_ID = re.compile(r"[A-Za-z0-9_]+")  # what the trace syntax `-rel->` reads
NODE_TRIM = " \t\n`'\".,;:"  # what a trace parser strips from each node: no entity id may start or end with it


@dataclass(frozen=True)
class Entity:
    """A node of the graph."""

    id: str
    label: str
    type: str


@dataclass(frozen=True)
class Relation:
    """An edge type."""

    id: str
    label: str


@dataclass(frozen=True)
class Edge:
    """A directed, typed edge src -rel-> dst."""

    src: str
    rel: str
    dst: str


@dataclass
class KG:
    """A knowledge graph with lookup indexes built on construction."""

    version: str
    domain: str
    entities: dict[str, Entity]
    relations: dict[str, Relation]
    edges: list[Edge]
    _index: dict[tuple[str, str], list[str]] = field(init=False, repr=False, compare=False)
    _out: dict[str, list[Edge]] = field(init=False, repr=False, compare=False)
    _adj: dict[str, set[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], list[str]] = defaultdict(list)
        out: dict[str, list[Edge]] = defaultdict(list)
        adj: dict[str, set[str]] = defaultdict(set)
        for e in self.edges:
            index[(e.src, e.rel)].append(e.dst)
            out[e.src].append(e)
            adj[e.src].add(e.dst)
            adj[e.dst].add(e.src)
        self._index, self._out, self._adj = dict(index), dict(out), dict(adj)

    def targets(self, src: str, rel: str) -> list[str]:
        """Entities reached from `src` by one `rel` edge, in file order."""
        return list(self._index.get((src, rel), ()))

    def out_edges(self, src: str) -> list[Edge]:
        """All edges leaving `src`, in file order."""
        return list(self._out.get(src, ()))

    def has_edge(self, a: str, b: str) -> bool:
        """True if some directed edge a -> b exists (any relation)."""
        return any(e.dst == b for e in self._out.get(a, ()))

    def neighbors(self, x: str) -> set[str]:
        """Entities joined to `x` by an edge in either direction."""
        return set(self._adj.get(x, ()))

    def follow(self, start: str, rels: Sequence[str]) -> set[str]:
        """All entities reachable from `start` following the relation chain `rels`."""
        frontier = {start}
        for rel in rels:
            frontier = {d for s in frontier for d in self._index.get((s, rel), ())}
        return frontier


def _check_items(data: dict, name: str, keys: tuple[str, ...], problems: list[str]) -> list[dict]:
    """Check that data[name] is a list of objects with string `keys`; return the well-formed ones."""
    items = data.get(name)
    if items is None:
        problems.append(f"missing '{name}'")
        return []
    if not isinstance(items, list):
        problems.append(f"{name}: expected a list, got {type(items).__name__}")
        return []
    good: list[dict] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an object, got {type(item).__name__}")
            continue
        ok = True
        for k in keys:
            if k not in item:
                problems.append(f"{where}: missing '{k}'")
                ok = False
            elif not isinstance(item[k], str) or not item[k]:
                problems.append(f"{where}.{k}: expected a non-empty string, got {item[k]!r}")
                ok = False
        good.append(item if ok else {})
    return good


def _check_unique(items: list[dict], name: str, problems: list[str]) -> set[str]:
    """Report duplicate ids among well-formed items; return the set of ids."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not item:
            continue
        if item["id"] in seen:
            problems.append(f"{name}[{i}].id: duplicate id '{item['id']}'")
        seen.add(item["id"])
    return seen


def validate_kg_dict(data: Any) -> list[str]:
    """Return every problem found in a KG dict, each prefixed with its location."""
    if not isinstance(data, dict):
        return [f"expected a JSON object at top level, got {type(data).__name__}"]
    problems: list[str] = []
    for key in ("version", "domain"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{key}: expected a string, got {data[key]!r}")
    entities = _check_items(data, "entities", ENTITY_KEYS, problems)
    relations = _check_items(data, "relations", RELATION_KEYS, problems)
    edges = _check_items(data, "edges", EDGE_KEYS, problems)
    entity_ids = _check_unique(entities, "entities", problems)
    relation_ids = _check_unique(relations, "relations", problems)
    # traces and facts are written `src -rel-> dst`: ids must survive that syntax
    for i, e in enumerate(entities):
        if e and (any(c.isspace() for c in e["id"]) or "->" in e["id"]):
            problems.append(f"entities[{i}].id: {e['id']!r} contains whitespace or '->' (use _ between words)")
        elif e and e["id"] and (e["id"][0] in NODE_TRIM or e["id"][-1] in NODE_TRIM):
            problems.append(f"entities[{i}].id: {e['id']!r} starts or ends with punctuation a trace drops")
    for i, r in enumerate(relations):
        if r and not _RELATION_ID.fullmatch(r["id"]):
            problems.append(f"relations[{i}].id: {r['id']!r} must be letters, digits and _ only")
    seen_edges: set[tuple[str, str, str]] = set()
    for i, e in enumerate(edges):
        if not e:
            continue
        where = f"edges[{i}]"
        for k in ("src", "dst"):
            if e[k] not in entity_ids:
                problems.append(f"{where}: unknown entity '{e[k]}' in {k}")
        if e["rel"] not in relation_ids:
            problems.append(f"{where}: unknown relation '{e['rel']}' in rel")
        if e["src"] == e["dst"]:
            problems.append(f"{where}: self-loop on '{e['src']}'")
        triple = (e["src"], e["rel"], e["dst"])
        if triple in seen_edges:
            problems.append(f"{where}: duplicate edge ({', '.join(triple)})")
        seen_edges.add(triple)
    return problems


def kg_from_dict(data: Any, source: str = "<kg>") -> KG:
    """Build a KG from a parsed dict; raise TracerError naming `source` on any problem."""
    problems = validate_kg_dict(data)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TracerError(f"{source}: {problems[0]}{more}")
    return KG(
        version=data.get("version", "1.0"),
        domain=data.get("domain", "unknown"),
        entities={e["id"]: Entity(e["id"], e["label"], e["type"]) for e in data["entities"]},
        relations={r["id"]: Relation(r["id"], r["label"]) for r in data["relations"]},
        edges=[Edge(e["src"], e["rel"], e["dst"]) for e in data["edges"]],
    )


def load_kg(path: str | Path) -> KG:
    """Load and validate a KG JSON file; raise TracerError on a missing or bad file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TracerError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TracerError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TracerError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return kg_from_dict(data, str(path))


def kg_to_dict(kg: KG) -> dict:
    """Serialise a KG to the public JSON schema."""
    return {
        "version": kg.version,
        "domain": kg.domain,
        "entities": [{"id": e.id, "label": e.label, "type": e.type} for e in kg.entities.values()],
        "relations": [{"id": r.id, "label": r.label} for r in kg.relations.values()],
        "edges": [{"src": e.src, "rel": e.rel, "dst": e.dst} for e in kg.edges],
    }
