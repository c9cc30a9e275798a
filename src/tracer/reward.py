"""KG reward: match entities, score completions against the graph, build episode rows.

Pure Python (no MLX). The knowledge graph is the reward model: the trace is judged against the
graph, not one reference path. Path credit is how far the trace follows the question's relation
chain from its start through real edges that can still reach the answer (:func:`chain_nodes`),
so any valid branch earns full credit; edge precision checks every written hop's relation and
both endpoints. A renamed (counterfactual) question is judged against the facts its prompt
states instead of the KG.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

from tracer.format import is_frontier, node_names, parse_completion, parse_fact, trace_steps
from tracer.kg import KG, Edge

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tracer.config import RewardConfig

_WORD = "A-Za-z0-9_"


class EntityMatcher:
    """Finds entity ids in free text: word boundaries, longest match first."""

    def __init__(self, entity_ids: Iterable[str]):
        ids = sorted({e for e in entity_ids if e}, key=lambda e: (-len(e), e))
        self.ids = ids
        if ids:
            alt = "|".join(re.escape(e) for e in ids)
            self._re: re.Pattern[str] | None = re.compile(f"(?<![{_WORD}])(?:{alt})(?![{_WORD}])")
        else:
            self._re = None

    def find(self, text: str) -> list[str]:
        """Entity ids in order of appearance, repeats included."""
        if self._re is None or not text:
            return []
        return [m.group(0) for m in self._re.finditer(text)]


def judging_graph(kg: KG, example: dict[str, Any] | None = None) -> KG:
    """The graph a completion is judged against: the KG, or for a renamed (counterfactual)
    ``example`` the facts its prompt states (its world contradicts the KG)."""
    meta = (example or {}).get("meta") or {}
    if not meta.get("counterfactual"):
        return kg
    edges = list(dict.fromkeys(Edge(*parse_fact(f)) for f in meta.get("facts") or []))
    return KG("facts", "facts", {}, {}, edges)


def written_hops(nodes: list[str], rels: list[str], graph: KG) -> list[tuple[str, str, str, bool]]:
    """Each hop the trace writes, ``(node, relation, entity, real)``: ``nodes[i] -rels[i]->
    nodes[i+1]``, real when that exact edge, relation included, is in ``graph``. A hop to a name
    that is no entity, from an entity to itself, under another relation or a bare ``->`` is not.
    A frontier node (``{A, B}``, :func:`tracer.format.frontier_trace`) writes one hop per entity it
    lists, real when an entity of the node before it has that edge into it."""
    return [(a, r, b, any(graph.has_triple(x, r, b) for x in node_names(a)))
            for a, r, node in zip(nodes, rels, nodes[1:]) for b in node_names(node)]


def edge_check(nodes: list[str], rels: list[str], graph: KG) -> tuple[float, list[list[str]]]:
    """Edge precision over the hops as written (:func:`written_hops`), and the hops (``[node,
    entity]`` pairs) that are not edges of ``graph`` (:func:`judging_graph`). No hops → 0.0."""
    hops = written_hops(nodes, rels, graph)
    if not hops:
        return 0.0, []
    bad = [[a, b] for a, _, b, real in hops if not real]
    return (len(hops) - len(bad)) / len(hops), bad


def chain_walk(nodes: list[str], rels: list[str], graph: KG, example: dict[str, Any]) -> tuple[int, int]:
    """How far the trace follows the question, as two node counts, both 0 unless it starts at the
    question's start entity. ``walked``: one more for each hop that writes the chain's next relation
    along a real edge. ``on_path`` (<= walked): the same, as long as the rest of the chain still
    reaches the answer from the node reached. ``on_path == hop_len + 1``: the trace follows the
    chain to the answer, by any branch. A frontier node (``{A, B}``) counts when one entity it lists
    is reached by a real edge from the entities counted at the node before it (for ``on_path``:
    one from which the rest of the chain still reaches the answer)."""
    ps = example["path_star"]
    ents = ps["entities"]
    chain = [e["rel"] for e in ps.get("edges") or []] or list((example.get("meta") or {}).get("relations") or [])
    if not nodes or not ents or nodes[0] != ents[0] or len(chain) != len(ents) - 1:
        return 0, 0
    back = [set() for _ in chain] + [{ents[-1]}]  # back[i]: entities from which chain[i:] reaches the answer
    for i in range(len(chain) - 1, -1, -1):
        back[i] = {s for d in back[i + 1] for s in graph.sources(d, chain[i])}
    walk = path = {ents[0]}  # the entities walked / on a path to the answer, at the node reached
    on_path = walked = 1
    for i, rel in enumerate(chain):
        if i + 1 >= len(nodes) or rels[i] != rel:
            break
        written = node_names(nodes[i + 1])
        walk = {b for b in written if any(graph.has_triple(a, rel, b) for a in walk)}
        if not walk:
            break
        walked += 1
        path = {b for b in written if b in back[i + 1] and any(graph.has_triple(a, rel, b) for a in path)}
        on_path += on_path == walked - 1 and bool(path)
    return on_path, walked


_STOP_WORDS = frozenset(
    "the and or but in on at to for of with by a an is are was were be been have has had do does did will "
    "would could should may might can this that these those".split()
)


def repetition_factor(text: str, threshold: float = 0.35) -> float:
    """The paper's token-repetition factor (jha-lab/kg-implicit-reward-compositional-rl): over the
    text's lower-case alphanumeric words without stop words, 1 - 3 x (share of the most common word
    above ``threshold``), times 1 - 0.05 per repeat of one word beyond 3 in a row; 1.0 for no words."""
    words = [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w and w not in _STOP_WORDS]
    if not words:
        return 1.0
    top = Counter(words).most_common(1)[0][1] / len(words)
    base = max(0.0, 1.0 - max(0.0, top - threshold) * 3.0)
    longest = run = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    return max(0.0, base * (1.0 - max(0, longest - 3) * 0.05))


def path_score(coverage: float, hits: int, trace_text: str, cfg: RewardConfig) -> float:
    """The path reward of a valid completion: ``min((path_scale x coverage + hit_bonus x [hits >=
    min_hits]) x repetition, max_path_reward)``, 0 below ``min_hits`` when ``gate_coverage``.
    tracer's default is min(coverage, 1) from 2 chain nodes; the paper's preset
    (configs/paper_reward.toml) is min((1.2 x coverage + 0.3 x [hits >= 2]) x repetition, 1.5)."""
    enough = hits >= cfg.min_hits
    if cfg.gate_coverage and not enough:
        return 0.0
    raw = cfg.path_scale * coverage + cfg.hit_bonus * enough
    if cfg.repetition_factor:
        raw *= repetition_factor(trace_text)
    return min(raw, cfg.max_path_reward)


def spammed(nodes: list[str], entities: list[str], hop_len: int, repeat_max: int) -> bool:
    """Whether a trace repeats itself: an entity named more than ``repeat_max`` times; in a frontier
    trace, whose frontiers may share entities, an entity listed twice in one node or more hops than
    the chain has."""
    if any(map(is_frontier, nodes[1:])):
        return len(nodes) - 1 > hop_len or any(len(set(names)) < len(names) for names in map(node_names, nodes))
    return any(c > repeat_max for c in Counter(entities).values())


def score(completion: str, example: dict[str, Any], matcher: EntityMatcher, kg: KG,
          cfg: RewardConfig) -> dict[str, Any]:
    """Score one completion against its example; returns a flat breakdown dict.

    ``hits`` = the trace's nodes on a valid path (:func:`chain_walk`), ``path_coverage`` =
    hits / (hop_len + 1). Invalid format →
    total = ``cfg.invalid`` with correctness, path_reward and spam_penalty 0 (path_coverage,
    hits, edge_precision are still computed for diagnostics).
    """
    p = parse_completion(completion, matcher)
    graph = judging_graph(kg, example)
    nodes, rels = trace_steps(p.trace_text)
    hits, walked = chain_walk(nodes, rels, graph, example)
    coverage = hits / len(example["path_star"]["entities"])
    edge_precision, hallucinated = edge_check(nodes, rels, graph)
    correct = p.valid_format and p.answer == example["answer_star"]
    if p.valid_format:
        correctness = cfg.correct if correct else cfg.incorrect
        path_reward = path_score(coverage, hits, p.trace_text, cfg)
        spam = cfg.spam_penalty if spammed(nodes, p.trace_entities, example["hop_len"], cfg.repeat_max) else 0.0
        total = cfg.w_correct * correctness + cfg.w_path * path_reward - spam
    else:
        correctness, path_reward, spam, total = 0.0, 0.0, 0.0, cfg.invalid
    return {
        "correctness": float(correctness),
        "path_coverage": float(coverage),
        "path_reward": float(path_reward),
        "spam_penalty": float(spam),
        "total": float(total),
        "edge_precision": float(edge_precision),
        "valid_format": p.valid_format,
        "answer": p.answer,
        "correct": bool(correct),
        "hits": hits,
        "walked": walked,
        "trace_text": p.trace_text,
        "trace_entities": list(p.trace_entities),
        "hallucinated_hops": hallucinated,
    }


def episode(example: dict[str, Any], completion: str, phase: str, result: dict[str, Any]) -> dict[str, Any]:
    """Build an ``episodes/<phase>.jsonl`` row from an example, its completion and ``score()``."""
    return {
        "phase": phase,
        "ex_id": example["id"],
        "split": example.get("split"),
        "hop_len": example["hop_len"],
        "prompt": example.get("prompt", ""),
        "completion": completion,
        "answer_star": example["answer_star"],
        "correct": bool(result["correct"]),
        "parsed": {
            "valid_format": bool(result["valid_format"]),
            "answer": result["answer"],
            "trace_text": result["trace_text"],
            "trace_entities": list(result["trace_entities"]),
            "path_entities": list(example["path_star"]["entities"]),
            "chain_nodes": int(result["hits"]),
            "walk_nodes": int(result["walked"]),
        },
        "reward": {k: result[k] for k in
                   ("correctness", "path_coverage", "path_reward", "spam_penalty", "total", "edge_precision")},
        "hallucinated_hops": [list(h) for h in result["hallucinated_hops"]],
    }
