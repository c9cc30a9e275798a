"""A synthetic troubleshooting-shaped KG for the dataset tests, and where the shipped one lies."""

from __future__ import annotations

import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_KG = ROOT / "data" / "kg.json"
RELATIONS = ["caused_by", "leads_to", "diagnosed_by", "fixed_by", "uses_tool", "related_to"]


def synth_kg_dict(n_sym=40, n_cause=40, n_diag=20, n_fix=30, n_tool=15, seed=0, extra_edges=()):
    """A troubleshooting-shaped KG: functional per (src, rel) unless ``extra_edges`` add more."""
    rng = random.Random(seed)
    entities = []

    def make(prefix, n, etype):
        ids = [f"{prefix}{i:02d}" for i in range(n)]
        entities.extend({"id": i, "label": i, "type": etype} for i in ids)
        return ids

    syms = make("Sym", n_sym, "symptom")
    causes = make("Cause", n_cause, "cause")
    diags = make("Diag", n_diag, "diagnostic")
    fixes = make("Fix", n_fix, "fix")
    tools = make("Tool", n_tool, "tool")
    edges = set()
    for s in syms:
        edges.add((s, "caused_by", rng.choice(causes)))
        edges.add((s, "diagnosed_by", rng.choice(diags)))
        if rng.random() < 0.5:
            edges.add((s, "related_to", rng.choice([x for x in syms if x != s])))
    for c in causes:
        edges.add((c, "leads_to", rng.choice(syms)))
        edges.add((c, "fixed_by", rng.choice(fixes)))
    for d in diags:
        edges.add((d, "uses_tool", rng.choice(tools)))
    for f in fixes:
        edges.add((f, "uses_tool", rng.choice(tools)))
    edges.update(extra_edges)
    return {
        "version": "1",
        "domain": "test",
        "entities": entities,
        "relations": [{"id": r, "label": r.replace("_", " ")} for r in RELATIONS],
        "edges": [{"src": a, "rel": b, "dst": c} for a, b, c in sorted(edges)],
    }
