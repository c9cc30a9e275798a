"""Renamed (counterfactual) copies of facts-mode questions: the same chain shape, stated by facts
that contradict the KG, so only reading the prompt's facts answers them (pure Python)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from tracer.dataset.paths import path_key
from tracer.dataset.templates import render_question
from tracer.format import build_prompt, format_fact, parse_fact, reference_trace

if TYPE_CHECKING:  # pragma: no cover
    from tracer.kg import KG


def rename_row(kg: "KG", row: dict[str, Any], mapping: dict[str, str], new_id: str) -> dict[str, Any]:
    """A copy of a facts-mode row with every entity renamed by ``mapping`` (question, options,
    facts, path and reference trace alike): the same chain shape, stated by facts that contradict
    the KG, so only reading the prompt's facts answers it."""
    def m(e: str) -> str:
        return mapping.get(e, e)

    ps, meta = row["path_star"], row["meta"]
    ents = [m(e) for e in ps["entities"]]
    edges = [{"src": m(e["src"]), "rel": e["rel"], "dst": m(e["dst"])} for e in ps["edges"]]
    facts = []
    for f in meta["facts"]:
        src, rel, dst = parse_fact(f)
        facts.append(format_fact((m(src), rel, m(dst))))
    options = {L: m(v) for L, v in row["options"].items()}
    question = render_question(kg, ents[0], meta["relations"], meta["template"])
    tags = meta.get("option_tags", False)
    return {
        **row,
        "id": new_id,
        "question": question,
        "options": options,
        "path_star": {"entities": ents, "edges": edges},
        "prompt": build_prompt(question, options, facts, tags),
        "ref": {"trace": reference_trace(ents, edges, row["answer_star"], tags)},
        "meta": dict(meta, facts=facts, counterfactual=True, renamed_from=row["id"]),
    }


def _row_entities(row: dict[str, Any]) -> set[str]:
    """Every entity a row names: its path, options and facts."""
    names = set(row["path_star"]["entities"]) | set(row["options"].values())
    for f in row["meta"]["facts"]:
        src, _, dst = parse_fact(f)
        names |= {src, dst}
    return names


def _suffix_mapping(kg: "KG", row: dict[str, Any], by_type: dict[str, list[str]], rng: random.Random) -> dict[str, str]:
    """Rename the path's entities after a random hop (the start kept, the answer always renamed)
    to entities of the same type that the row does not name, so the names stay unambiguous."""
    ents = row["path_star"]["entities"]
    used = _row_entities(row)
    mapping: dict[str, str] = {}
    for e in ents[rng.randrange(1, len(ents)):]:
        if e in mapping or e == ents[0]:
            continue
        free = [x for x in by_type[kg.entities[e].type] if x not in used]
        if not free:
            return {}
        mapping[e] = rng.choice(free)
        used.add(mapping[e])
    return mapping


def counterfactual_rows(kg: "KG", rows: list[dict[str, Any]], share: float, rng: random.Random,
                        held: set[tuple[str, tuple[str, ...], str]], mode: str = "start") -> list[dict[str, Any]]:
    """Renamed copies of ``share`` of the facts-mode ``rows``, redrawn until the KG itself does not
    lead from the new start to the new answer (memory gives a wrong answer) and the path is none of
    the ``held`` (eval, RSFT-pool) paths. ``mode`` "start": every entity permuted within its type;
    "any_hop": the hops up to a random one stay real (:func:`_suffix_mapping`)."""
    by_type: dict[str, list[str]] = {}
    for eid in sorted(kg.entities):
        by_type.setdefault(kg.entities[eid].type, []).append(eid)
    out = []
    for i, row in enumerate(rng.sample(rows, round(share * len(rows))), 1):
        for _ in range(100):
            if mode == "any_hop":
                mapping = _suffix_mapping(kg, row, by_type, rng)
                if not mapping:
                    continue
            else:
                mapping = {}
                for ids in by_type.values():
                    perm = list(ids)
                    rng.shuffle(perm)
                    mapping.update(zip(ids, perm))
            new = rename_row(kg, row, mapping, f"{row['split']}-cf-{i:05d}")
            start, rels, answer = path_key(new)
            if answer not in kg.follow(start, list(rels)) and (start, rels, answer) not in held:
                out.append(new)
                break
    return out

