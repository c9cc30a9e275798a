"""One question row from a path: the answer's letter, three near-miss distractors the chain does
not reach, the facts of a facts-mode prompt, the prompt and the reference trace (pure Python).

Every random choice comes from the :class:`QuestionContext`'s generator, in a fixed order.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Iterable

from tracer.dataset.paths import Path_, unique_edges
from tracer.dataset.templates import render_question
from tracer.errors import TracerError
from tracer.format import LETTERS, build_prompt, format_fact, frontier_trace, reference_trace

if TYPE_CHECKING:  # pragma: no cover
    from tracer.config import DataConfig
    from tracer.kg import KG


class QuestionContext:
    """Caches shared by every question of one generation run."""

    def __init__(self, kg: "KG", cfg: "DataConfig", rng: random.Random):
        self.kg = kg
        self.cfg = cfg
        self.rng = rng
        self.rel_ids = sorted(kg.relations)
        self.entity_ids = sorted(kg.entities)
        self.by_type: dict[str, list[str]] = {}
        for eid in self.entity_ids:
            self.by_type.setdefault(kg.entities[eid].type, []).append(eid)
        self.incident: dict[str, list[tuple[str, str, str]]] = {}
        for e in unique_edges(kg):
            self.incident.setdefault(e[0], []).append(e)
            if e[2] != e[0]:
                self.incident.setdefault(e[2], []).append(e)
        for v in self.incident.values():
            v.sort()
        self._nb: dict[str, list[str]] = {}
        self._near: dict[tuple[str, str], list[str]] = {}
        self._follow: dict[tuple[str, tuple[str, ...]], frozenset[str]] = {}

    def neighbors(self, x: str) -> list[str]:
        n = self._nb.get(x)
        if n is None:
            n = sorted(self.kg.neighbors(x))
            self._nb[x] = n
        return n

    def near(self, ents: Iterable[str], typ: str) -> list[str]:
        """Entities of type ``typ`` within two undirected hops of any of ``ents``, sorted."""
        out: set[str] = set()
        for x in ents:
            n = self._near.get((x, typ))
            if n is None:
                two = set(self.neighbors(x))
                for y in self.neighbors(x):
                    two.update(self.neighbors(y))
                n = self._near[(x, typ)] = [e for e in two if self.kg.entities[e].type == typ]
            out.update(n)
        return sorted(out)

    def step(self, frontier: Iterable[str], rel: str) -> set[str]:
        """Entities one ``rel`` edge away from any of ``frontier``."""
        return {d for x in frontier for d in self.kg.targets(x, rel)}

    def answerable(self, p: Path_) -> bool:
        """At least three entities besides the start lie outside what the chain reaches."""
        ents, rels = p
        reach = self.follow(ents[0], rels)
        return len(self.entity_ids) - len(reach) - (ents[0] not in reach) >= 3

    def follow(self, start: str, rels: tuple[str, ...]) -> frozenset[str]:
        k = (start, rels)
        r = self._follow.get(k)
        if r is None:
            r = frozenset(self.kg.follow(start, list(rels)))
            self._follow[k] = r
        return r


def _pick_distractors(ctx: QuestionContext, ents: tuple[str, ...], rels: tuple[str, ...]) -> list[str]:
    """Three near misses: same type as the answer and close to the path, never reachable."""
    kg, rng = ctx.kg, ctx.rng
    start, answer = ents[0], ents[-1]
    reach = ctx.follow(start, rels)
    banned = set(reach) | {start, answer}
    a_type = kg.entities[answer].type

    # tier 0: reached by the chain with one relation swapped
    one_off: set[str] = set()
    prefix = {start}
    for i in range(len(rels)):
        for r in ctx.rel_ids:
            if r == rels[i]:
                continue
            frontier = ctx.step(prefix, r)
            for rel in rels[i + 1:]:
                frontier = ctx.step(frontier, rel)
            one_off |= frontier
        prefix = ctx.step(prefix, rels[i])
    same_type = ctx.by_type.get(a_type, [])
    tiers = (  # lazily: most questions are settled by the first tiers
        lambda: sorted(e for e in one_off if kg.entities[e].type == a_type),
        lambda: ctx.near(ents, a_type),  # within two undirected hops of the path
        lambda: same_type,
        lambda: ctx.entity_ids,
    )
    chosen: list[str] = []
    taken: set[str] = set()
    for tier in tiers:
        cands = [e for e in tier() if e not in banned and e not in taken]
        need = 3 - len(chosen)
        if not cands:
            continue
        picks = rng.sample(cands, need) if len(cands) > need else list(cands)
        rng.shuffle(picks)
        chosen.extend(picks)
        taken.update(picks)
        if len(chosen) == 3:
            return chosen
    raise TracerError(
        f"KG too small: cannot find 3 distractors for {start} -{'-> ? -'.join(rels)}-> {answer} "
        f"that the chain does not reach"
    )


def _pick_facts(ctx: QuestionContext, ents: tuple[str, ...], rels: tuple[str, ...], distractors: list[str]) -> list[str]:
    gold = [(ents[i], rels[i], ents[i + 1]) for i in range(len(rels))]
    gold_set = set(gold)
    cands: set[tuple[str, str, str]] = set()
    for x in list(ents) + list(distractors):
        for e in ctx.incident.get(x, []):
            if e not in gold_set:
                cands.add(e)
    room = max(0, ctx.cfg.max_facts - len(gold))
    pool = sorted(cands)
    extra = ctx.rng.sample(pool, room) if len(pool) > room else pool
    facts = gold + extra
    ctx.rng.shuffle(facts)
    return [format_fact(e) for e in facts]


def make_row(ctx: QuestionContext, p: Path_, letter: str, template: int, split: str) -> dict[str, Any]:
    ents, rels = p
    distractors = _pick_distractors(ctx, ents, rels)
    others = [L for L in LETTERS if L != letter]
    options_map = {letter: ents[-1]}
    for L, d in zip(others, distractors):
        options_map[L] = d
    options = {L: options_map[L] for L in LETTERS}
    edges = [{"src": ents[i], "rel": rels[i], "dst": ents[i + 1]} for i in range(len(rels))]
    question = render_question(ctx.kg, ents[0], rels, template)
    tags = ctx.cfg.option_tags
    meta: dict[str, Any] = {"relations": list(rels), "context": ctx.cfg.context, "template": template}
    if tags:
        meta["option_tags"] = True
    facts = None
    if ctx.cfg.context == "facts":
        facts = _pick_facts(ctx, ents, rels, distractors)
        meta["facts"] = facts
    return {
        "id": "",
        "split": split,
        "hop_len": len(rels),
        "question": question,
        "options": options,
        "answer_star": letter,
        "path_star": {"entities": list(ents), "edges": edges},
        "prompt": build_prompt(question, options, facts, tags),
        "ref": {"trace": frontier_trace(ents[0], list(rels), ctx.kg.targets, letter, ents[-1] if tags else None)
                if ctx.cfg.trace == "frontier" else reference_trace(list(ents), edges, letter, tags)},
        "meta": meta,
    }

