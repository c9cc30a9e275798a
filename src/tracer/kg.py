"""Knowledge graph: data model, validation, loading (JSON, or triples files read by
:mod:`tracer.triples`) and saving."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tracer.errors import TracerError
from tracer.format import NODE_TRIM, RELATION_CHARS
from tracer.triples import KG_SUFFIXES, TRIPLE_SUFFIXES, read_text, read_triples, read_types

ENTITY_KEYS = ("id", "label", "type")
RELATION_KEYS = ("id", "label")
EDGE_KEYS = ("src", "rel", "dst")
_RELATION_ID = re.compile(f"[{RELATION_CHARS}]+")  # what the trace syntax `-rel->` reads


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
    notes: list[str] = field(default_factory=list, compare=False)  # what loading changed, for `kg stats`
    _index: dict[tuple[str, str], list[str]] = field(init=False, repr=False, compare=False)
    _rindex: dict[tuple[str, str], list[str]] = field(init=False, repr=False, compare=False)
    _out: dict[str, list[Edge]] = field(init=False, repr=False, compare=False)
    _adj: dict[str, set[str]] = field(init=False, repr=False, compare=False)
    _triples: set[tuple[str, str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], list[str]] = defaultdict(list)
        rindex: dict[tuple[str, str], list[str]] = defaultdict(list)
        out: dict[str, list[Edge]] = defaultdict(list)
        adj: dict[str, set[str]] = defaultdict(set)
        for e in self.edges:
            index[(e.src, e.rel)].append(e.dst)
            rindex[(e.dst, e.rel)].append(e.src)
            out[e.src].append(e)
            adj[e.src].add(e.dst)
            adj[e.dst].add(e.src)
        self._index, self._rindex, self._out, self._adj = dict(index), dict(rindex), dict(out), dict(adj)
        self._triples = {(e.src, e.rel, e.dst) for e in self.edges}

    def targets(self, src: str, rel: str) -> list[str]:
        """Entities reached from `src` by one `rel` edge, in file order."""
        return list(self._index.get((src, rel), ()))

    def sources(self, dst: str, rel: str) -> list[str]:
        """Entities with a `rel` edge into `dst`, in file order."""
        return list(self._rindex.get((dst, rel), ()))

    def has_triple(self, src: str, rel: str, dst: str) -> bool:
        """True if the edge src -rel-> dst exists."""
        return (src, rel, dst) in self._triples

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


def infer_types(entities: list[str], edges: list[Edge]) -> dict[str, str]:
    """A type per entity from the relations around it, for graphs without types: ``in:REL`` for the
    relation most often pointing at it (ties: alphabetical), ``out:REL`` for an entity nothing
    points at. Tails of one relation then share a type, so distractors are of the answer's kind."""
    incoming: dict[str, Counter] = defaultdict(Counter)
    outgoing: dict[str, Counter] = defaultdict(Counter)
    for e in edges:
        incoming[e.dst][e.rel] += 1
        outgoing[e.src][e.rel] += 1
    out = {}
    for x in entities:
        c, side = (incoming[x], "in") if incoming[x] else (outgoing[x], "out")
        out[x] = f"{side}:{min(c, key=lambda r: (-c[r], r))}" if c else "entity"
    return out


def load_triples(path: str | Path) -> KG:
    """A KG from a head/relation/tail .tsv or .csv file (the PyKEEN / OpenKE layout), header optional.

    Names become ids the trace syntax keeps (:func:`tracer.triples.entity_id`,
    :func:`tracer.triples.relation_id`); the names are the labels. Duplicate triples and self-loops
    are dropped and noted. Types are inferred (:func:`infer_types`) unless a types file is given to
    :func:`load_kg`.
    """
    entities, relations, triples, dropped = read_triples(path)
    edges = [Edge(*t) for t in triples]
    types = infer_types(list(entities), edges)
    return KG(
        version="1.0",
        domain=Path(path).stem,
        entities={i: Entity(i, name, types[i]) for i, name in entities.items()},
        relations={i: Relation(i, name) for i, name in relations.items()},
        edges=edges,
        notes=["types inferred from relations (give a types file for real ones)"] + dropped,
    )


def load_kg(path: str | Path, types: str | Path | None = None) -> KG:
    """Load and validate a KG: tracer's / the public project's JSON, or a .tsv/.csv triples file;
    ``types`` is an optional entity/type file that sets (or overrides) the entities' types.
    Raises TracerError naming the file (and line) on a missing or bad file."""
    suffix = Path(path).suffix.lower()
    if suffix in TRIPLE_SUFFIXES:
        kg = load_triples(path)
    elif suffix == ".json":
        text = read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TracerError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        kg = kg_from_dict(data, str(path))
    else:
        raise TracerError(f"{path}: unknown KG format {suffix or '(no extension)'!r} "
                          f"(expected {', '.join(KG_SUFFIXES)})")
    if types is not None:
        given = read_types(types, {i: e.label for i, e in kg.entities.items()})
        inferred = infer_types(list(kg.entities), kg.edges)
        kg.entities = {i: Entity(i, e.label, given.get(i, inferred[i])) for i, e in kg.entities.items()}
        kg.notes = [n for n in kg.notes if not n.startswith("types inferred")]
        if len(given) < len(kg.entities):
            kg.notes.append(f"{len(kg.entities) - len(given)} entities without a type in {types}: inferred")
    return kg


def kg_to_dict(kg: KG) -> dict:
    """Serialise a KG to the public JSON schema."""
    return {
        "version": kg.version,
        "domain": kg.domain,
        "entities": [{"id": e.id, "label": e.label, "type": e.type} for e in kg.entities.values()],
        "relations": [{"id": r.id, "label": r.label} for r in kg.relations.values()],
        "edges": [{"src": e.src, "rel": e.rel, "dst": e.dst} for e in kg.edges],
    }


def describe(kg: KG) -> dict[str, Any]:
    """Plain counts for ``tracer kg stats``: entities, relations, edges, types, and each relation's
    fan-out (heads = (entity, relation) pairs; ``multi`` of them have more than one target)."""
    fan: dict[str, Counter] = defaultdict(Counter)
    for e in kg.edges:
        fan[e.rel][e.src] += 1
    relations = []
    for rel in sorted(kg.relations):
        c = fan.get(rel, Counter())
        relations.append({"relation": rel, "edges": sum(c.values()), "heads": len(c),
                          "multi": sum(v > 1 for v in c.values()), "max_targets": max(c.values(), default=0)})
    types = Counter(e.type for e in kg.entities.values())
    return {
        "entities": len(kg.entities), "relations": len(kg.relations), "edges": len(kg.edges),
        "types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "pairs": sum(r["heads"] for r in relations), "multi_pairs": sum(r["multi"] for r in relations),
        "fanout": relations, "notes": list(kg.notes),
    }
