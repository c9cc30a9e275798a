"""Graph files read as text: a .tsv / .csv triples file (head, relation, tail; the PyKEEN /
OpenKE layout) and an entity/type file, each row checked with its line number. Names become ids
the trace syntax keeps. Plain data out; :func:`tracer.kg.load_kg` builds the graph (pure Python).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from tracer.errors import TracerError
from tracer.format import NODE_TRIM, RELATION_CHARS

TRIPLE_SUFFIXES = (".tsv", ".csv")
KG_SUFFIXES = (".json",) + TRIPLE_SUFFIXES
# a first row that names its columns is a header, not a triple
TRIPLE_HEADERS = {
    ("head", "relation", "tail"), ("head", "rel", "tail"), ("h", "r", "t"), ("src", "rel", "dst"),
    ("source", "relation", "target"), ("subject", "predicate", "object"), ("from", "relation", "to"),
}
TYPE_HEADERS = {("entity", "type"), ("id", "type"), ("entity_id", "type"), ("name", "type")}


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TracerError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TracerError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError:
        raise TracerError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise TracerError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _rows(path: str | Path, columns: tuple[str, ...], headers: set[tuple[str, ...]]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a .tsv or .csv file with exactly ``columns``; a header row, blank
    lines and ``#`` comment lines are skipped. Ragged rows and empty fields raise TracerError."""
    text = read_text(path)
    tsv = Path(path).suffix.lower() == ".tsv"
    reader = csv.reader(text.splitlines(), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    out: list[tuple[int, list[str]]] = []
    try:
        for lineno, fields in enumerate(reader, 1):
            if not fields or (len(fields) == 1 and not fields[0].strip()) or fields[0].lstrip().startswith("#"):
                continue
            fields = [f.strip() for f in fields]
            if not out and tuple(f.lower() for f in fields) in headers:
                continue
            if len(fields) != len(columns):
                raise TracerError(f"{path}:{lineno}: expected {len(columns)} columns ({', '.join(columns)}), "
                                  f"got {len(fields)}")
            for name, value in zip(columns, fields):
                if not value:
                    raise TracerError(f"{path}:{lineno}: empty {name}")
            out.append((lineno, fields))
    except csv.Error as exc:
        raise TracerError(f"{path}:{reader.line_num}: {exc}") from None
    return out


def entity_id(name: str) -> str:
    """An id the trace syntax keeps whole: whitespace and '->' become _, edge punctuation is dropped."""
    return re.sub(r"\s+", "_", name.strip()).replace("->", "_").strip(NODE_TRIM)


def relation_id(name: str) -> str:
    """A relation id the trace syntax reads (`-rel->`): letters, digits and _."""
    return re.sub(f"[^{RELATION_CHARS}]+", "_", name.strip()).strip("_")


class _Ids:
    """Names to ids, refusing two names that end up as one id."""

    def __init__(self, path: str | Path, make, what: str):
        self.path, self.make, self.what = path, make, what
        self.label: dict[str, str] = {}

    def __call__(self, name: str, lineno: int) -> str:
        i = self.make(name)
        if not i:
            raise TracerError(f"{self.path}:{lineno}: {self.what} {name!r} has no letters or digits to make an id of")
        other = self.label.setdefault(i, name)
        if other != name:
            raise TracerError(f"{self.path}:{lineno}: {self.what} names {other!r} and {name!r} both become id {i!r}")
        return i


def read_triples(path: str | Path) -> tuple[dict[str, str], dict[str, str], list[tuple[str, str, str]], list[str]]:
    """``(entity id -> name, relation id -> name, (src, rel, dst) triples, notes)`` of a triples
    file; duplicate triples and self-loops are dropped and noted."""
    ent, rel = _Ids(path, entity_id, "entity"), _Ids(path, relation_id, "relation")
    edges: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    dup = loops = 0
    for lineno, (h, r, t) in _rows(path, ("head", "relation", "tail"), TRIPLE_HEADERS):
        e = (ent(h, lineno), rel(r, lineno), ent(t, lineno))
        if e[0] == e[2]:
            loops += 1
        elif e in seen:
            dup += 1
        else:
            seen.add(e)
            edges.append(e)
    if not edges:
        raise TracerError(f"{path}: no edges (expected rows of head, relation, tail)")
    notes = []
    if dup:
        notes.append(f"{dup} duplicate triple(s) dropped")
    if loops:
        notes.append(f"{loops} self-loop(s) dropped")
    return ent.label, rel.label, edges, notes


def read_types(path: str | Path, entities: dict[str, str]) -> dict[str, str]:
    """``entity -> type`` from a two-column .tsv/.csv file (entity, type; names as in the KG file)."""
    if Path(path).suffix.lower() not in TRIPLE_SUFFIXES:
        raise TracerError(f"{path}: unknown types file format {Path(path).suffix or '(none)'!r} "
                          f"(expected .tsv or .csv with columns entity, type)")
    known = {name: i for i, name in entities.items()} | {i: i for i in entities}
    types: dict[str, str] = {}
    for lineno, (name, typ) in _rows(path, ("entity", "type"), TYPE_HEADERS):
        eid = known.get(name)
        if eid is None:
            raise TracerError(f"{path}:{lineno}: unknown entity {name!r}")
        if types.setdefault(eid, typ) != typ:
            raise TracerError(f"{path}:{lineno}: entity {name!r} has two types, {types[eid]!r} and {typ!r}")
    return types
