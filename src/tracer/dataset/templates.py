"""Question templates: the words a question is asked in, per relation chain (pure Python)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tracer.kg import KG

ONE_HOP_TEMPLATES: dict[str, list[str]] = {
    "caused_by": [
        "What is `{x}` caused by?",
        "Which entity causes `{x}`?",
        "`{x}` is caused by which entity?",
        "Start from `{x}`. Follow caused_by. Which entity do you reach?",
    ],
    "leads_to": [
        "What does `{x}` lead to?",
        "`{x}` leads to which entity?",
        "Which entity is a consequence of `{x}`?",
        "Start from `{x}`. Follow leads_to. Which entity do you reach?",
    ],
    "diagnosed_by": [
        "What is `{x}` diagnosed by?",
        "Which entity diagnoses `{x}`?",
        "`{x}` is diagnosed by which entity?",
        "Start from `{x}`. Follow diagnosed_by. Which entity do you reach?",
    ],
    "fixed_by": [
        "What is `{x}` fixed by?",
        "Which entity fixes `{x}`?",
        "`{x}` is fixed by which entity?",
        "Start from `{x}`. Follow fixed_by. Which entity do you reach?",
    ],
    "uses_tool": [
        "Which tool does `{x}` use?",
        "What tool is used by `{x}`?",
        "`{x}` uses which tool?",
        "Start from `{x}`. Follow uses_tool. Which entity do you reach?",
    ],
    "related_to": [
        "What is `{x}` related to?",
        "Which entity is `{x}` related to?",
        "`{x}` is related to which entity?",
        "Start from `{x}`. Follow related_to. Which entity do you reach?",
    ],
}

GENERIC_ONE_HOP_TEMPLATES = [
    "Start from `{x}` and follow '{label}'. Which entity do you reach?",
    "From `{x}`, which entity is reached via {label}?",
    "`{x}` -{rel}-> ? Which entity is it?",
]

CHAIN_TEMPLATES = [
    "Start from `{x}`. Follow {labels_then}. Which entity do you reach?",
    "Begin at `{x}` and follow these relations in order: {labels_semi}. Where do you end up?",
    "From `{x}`, which entity do you reach via {labels_and}?",
    "Chain: `{x}` {rel_chain}. Which entity ends the chain?",
    "Follow the chain {rels_arrow} starting at `{x}`. Which entity is at the end?",
]


def _label(kg: "KG", rel: str) -> str:
    r = kg.relations.get(rel)
    label = getattr(r, "label", None) if r is not None else None
    return label or rel.replace("_", " ")


def templates_for(rels: tuple[str, ...]) -> list[str]:
    if len(rels) == 1:
        return ONE_HOP_TEMPLATES.get(rels[0], GENERIC_ONE_HOP_TEMPLATES)
    return CHAIN_TEMPLATES


def render_question(kg: "KG", start: str, rels: tuple[str, ...] | list[str], template: int) -> str:
    """The question text for a start entity and relation chain (template index mod count)."""
    rels = tuple(rels)
    templates = templates_for(rels)
    t = templates[template % len(templates)]
    labels = [_label(kg, r) for r in rels]
    if len(rels) == 1:
        return t.format(x=start, label=labels[0], rel=rels[0])
    return t.format(
        x=start,
        labels_then=", then ".join(labels),
        labels_semi="; ".join(labels),
        labels_and=", ".join(labels[:-1]) + " and " + labels[-1],
        rel_chain=" ".join(f"-{r}-> ?" for r in rels),
        rels_arrow=" -> ".join(rels),
    )

