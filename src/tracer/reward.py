"""KG reward: parse ``TRACE:``/``ANSWER:`` completions, match entities, score, build episode rows.

Pure Python (no MLX). The knowledge graph is the reward model: the trace is checked against
the gold path (coverage) and against the graph's edges (edge precision); a renamed
(counterfactual) question's trace against the facts its prompt states.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from tracer.dataset import ANSWER_TAG, TRACE_TAG, parse_fact
from tracer.metrics import trace_nodes

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tracer.config import RewardConfig
    from tracer.kg import KG

_TRACE_RE = re.compile(rf"^[ \t]*{TRACE_TAG}", re.MULTILINE)
_ANSWER_LINE_RE = re.compile(rf"^[ \t]*{ANSWER_TAG}[^\n]*$", re.MULTILINE)
_ANSWER_OK_RE = re.compile(rf"^\s*{ANSWER_TAG}\s*([A-D])\s*\.?\s*$")
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


@dataclass
class Parsed:
    """Result of parsing one completion."""

    valid_format: bool
    answer: str | None
    trace_text: str
    trace_entities: list[str] = field(default_factory=list)


def trace_and_answer(text: str) -> tuple[re.Match[str] | None, re.Match[str] | None]:
    """The first ``TRACE:`` line's match and the first ``ANSWER:`` line's after it (``None`` when absent)."""
    t = _TRACE_RE.search(text)
    return t, (_ANSWER_LINE_RE.search(text, t.end()) if t else None)


def parse_completion(text: str, matcher: EntityMatcher) -> Parsed:
    """Parse a completion.

    Valid iff a line starts with ``TRACE:`` with non-empty text before the first following
    line that starts with ``ANSWER:``, and that line is ``ANSWER: X`` with X in A-D
    (surrounding whitespace and a trailing period tolerated). Everything after the ANSWER
    line is ignored. ``answer`` is the letter whenever the ANSWER line is well formed, even if
    the format is invalid for another reason (empty trace); ``trace_text`` runs to the end of
    the text when there is no ANSWER line (diagnostics only).
    """
    text = text or ""
    t, a = trace_and_answer(text)
    if t is None:
        return Parsed(False, None, "", [])
    if a is None:
        trace_text = text[t.end():].strip()
        return Parsed(False, None, trace_text, matcher.find(trace_text))
    trace_text = text[t.end():a.start()].strip()
    m = _ANSWER_OK_RE.match(a.group(0))
    answer = m.group(1) if m else None
    valid = answer is not None and bool(trace_text)
    return Parsed(valid, answer, trace_text, matcher.find(trace_text))


def answer_span(text: str) -> str:
    """The part of a completion :func:`parse_completion` reads: from its ``TRACE:`` line through the
    first ``ANSWER:`` line after it (the text stripped, as it is, when either is missing)."""
    t, a = trace_and_answer(text)
    if a is None:
        return text.strip()
    return text[t.start():a.end()].strip()


def edge_check(nodes: list[str], kg: KG, example: dict[str, Any] | None = None) -> tuple[float, list[list[str]]]:
    """Edge precision over the hops as written (:func:`tracer.metrics.trace_nodes`), and the hops
    that are not KG edges.

    Every hop counts: one to a name that is no entity, or from an entity to itself, is not an edge.
    A renamed (counterfactual) ``example`` is checked against its own facts instead: its world
    is the prompt, which contradicts the KG. No hops → precision 0.0.
    """
    pairs = list(zip(nodes, nodes[1:]))
    if not pairs:
        return 0.0, []
    meta = (example or {}).get("meta") or {}
    if meta.get("counterfactual"):
        stated = {(s, d) for s, _, d in map(parse_fact, meta.get("facts") or [])}
        bad = [[a, b] for a, b in pairs if (a, b) not in stated]
    else:
        bad = [[a, b] for a, b in pairs if not kg.has_edge(a, b)]
    return (len(pairs) - len(bad)) / len(pairs), bad


def score(completion: str, example: dict[str, Any], matcher: EntityMatcher, kg: KG,
          cfg: RewardConfig) -> dict[str, Any]:
    """Score one completion against its example; returns a flat breakdown dict.

    Invalid format → total = ``cfg.invalid`` with correctness, path_reward and spam_penalty 0
    (path_coverage, hits, edge_precision are still computed for diagnostics).
    """
    p = parse_completion(completion, matcher)
    path = set(example["path_star"]["entities"])
    named = set(p.trace_entities)
    hits = len(path & named)
    coverage = hits / len(path) if path else 0.0
    edge_precision, hallucinated = edge_check(trace_nodes(p.trace_text), kg, example)
    correct = p.valid_format and p.answer == example["answer_star"]
    if p.valid_format:
        correctness = cfg.correct if correct else cfg.incorrect
        path_reward = min(coverage, cfg.max_path_reward) if hits >= cfg.min_hits else 0.0
        counts = Counter(p.trace_entities)
        spammed = any(c > cfg.repeat_max for c in counts.values())
        spam = cfg.spam_penalty if spammed else 0.0
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
        },
        "reward": {k: result[k] for k in
                   ("correctness", "path_coverage", "path_reward", "spam_penalty", "total", "edge_precision")},
        "hallucinated_hops": [list(h) for h in result["hallucinated_hops"]],
    }
