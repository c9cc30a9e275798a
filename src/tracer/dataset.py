"""Question generation from KG paths, splits, JSONL I/O, summary (prompts and traces: :mod:`tracer.format`).

Pure Python (stdlib only).  Every random choice comes from one ``random.Random(cfg.seed)``
consumed in a fixed order, and every set is sorted before anything is chosen from it, so the
same seed and KG give byte-identical files.

A question names a start entity and a relation chain. On a many-to-many graph the chain may reach
several entities; exactly one of the four options is among them (the answer), and the three
distractors are near misses the chain does not reach (``kg.follow``). The reference trace is the
chain's lexicographically smallest simple path to the answer (:func:`canonical_path`). On a graph
where every (entity, relation) has one target that path is the only one.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from tracer.errors import TracerError
from tracer.format import ANSWER_TAG  # noqa: F401  (pipeline.rsft reads dataset.ANSWER_TAG)
from tracer.format import LETTERS, build_prompt, edge_tuple, format_fact, is_fact, parse_fact, reference_trace
from tracer.runs import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from tracer.config import DataConfig
    from tracer.kg import KG

SPLIT_FILES = ("train", "rsft", "eval", "eval_shuffled")
DEFAULT_MIN_EDGE_COVERAGE = 3


# ---------------------------------------------------------------------------------------------
# Question templates
# ---------------------------------------------------------------------------------------------

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


def _templates_for(rels: tuple[str, ...]) -> list[str]:
    if len(rels) == 1:
        return ONE_HOP_TEMPLATES.get(rels[0], GENERIC_ONE_HOP_TEMPLATES)
    return CHAIN_TEMPLATES


def render_question(kg: "KG", start: str, rels: tuple[str, ...] | list[str], template: int) -> str:
    """The question text for a start entity and relation chain (template index mod count)."""
    rels = tuple(rels)
    templates = _templates_for(rels)
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


# ---------------------------------------------------------------------------------------------
# Path enumeration
# ---------------------------------------------------------------------------------------------

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


def _key(p: Path_) -> tuple[str, tuple[str, ...], str]:
    ents, rels = p
    return (ents[0], rels, ents[-1])


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


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


class _Ctx:
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
        for e in _unique_edges(kg):
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

    def answerable(self, p: "Path_") -> bool:
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


def _unique_edges(kg: "KG") -> list[tuple[str, str, str]]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for e in kg.edges:
        t = edge_tuple(e)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _pick_distractors(ctx: _Ctx, ents: tuple[str, ...], rels: tuple[str, ...]) -> list[str]:
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


def _pick_facts(ctx: _Ctx, ents: tuple[str, ...], rels: tuple[str, ...], distractors: list[str]) -> list[str]:
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


def _make_row(ctx: _Ctx, p: Path_, letter: str, template: int, split: str) -> dict[str, Any]:
    ents, rels = p
    distractors = _pick_distractors(ctx, ents, rels)
    others = [L for L in LETTERS if L != letter]
    options_map = {letter: ents[-1]}
    for L, d in zip(others, distractors):
        options_map[L] = d
    options = {L: options_map[L] for L in LETTERS}
    edges = [{"src": ents[i], "rel": rels[i], "dst": ents[i + 1]} for i in range(len(rels))]
    question = render_question(ctx.kg, ents[0], rels, template)
    meta: dict[str, Any] = {"relations": list(rels), "context": ctx.cfg.context, "template": template}
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
        "prompt": build_prompt(question, options, facts),
        "ref": {"trace": reference_trace(list(ents), edges, letter)},
        "meta": meta,
    }


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
    return {
        **row,
        "id": new_id,
        "question": question,
        "options": options,
        "path_star": {"entities": ents, "edges": edges},
        "prompt": build_prompt(question, options, facts),
        "ref": {"trace": reference_trace(ents, edges, row["answer_star"])},
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


def _letter_stream(rng: random.Random) -> Iterator[str]:
    """Gold letters in shuffled ABCD blocks: every letter within one of n/4 at any prefix."""
    while True:
        block = list(LETTERS)
        rng.shuffle(block)
        yield from block


def _shuffle_row(row: dict[str, Any], rng: random.Random, counts: Counter) -> dict[str, Any]:
    """Permute the options of an eval row so the gold letter changes (balanced over the split)."""
    old = row["answer_star"]
    gold = row["options"][old]
    choices = [L for L in LETTERS if L != old]
    low = min(counts[L] for L in choices)
    new = rng.choice([L for L in choices if counts[L] == low])
    counts[new] += 1
    distractors = [row["options"][L] for L in LETTERS if L != old]
    rng.shuffle(distractors)
    it = iter(distractors)
    options = {L: (gold if L == new else next(it)) for L in LETTERS}
    meta = dict(row["meta"])
    meta["shuffled_from"] = row["id"]
    ps = row["path_star"]
    return {
        "id": row["id"] + "-shuf",
        "split": "eval_shuffled",
        "hop_len": row["hop_len"],
        "question": row["question"],
        "options": options,
        "answer_star": new,
        "path_star": {"entities": list(ps["entities"]), "edges": [dict(e) for e in ps["edges"]]},
        "prompt": build_prompt(row["question"], options, meta.get("facts")),
        "ref": {"trace": reference_trace(ps["entities"], ps["edges"], new)},
        "meta": meta,
    }


def _even_quota(total: int, hops: list[int], avail: dict[int, int]) -> dict[int, int]:
    """Split ``total`` over ``hops`` as evenly as the available counts allow."""
    quota = {h: 0 for h in hops}
    left = total
    open_hops = [h for h in hops if avail[h] > 0]
    while left > 0 and open_hops:
        share, extra = divmod(left, len(open_hops))
        progressed = False
        for i, h in enumerate(open_hops):
            want = share + (1 if i < extra else 0)
            take = min(want, avail[h] - quota[h])
            if take > 0:
                quota[h] += take
                left -= take
                progressed = True
        open_hops = [h for h in open_hops if quota[h] < avail[h]]
        if not progressed:
            break
    return quota


def question_pools(kg: "KG", cfg: "DataConfig", hops: list[int], ctx: "_Ctx | None" = None,
                   progress: Progress | None = None) -> tuple[dict[int, list[Path_]], bool]:
    """Answerable question paths per hop length, and whether they were sampled (the graph too
    dense to list every path: :func:`sample_paths` draws about twice what ``cfg`` needs)."""
    ctx = ctx or _Ctx(kg, cfg, random.Random(cfg.seed))
    pools = enumerate_paths(kg, hops)
    sampled = pools is None
    if sampled:
        per_eval_hop = -(-(cfg.eval_size + cfg.rsft_size) // max(1, len(cfg.eval_hops)))
        want = {h: 2 * max(per_eval_hop if h in cfg.eval_hops else 0, int(cfg.train_per_hop.get(str(h), 0))) + 100
                for h in hops}
        pools = sample_paths(kg, want, random.Random(f"{cfg.seed}:paths"), progress)
    return {h: [p for p in ps if ctx.answerable(p)] for h, ps in pools.items()}, sampled


def question_counts(kg: "KG", cfg: "DataConfig", hops: Iterable[int] = range(1, 6)) -> dict[str, Any]:
    """Distinct answerable questions (start, chain, answer) per hop length, what ``cfg`` needs of
    each, and whether the counts are a sample's (a lower bound: the graph is too dense to list)."""
    hops = sorted(set(hops))
    pools, sampled = question_pools(kg, cfg, hops)
    need = {h: int(cfg.train_per_hop.get(str(h), 0)) for h in hops}
    for h in hops:
        if h in cfg.eval_hops:
            need[h] += -(-(cfg.eval_size + cfg.rsft_size) // len(cfg.eval_hops))
    if 1 in cfg.train_hops and 1 in need:
        need[1] = max(need[1], len(_unique_edges(kg)))
    return {"hops": {h: len(pools[h]) for h in hops}, "need": need, "sampled": sampled}


def generate_splits(
    kg: "KG", cfg: "DataConfig", exclude: frozenset[tuple[str, tuple[str, ...], str]] = frozenset(),
    progress: Progress | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Build the train / rsft / eval (/ eval_shuffled) splits; every rule is verified.

    ``exclude`` holds :func:`path_key` keys that no question of any split may take;
    ``progress(stage, done, total)`` is called as rows are built.
    """
    rng = random.Random(cfg.seed)
    ctx = _Ctx(kg, cfg, rng)
    train_hops = sorted(set(cfg.train_hops))
    eval_hops = sorted(set(cfg.eval_hops))
    if len(kg.entities) < 4:
        raise TracerError(f"KG has {len(kg.entities)} entities; 4 options need at least 4")
    if cfg.context == "facts":
        longest = max(train_hops + eval_hops)
        if cfg.max_facts < longest:
            raise TracerError(
                f"data.max_facts={cfg.max_facts} cannot hold the {longest} gold edges of a {longest}-hop path"
            )

    multi = sorted({h for h in train_hops if h > 1} | set(eval_hops))
    pools, _ = question_pools(kg, cfg, multi, ctx, progress)
    if exclude:
        pools = {h: [p for p in ps if _key(p) not in exclude] for h, ps in pools.items()}
    edges_1 = _unique_edges(kg)

    # ---- eval and rsft: distinct keys, hop lengths mixed evenly -------------------------------
    shuffled = {h: list(pools[h]) for h in eval_hops}
    for h in eval_hops:
        rng.shuffle(shuffled[h])
    avail = {h: len(shuffled[h]) for h in eval_hops}
    q_eval = _even_quota(cfg.eval_size, eval_hops, avail)
    if sum(q_eval.values()) < cfg.eval_size:
        have = ", ".join(f"{avail[h]} {h}-hop" for h in eval_hops)
        raise TracerError(
            f"KG has only {have} answerable paths; data.eval_size={cfg.eval_size} needs more "
            f"(add edges, lower eval_size, or change eval_hops; `tracer kg stats` counts them)"
        )
    eval_paths: list[Path_] = []
    for h in eval_hops:
        eval_paths.extend(shuffled[h][: q_eval[h]])
        shuffled[h] = shuffled[h][q_eval[h]:]
    avail = {h: len(shuffled[h]) for h in eval_hops}
    q_rsft = _even_quota(cfg.rsft_size, eval_hops, avail)
    rsft_paths: list[Path_] = []
    for h in eval_hops:
        rsft_paths.extend(shuffled[h][: q_rsft[h]])
    if cfg.rsft_size > 0 and not rsft_paths:
        raise TracerError(
            f"no {'/'.join(map(str, eval_hops))}-hop paths left for the RSFT pool after "
            f"{cfg.eval_size} eval questions (lower data.eval_size or set data.rsft_size=0)"
        )
    rng.shuffle(eval_paths)
    rng.shuffle(rsft_paths)
    held = {_key(p) for p in eval_paths} | {_key(p) for p in rsft_paths} | exclude

    # ---- train: multi-hop quotas, then 1-hop questions until every edge is covered ------------
    items: list[tuple[Path_, int]] = []  # (path, template)
    coverage: Counter = Counter()
    for h in train_hops:
        if h == 1:
            continue
        n = int(cfg.train_per_hop.get(str(h), 0))
        if n <= 0:
            continue
        pool = [p for p in pools[h] if _key(p) not in held]
        if not pool:
            raise TracerError(f"KG has no answerable {h}-hop paths left for training (train_per_hop['{h}']={n})")
        order: list[Path_] = []
        while len(order) < n:
            batch = list(pool)
            rng.shuffle(batch)
            order.extend(batch)
        uses: Counter = Counter()
        for p in order[:n]:
            k = _key(p)
            n_t = len(_templates_for(p[1]))
            items.append((p, (uses[k] + rng.randrange(n_t)) % n_t))
            uses[k] += 1
            ents, rels = p
            for i in range(len(rels)):
                coverage[(ents[i], rels[i], ents[i + 1])] += 1
    if 1 in train_hops:
        for s, r, d in edges_1:
            if s == d:
                continue
            p: Path_ = ((s, d), (r,))
            if _key(p) in held:
                continue
            need = max(1, cfg.min_edge_coverage - coverage[(s, r, d)])
            n_t = len(_templates_for((r,)))
            base = rng.randrange(n_t)
            for k in range(need):
                items.append((p, (base + k) % n_t))
            coverage[(s, r, d)] += need
    rng.shuffle(items)

    # ---- build rows --------------------------------------------------------------------------
    def build(paths: list[tuple[Path_, int]], split: str) -> list[dict[str, Any]]:
        letters = _letter_stream(rng)
        rows = []
        for i, (p, t) in enumerate(paths, 1):
            if progress and i % 500 == 1:
                progress(f"{split} questions", i - 1, len(paths))
            row = _make_row(ctx, p, next(letters), t, split)
            row["id"] = f"{split}-{i:05d}"
            rows.append(row)
        return rows

    def with_templates(paths: list[Path_]) -> list[tuple[Path_, int]]:
        return [(p, rng.randrange(len(_templates_for(p[1])))) for p in paths]

    splits: dict[str, list[dict[str, Any]]] = {
        "train": build(items, "train"),
        "rsft": build(with_templates(rsft_paths), "rsft"),
        "eval": build(with_templates(eval_paths), "eval"),
    }
    if cfg.shuffled_eval:
        counts: Counter = Counter()
        splits["eval_shuffled"] = [_shuffle_row(r, rng, counts) for r in splits["eval"]]
    verify_splits(kg, splits, cfg)
    # renamed copies draw from their own generators: without them the splits above stay as they are
    held_keys = {path_key(r) for r in splits["eval"] + splits["rsft"]} | exclude
    if cfg.counterfactual > 0:
        splits["train"] += counterfactual_rows(kg, splits["train"], cfg.counterfactual,
                                               random.Random(f"{cfg.seed}:counterfactual"), held_keys,
                                               cfg.counterfactual_from)
    if cfg.counterfactual_pool > 0:
        # each copy right after its original, so rsft.max_questions takes both kinds in proportion
        copies = {r["meta"]["renamed_from"]: r for r in counterfactual_rows(
            kg, splits["rsft"], cfg.counterfactual_pool, random.Random(f"{cfg.seed}:counterfactual-pool"), held_keys,
            cfg.counterfactual_from)}
        splits["rsft"] = [x for r in splits["rsft"] for x in (r, copies.get(r["id"])) if x is not None]
    return splits


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def train_edge_coverage(rows: list[dict[str, Any]], kg: "KG") -> dict[tuple[str, str, str], int]:
    """Times each (unique) KG edge appears in the paths of ``rows``."""
    cov = {e: 0 for e in _unique_edges(kg)}
    for row in rows:
        if (row.get("meta") or {}).get("counterfactual"):
            continue
        for e in row["path_star"].get("edges") or []:
            t = edge_tuple(e)
            if t in cov:
                cov[t] += 1
    return cov


def letter_balance(rows: list[dict[str, Any]]) -> dict[str, float]:
    n = len(rows)
    c = Counter(r["answer_star"] for r in rows)
    return {L: (c[L] / n if n else 0.0) for L in LETTERS}


def verify_row(kg: "KG", row: dict[str, Any]) -> None:
    """Raise TracerError unless the row has 4 distinct options and exactly one (gold) is reachable."""
    rid = row.get("id", "?")
    opts = row["options"]
    if list(opts) != list(LETTERS):
        raise TracerError(f"{rid}: options must be A-D, got {list(opts)}")
    if len(set(opts.values())) != 4:
        raise TracerError(f"{rid}: duplicate options {opts}")
    ents = row["path_star"]["entities"]
    edges = row["path_star"]["edges"]
    rels = [e["rel"] for e in edges]
    for i, e in enumerate(edges):
        if (e["src"], e["dst"]) != (ents[i], ents[i + 1]) or e["dst"] not in kg.targets(e["src"], e["rel"]):
            raise TracerError(f"{rid}: path edge {format_fact(e)} is not in the KG")
    if len(set(ents)) != len(ents):
        raise TracerError(f"{rid}: path repeats an entity")
    reach = kg.follow(ents[0], rels)
    hits = [L for L in LETTERS if opts[L] in reach]
    if hits != [row["answer_star"]] or opts[row["answer_star"]] != ents[-1]:
        raise TracerError(f"{rid}: expected exactly the gold option reachable, reachable: {hits}")


def verify_splits(kg: "KG", splits: dict[str, list[dict[str, Any]]], cfg: "DataConfig") -> None:
    """Check every generation rule; raise TracerError on the first violation."""
    for rows in splits.values():
        for row in rows:
            verify_row(kg, row)
    keys = {name: {path_key(r) for r in rows} for name, rows in splits.items() if name != "eval_shuffled"}
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = keys[a] & keys[b]
            if both:
                s, rels, d = sorted(both)[0]
                raise TracerError(f"splits {a} and {b} share {len(both)} path(s), e.g. {s} {list(rels)} {d}")
    if len(keys.get("eval", ())) != len(splits.get("eval", ())):
        raise TracerError("eval repeats a path")
    if len(keys.get("rsft", ())) != len(splits.get("rsft", ())):
        raise TracerError("rsft repeats a path")
    for name, rows in splits.items():
        n = len(rows)
        # the balanced block scheme is off by at most 3/4 of a question per letter
        if n and n * cfg.letter_tolerance >= 0.75:
            bal = letter_balance(rows)
            worst = max(abs(v - 0.25) for v in bal.values())
            if worst > cfg.letter_tolerance + 1e-12:
                raise TracerError(f"{name}: answer letters unbalanced {bal}")
    if "eval_shuffled" in splits:
        for a, b in zip(splits["eval"], splits["eval_shuffled"]):
            if b["meta"].get("shuffled_from") != a["id"] or b["answer_star"] == a["answer_star"]:
                raise TracerError(f"{b['id']}: not a letter-changing shuffle of {a['id']}")
    if 1 in cfg.train_hops and cfg.min_edge_coverage > 0:
        cov = train_edge_coverage(splits["train"], kg)
        low = sorted(e for e, c in cov.items() if c < cfg.min_edge_coverage and e[0] != e[2])
        if low:
            raise TracerError(
                f"{len(low)} KG edge(s) appear in fewer than {cfg.min_edge_coverage} training paths, "
                f"e.g. {format_fact(low[0])}"
            )


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def summarize(
    splits: dict[str, list[dict[str, Any]]], kg: "KG", cfg: "DataConfig | None" = None
) -> dict[str, Any]:
    """Counts per split and hop, train edge coverage, letter balance, warnings (plain data)."""
    min_cov = cfg.min_edge_coverage if cfg is not None else DEFAULT_MIN_EDGE_COVERAGE
    out: dict[str, Any] = {"splits": {}, "letters": {}, "warnings": []}
    warnings: list[str] = out["warnings"]
    for name, rows in splits.items():
        per_hop = Counter(int(r["hop_len"]) for r in rows)
        out["splits"][name] = {"n": len(rows), "per_hop": {str(h): per_hop[h] for h in sorted(per_hop)}}
        out["letters"][name] = letter_balance(rows)
    cov = train_edge_coverage(splits.get("train", []), kg)
    vals = list(cov.values())
    out["edge_coverage"] = {
        "edges": len(vals),
        "min": min(vals) if vals else 0,
        "mean": round(sum(vals) / len(vals), 3) if vals else 0.0,
        "required": min_cov,
        "frac_covered": round(sum(v >= min_cov for v in vals) / len(vals), 4) if vals else 1.0,
    }
    if vals and min(vals) < min_cov:
        warnings.append(f"{sum(v < min_cov for v in vals)} KG edge(s) appear in fewer than {min_cov} training paths")
    if cfg is not None:
        n_eval = len(splits.get("eval", []))
        n_rsft = sum(not r["meta"].get("counterfactual") for r in splits.get("rsft", []))  # renamed copies are extra
        if n_eval < cfg.eval_size:
            warnings.append(f"eval has {n_eval} questions, eval_size asks for {cfg.eval_size}")
        if n_rsft < cfg.rsft_size:
            warnings.append(
                f"rsft has {n_rsft} questions, rsft_size asks for {cfg.rsft_size} "
                f"(not enough {'/'.join(map(str, cfg.eval_hops))}-hop paths left after eval)"
            )
        for name, bal in out["letters"].items():
            if splits[name] and max(abs(v - 0.25) for v in bal.values()) > cfg.letter_tolerance:
                warnings.append(f"{name}: answer letters outside 25% ± {cfg.letter_tolerance:g}")
    keys = {n: {path_key(r) for r in rows} for n, rows in splits.items() if n != "eval_shuffled"}
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if keys[a] & keys[b]:
                warnings.append(f"splits {a} and {b} share {len(keys[a] & keys[b])} path(s)")
    return out


# ---------------------------------------------------------------------------------------------
# JSONL I/O
# ---------------------------------------------------------------------------------------------


def _dumps_rows(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically (temp file in the same dir + os.replace)."""
    p = Path(path)
    write_text_atomic(p, _dumps_rows(rows))
    return p


def write_splits(splits: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for train / rsft / eval / eval_shuffled (those present)."""
    out = Path(out_dir)
    texts = {name: _dumps_rows(splits[name]) for name in SPLIT_FILES if name in splits}
    paths: dict[str, Path] = {}
    for name, text in texts.items():
        paths[name] = out / f"{name}.jsonl"
        write_text_atomic(paths[name], text)
    return paths


def _read_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    p = Path(path)
    if not p.is_file():
        raise TracerError(f"{path}: {'not a file' if p.exists() else 'no such file'}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TracerError(f"{path}: not a UTF-8 text file") from None
    rows = []
    # "\n" only: str.splitlines() also cuts at U+2028 and friends, which JSON strings may hold unescaped
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TracerError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise TracerError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    if not rows:
        raise TracerError(f"{path}: no examples")
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; errors name the file and line."""
    return [row for _, row in _read_lines(path)]


_ROW_ORDER = ("id", "split", "hop_len", "question", "options", "answer_star", "path_star", "prompt", "ref", "meta")


def normalize_row(row: dict[str, Any], where: str, kg: "KG | None" = None, context: str = "closed") -> dict[str, Any]:
    """Validate one example row and fill optional fields; ``where`` is ``file:line`` for errors."""
    for field in ("id", "question", "options", "answer_star", "path_star"):
        if field not in row or row[field] is None:
            raise TracerError(f"{where}: missing '{field}'")
    if not isinstance(row["id"], (str, int)):
        raise TracerError(f"{where}: 'id' must be a string")
    if not isinstance(row["question"], str):
        raise TracerError(f"{where}: 'question' must be a string")
    opts = row["options"]
    if not isinstance(opts, dict) or sorted(opts) != list(LETTERS) or not all(isinstance(v, str) for v in opts.values()):
        raise TracerError(f"{where}: 'options' must map exactly A, B, C, D to entity names")
    options = {L: opts[L] for L in LETTERS}
    if not isinstance(row["answer_star"], str) or row["answer_star"] not in options:
        raise TracerError(f"{where}: 'answer_star' must be one of A, B, C, D, got {row['answer_star']!r}")
    ps = row["path_star"]
    if not isinstance(ps, dict) or "entities" not in ps:
        raise TracerError(f"{where}: missing 'path_star.entities'")
    ents = ps["entities"]
    if not isinstance(ents, list) or not ents or not all(isinstance(e, str) for e in ents):
        raise TracerError(f"{where}: 'path_star.entities' must be a non-empty list of entity ids")
    raw_edges = ps.get("edges") or []
    if not isinstance(raw_edges, list):
        raise TracerError(f"{where}: 'path_star.edges' must be a list")
    edges = []
    for e in raw_edges:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("src", "rel", "dst")):
            raise TracerError(f"{where}: each path_star edge needs string src, rel, dst")
        edges.append({"src": e["src"], "rel": e["rel"], "dst": e["dst"]})
    if kg is not None:
        for x in ents:
            if x not in kg.entities:
                raise TracerError(f"{where}: unknown entity {x!r} in path_star")
    for field in ("meta", "ref"):
        if row.get(field) is not None and not isinstance(row[field], dict):
            raise TracerError(f"{where}: '{field}' must be an object, got {type(row[field]).__name__}")
    meta = dict(row.get("meta") or {})
    facts = meta.get("facts")
    if facts is not None and (not isinstance(facts, list) or not all(isinstance(f, str) for f in facts)):
        raise TracerError(f"{where}: 'meta.facts' must be a list of strings")
    unparsed = [f for f in facts or [] if not is_fact(f)] if meta.get("counterfactual") else []
    if unparsed:  # a renamed row's facts are its reward's KG
        raise TracerError(f"{where}: renamed row's fact {unparsed[0]!r} is not written 'src -rel-> dst'")
    if not edges and isinstance(meta.get("relations"), list) and len(meta["relations"]) == len(ents) - 1:
        edges = [{"src": ents[i], "rel": r, "dst": ents[i + 1]} for i, r in enumerate(meta["relations"])]
    meta.setdefault("relations", [e["rel"] for e in edges])
    meta.setdefault("context", context)
    meta.setdefault("template", 0)
    hop_len = row.get("hop_len")
    if not isinstance(hop_len, int):
        hop_len = len(edges) if edges else len(ents) - 1
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        facts = meta.get("facts") if context == "facts" else None
        prompt = build_prompt(row["question"], options, facts)
    ref = dict(row.get("ref") or {})
    if not isinstance(ref.get("trace"), str) and edges and len(edges) == len(ents) - 1:
        ref["trace"] = reference_trace(ents, edges, row["answer_star"])
    out = {
        "id": str(row["id"]),
        "split": row.get("split") or "unknown",
        "hop_len": hop_len,
        "question": row["question"],
        "options": options,
        "answer_star": row["answer_star"],
        "path_star": {**ps, "entities": list(ents), "edges": edges},
        "prompt": prompt,
        "ref": ref,
        "meta": meta,
    }
    for k, v in row.items():
        if k not in _ROW_ORDER:
            out[k] = v
    return out


def load_examples(path: str | Path, kg: "KG | None" = None, context: str = "closed") -> list[dict[str, Any]]:
    """Read and normalise example rows (ours, or the public multi-hop-reasoning layout)."""
    return [normalize_row(row, f"{path}:{lineno}", kg, context) for lineno, row in _read_lines(path)]
