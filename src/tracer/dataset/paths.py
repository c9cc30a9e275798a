"""Question paths in a KG: every (start, relation chain, end) key a simple path reaches, listed by a
sorted DFS or, on a graph too dense to list, sampled by random walks; each with its canonical path.

Pure Python. A path is ``(entities, relations)``; a question key is ``(start, relations, end)``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tracer.format import edge_tuple

if TYPE_CHECKING:  # pragma: no cover
    from tracer.kg import KG

Path_ = tuple[tuple[str, ...], tuple[str, ...]]  # (entities, relations)
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def path_key(row: dict[str, Any]) -> tuple[str, tuple[str, ...], str]:
    """(start entity, relation chain, answer entity) of an example row."""
    ps = row["path_star"]
    ents = ps["entities"]
    edges = ps.get("edges") or []
    if edges:
        rels = tuple(edge_tuple(e)[1] for e in edges)
    else:
        rels = tuple((row.get("meta") or {}).get("relations") or ())
    return (ents[0], rels, ents[-1])


def asked(key: tuple[str, tuple[str, ...], str]) -> tuple[str, tuple[str, ...]]:
    """What a question with this :func:`path_key` asks: its start and relation chain. On a
    many-to-many graph several keys ask the same, each with another answer, and a frontier trace
    (the chain's whole reach) is the same for all of them."""
    return key[0], key[1]


def passes_through(key: tuple[str, tuple[str, ...], str], questions: set[tuple[str, tuple[str, ...]]]) -> bool:
    """Whether a question with this :func:`path_key` asks, or passes through, one of ``questions``
    (:func:`asked` tuples): its start with its whole relation chain or a leading part of it. A
    longer chain's trace, its path or its frontiers, runs through the shorter question's whole
    chain and reaches its answer on the way, so training on it teaches that question's answer."""
    start, rels = key[0], key[1]
    return any((start, rels[:k]) in questions for k in range(1, len(rels) + 1))


def question_key(p: Path_) -> tuple[str, tuple[str, ...], str]:
    """(start entity, relation chain, answer entity) of a path."""
    ents, rels = p
    return (ents[0], rels, ents[-1])


def unique_edges(kg: "KG") -> list[tuple[str, str, str]]:
    """The KG's distinct (src, rel, dst) triples, in file order."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for e in kg.edges:
        t = edge_tuple(e)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


PATH_BUDGET = 400_000  # DFS extensions before enumeration gives way to sampling (the public graph needs 100k)


def _step_table(kg: "KG") -> Callable[[str], list[tuple[str, str]]]:
    """``x -> sorted (relation, target)`` pairs of the edges leaving x (cached)."""
    cache: dict[str, list[tuple[str, str]]] = {}

    def steps(x: str) -> list[tuple[str, str]]:
        s = cache.get(x)
        if s is None:
            s = cache[x] = sorted({(e.rel, e.dst) for e in kg.out_edges(x)})
        return s
    return steps


def enumerate_paths(kg: "KG", hops: Iterable[int], budget: int = PATH_BUDGET) -> dict[int, list[Path_]] | None:
    """Every question key (start, relation chain, end) of the given hop lengths that a simple path
    reaches, each with the first simple path of a sorted DFS: the path whose targets are
    lexicographically smallest, :func:`canonical_path`. Keys come in order of discovery (starts
    sorted, then relations, then targets). On a graph where every (entity, relation) has one target
    the path is the only one and these are exactly the deterministic paths.

    Returns None when the DFS would extend more than ``budget`` paths: the graph is too dense to
    list, and :func:`sample_paths` draws from it instead.
    """
    wanted = sorted({h for h in hops if h >= 1})
    found: dict[int, dict[tuple[str, tuple[str, ...], str], Path_]] = {h: {} for h in wanted}
    if not wanted:
        return {}
    max_h, wanted_set = wanted[-1], set(wanted)
    steps = _step_table(kg)
    left = budget

    def dfs(ents: list[str], rels: list[str]) -> bool:
        nonlocal left
        d = len(rels)
        if d in wanted_set:
            found[d].setdefault((ents[0], tuple(rels), ents[-1]), (tuple(ents), tuple(rels)))
        if d == max_h:
            return True
        for rel, y in steps(ents[-1]):
            if y in ents:
                continue
            left -= 1
            if left < 0:
                return False
            ents.append(y)
            rels.append(rel)
            ok = dfs(ents, rels)
            ents.pop()
            rels.pop()
            if not ok:
                return False
        return True

    for start in sorted(kg.entities):
        if not dfs([start], []):
            return None
    return {h: list(found[h].values()) for h in wanted}


def canonical_path(kg: "KG", start: str, rels: tuple[str, ...], end: str) -> tuple[str, ...] | None:
    """The simple path start -rels-> end whose targets are lexicographically smallest (None if no
    simple path exists): the reference trace of a question, whichever way it was found."""
    back: list[set[str]] = [set() for _ in rels] + [{end}]
    for i in range(len(rels) - 1, -1, -1):
        back[i] = {s for d in back[i + 1] for s in kg.sources(d, rels[i])}

    def dfs(ents: list[str]) -> tuple[str, ...] | None:
        i = len(ents) - 1
        if i == len(rels):
            return tuple(ents)
        for t in sorted(set(kg.targets(ents[-1], rels[i]))):
            if t in back[i + 1] and t not in ents:
                found = dfs(ents + [t])
                if found:
                    return found
        return None

    return dfs([start]) if start in back[0] else None


def sample_paths(kg: "KG", want: dict[int, int], rng: random.Random,
                 progress: Progress | None = None) -> dict[int, list[Path_]]:
    """Up to ``want[h]`` distinct question keys per hop length h, drawn by random walks along
    simple paths from start entities taken round-robin in a shuffled order (so every entity with
    an edge out starts about as many walks). Each key gets its :func:`canonical_path`."""
    steps = _step_table(kg)
    starts = sorted(x for x in kg.entities if steps(x))
    out: dict[int, list[Path_]] = {}
    for h in sorted(want):
        found: dict[tuple[str, tuple[str, ...], str], Path_] = {}
        order = list(starts)
        rng.shuffle(order)
        tries = 20 * want[h] + len(order)
        for i in range(tries):
            if len(found) >= want[h]:
                break
            if progress and i % 1000 == 0:
                progress(f"{h}-hop paths", len(found), want[h])
            ents, rels = [order[i % len(order)]], []
            while len(rels) < h:
                choices = [(r, y) for r, y in steps(ents[-1]) if y not in ents]
                if not choices:
                    break
                r, y = rng.choice(choices)
                ents.append(y)
                rels.append(r)
            key = (ents[0], tuple(rels), ents[-1])
            if len(rels) == h and key not in found:
                found[key] = (canonical_path(kg, *key), tuple(rels))
        out[h] = list(found.values())
    return out

