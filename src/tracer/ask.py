"""Ask one question: the model's trace and answer, each written hop checked against the graph.

A question is either a row of a question file (then its gold answer and path are known, and the
completion is scored with the KG reward) or free text whose lines ``A) ...`` to ``D) ...`` are the
options (then only the hops can be checked).
"""

from __future__ import annotations

import re
from typing import Any

from tracer.config import Config
from tracer.errors import TracerError
from tracer.format import LETTERS, build_prompt, parse_completion, trace_steps
from tracer.kg import KG
from tracer.reward import EntityMatcher, judging_graph, score, written_hops

_OPTION = re.compile(r"^\s*([A-D])\s*[).:]\s*(\S.*?)\s*$")


def parse_free_text(text: str) -> tuple[str, dict[str, str]]:
    """(question, options) of free text: lines ``A) X`` (or ``A. X``, ``A: X``) are options, the
    other lines the question. Exactly the four options A-D are required."""
    options: dict[str, str] = {}
    question = []
    for line in text.strip().splitlines():
        m = _OPTION.match(line)
        if m:
            options[m.group(1)] = m.group(2)
        elif line.strip():
            question.append(line.strip())
    if sorted(options) != list(LETTERS):
        raise TracerError(f"a question needs four options on lines 'A) ...' to 'D) ...', got {sorted(options) or 'none'}")
    if not question:
        raise TracerError("the question text is empty")
    return " ".join(question), options


def question_row(text: str, tags: bool = False) -> dict[str, Any]:
    """A row without gold for free text (closed-book prompt; options ``perf (A)`` with ``tags``,
    ``data.option_tags``)."""
    question, options = parse_free_text(text)
    return {"id": "ask", "question": question, "options": options, "prompt": build_prompt(question, options, tags=tags)}


def checked_hops(completion: str, graph: KG, matcher: EntityMatcher) -> list[dict[str, Any]]:
    """Each hop the trace writes, ``{"src", "rel", "dst", "real"}`` (:func:`tracer.reward.written_hops`):
    real when the graph has that edge, relation included."""
    nodes, rels = trace_steps(parse_completion(completion, matcher).trace_text)
    return [{"src": a, "rel": r, "dst": b, "real": real} for a, r, b, real in written_hops(nodes, rels, graph)]


def ask(model, tokenizer, row: dict[str, Any], kg: KG, cfg: Config) -> dict[str, Any]:
    """Greedy completion of one question row, its parsed answer, checked hops, and (for a row with
    a gold answer and path) the reward breakdown of :func:`tracer.reward.score`."""
    from tracer.generate import generate

    completion = generate(model, tokenizer, [row["prompt"]], max_tokens=cfg.eval.max_tokens,
                          system=cfg.data.system_prompt)[0]
    matcher = EntityMatcher(kg.entities)
    parsed = parse_completion(completion, matcher)
    out: dict[str, Any] = {
        "id": row["id"], "question": row["question"], "options": row["options"], "completion": completion,
        "valid_format": parsed.valid_format, "answer": parsed.answer,
        "hops": checked_hops(completion, judging_graph(kg, row), matcher),
    }
    if "answer_star" in row and "path_star" in row:
        result = score(completion, row, matcher, kg, cfg.reward)
        out.update(answer_star=row["answer_star"], correct=result["correct"],
                   reward={k: result[k] for k in ("total", "correctness", "path_coverage", "path_reward")})
    return out
