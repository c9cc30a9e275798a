"""The completion format, in one place: the prompt a model is asked, the answer it must write, how
that answer is read, when generation may stop, and the chat template around it all.

A completion is two lines::

    TRACE: E0 -caused_by-> E1 -fixed_by-> E2
    ANSWER: C

The trace names entities joined by ``-relation->`` arrows; the answer is one option letter. The
reward (:mod:`tracer.reward`) and the metrics (:mod:`tracer.metrics`) read completions only through
the functions here, question generation (:mod:`tracer.dataset`) writes prompts and reference traces
only through them, and generation and training build their token ids with :func:`encode_chat`.

Pure Python (standard library only). The chat-template functions call a tokenizer object's
``apply_chat_template`` / ``encode`` (a Hugging Face or mlx-lm tokenizer); they import no MLX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tracer.errors import TracerError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tracer.reward import EntityMatcher

LETTERS = ("A", "B", "C", "D")
TRACE_TAG, ANSWER_TAG = "TRACE:", "ANSWER:"  # the completion format's two line prefixes
RELATION_CHARS = "A-Za-z0-9_"  # what the trace syntax `-rel->` reads as a relation (a regex class)
NODE_TRIM = " \t\n`'\".,;:"  # what a trace parser strips from each node: no entity id may start or end with it

SYSTEM_PROMPT = "You answer multi-hop questions about a software troubleshooting knowledge graph."

FORMAT_INSTRUCTIONS = (
    "Answer in exactly this format:\n"
    f"{TRACE_TAG} <entity -relation-> entity ...>\n"
    f"{ANSWER_TAG} <A|B|C|D>"
)

# ---------------------------------------------------------------------------------------------
# Prompts, facts and reference traces
# ---------------------------------------------------------------------------------------------


def build_prompt(question: str, options: dict[str, str], facts: list[str] | None = None, tags: bool = False) -> str:
    """The user message: format instructions, optional facts, the question and the options, written
    ``A) perf`` or, with ``tags``, ``perf (A)`` (the tag a tagged trace copies, :func:`tag`)."""
    parts = [FORMAT_INSTRUCTIONS]  # the same with tags: trained models follow their training, not this line
    if facts:
        parts.append("Facts:\n" + "\n".join(facts))
    opts = "\n".join(tag(options[k], k) if tags else f"{k}) {options[k]}" for k in sorted(options))
    parts.append(f"Question: {question}\n{opts}")
    return "\n\n".join(parts)


def edge_tuple(e: Any) -> tuple[str, str, str]:
    """``(src, rel, dst)`` of an Edge, an edge dict or a (src, rel, dst) sequence."""
    if isinstance(e, dict):
        return (e["src"], e["rel"], e["dst"])
    if isinstance(e, (tuple, list)):
        return (e[0], e[1], e[2])
    return (e.src, e.rel, e.dst)


def format_fact(e: Any) -> str:
    """``src -rel-> dst`` (an Edge, an edge dict or a (src, rel, dst) tuple)."""
    s, r, d = edge_tuple(e)
    return f"{s} -{r}-> {d}"


_FACT_RE = re.compile(r"^(\S+) -(\S+)-> (\S+)$")


def is_fact(text: str) -> bool:
    """Whether ``text`` is written as :func:`format_fact` writes a fact."""
    return _FACT_RE.match(text) is not None


def parse_fact(text: str) -> tuple[str, str, str]:
    """``(src, rel, dst)`` of a :func:`format_fact` line."""
    return _FACT_RE.match(text).groups()


def tag(entity: str, letter: str) -> str:
    """``perf (C)``: an option as a tagged prompt lists it, and as a tagged trace ends. Written after
    the entity, the letter is what follows a repeat of the option's name, so the model copies it
    (an induction-style copy) instead of looking the trace's last entity up among the options."""
    return f"{entity} ({letter})"


def reference_trace(entities: list[str], edges: list[Any], letter: str, tags: bool = False) -> str:
    """``TRACE: E0 -caused_by-> E1 -fixed_by-> E2\\nANSWER: C``; with ``tags`` the last entity is
    tagged, ``... -fixed_by-> E2 (C)``."""
    if not entities:
        raise TracerError("reference trace: empty path")
    if edges and len(edges) != len(entities) - 1:
        raise TracerError(
            f"reference trace: {len(entities)} entities do not fit {len(edges)} edges"
        )
    text = entities[0]
    for i, e in enumerate(edges):
        _, rel, _ = edge_tuple(e)
        text += f" -{rel}-> {entities[i + 1]}"
    if tags:
        text = tag(text, letter)
    return f"{TRACE_TAG} {text}\n{ANSWER_TAG} {letter}"


def frontier_trace(start: str, rels: list[str], targets: Callable[[str, str], Iterable[str]], letter: str,
                   answer: str | None = None) -> str:
    """``TRACE: E0 -caused_by-> {E1, E2} -fixed_by-> {E3}\nANSWER: C``: after each relation, every
    entity the chain reaches (its frontier), in the order first reached: each member of the previous
    frontier in turn, its ``targets(member, rel)`` sorted. Exact on a graph whose pairs have several
    targets, where one path must guess the branch that reaches an option. With ``answer`` given, that
    entity is tagged in the last frontier (``{E3 (C), E4}``, :func:`tag`)."""
    frontier, text = [start], start
    for i, rel in enumerate(rels):
        frontier = list(dict.fromkeys(t for x in frontier for t in sorted(targets(x, rel))))
        last = i == len(rels) - 1 and answer is not None
        text += f" -{rel}-> {{{', '.join(tag(t, letter) if last and t == answer else t for t in frontier)}}}"
    return f"{TRACE_TAG} {text}\n{ANSWER_TAG} {letter}"


def with_answer(trace: str, letter: str) -> str:
    """A trace with its ANSWER line's letter replaced by ``letter``, and its tag too when it has one
    (a trace that tags several entities keeps them: which one is the answer's is not known here)."""
    head = trace.rsplit("\n", 1)[0]
    retagged, tags = _TAG_RE.subn(f" ({letter})", head)
    return f"{retagged if tags == 1 else head}\n{ANSWER_TAG} {letter}"


# a letter tag after a space that ends a trace node or a frontier member (what may trail it: what a
# node is trimmed of, then a comma, a brace, an arrow or the end)
_TAG_RE = re.compile(rf"[ \t]+\([A-D]\)(?=[{re.escape(NODE_TRIM)}]*(?:[,}}]|(?:-[{RELATION_CHARS}]*)?->|$))")


def untagged(trace_text: str) -> str:
    """A trace without its letter tags (``... -> E2 (C)`` → ``... -> E2``): what the reward and the
    metrics judge. An entity id has no whitespace, so ``␣(C)`` is never part of one."""
    return _TAG_RE.sub("", trace_text)


# ---------------------------------------------------------------------------------------------
# Reading a completion
# ---------------------------------------------------------------------------------------------

_TRACE_RE = re.compile(rf"^[ \t]*{TRACE_TAG}", re.MULTILINE)
_ANSWER_LINE_RE = re.compile(rf"^[ \t]*{ANSWER_TAG}[^\n]*$", re.MULTILINE)
_ANSWER_OK_RE = re.compile(rf"^\s*{ANSWER_TAG}\s*([A-D])\s*\.?\s*$")


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
    """Parse a completion; ``matcher`` (:class:`tracer.reward.EntityMatcher`) names the trace's entities.

    Valid iff a line starts with ``TRACE:`` with non-empty text before the first following
    line that starts with ``ANSWER:``, and that line is ``ANSWER: X`` with X in A-D
    (surrounding whitespace and a trailing period tolerated). Everything after the ANSWER
    line is ignored. Letter tags in the trace (``E2 (C)``) are dropped from ``trace_text``
    (:func:`untagged`). ``answer`` is the letter whenever the ANSWER line is well formed, even if
    the format is invalid for another reason (empty trace); ``trace_text`` runs to the end of
    the text when there is no ANSWER line (diagnostics only).
    """
    text = text or ""
    t, a = trace_and_answer(text)
    if t is None:
        return Parsed(False, None, "", [])
    if a is None:
        trace_text = untagged(text[t.end():].strip())
        return Parsed(False, None, trace_text, matcher.find(trace_text))
    trace_text = untagged(text[t.end():a.start()].strip())
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


def answer_text(completion: str) -> str | None:
    """What follows a completion's last ``ANSWER:`` tag (its letter and whatever trails it), or
    None without one: the tokens training can weigh as the answer."""
    k = completion.rfind(ANSWER_TAG)
    return completion[k + len(ANSWER_TAG):] if k >= 0 else None


# ---------------------------------------------------------------------------------------------
# Trace nodes
# ---------------------------------------------------------------------------------------------

_ARROW_RE = re.compile(rf"\s*(?:-[{RELATION_CHARS}]*)?->\s*")


def trace_nodes(trace_text: str) -> list[str]:
    """The trace as written, cut at its ``-relation->`` (or bare ``->``) arrows: one string per
    node, in order, repeats and names that are no entity included (trimmed of spaces, quotes,
    backticks and trailing punctuation). ``""`` → ``[]``."""
    if not trace_text.strip():
        return []
    return [node.strip(NODE_TRIM) for node in _ARROW_RE.split(trace_text.strip())]


_FRONTIER_SEP = re.compile(r",\s+")


def is_frontier(node: str) -> bool:
    """Whether a trace node is a frontier, ``{A, B}`` (:func:`frontier_trace`)."""
    return node.startswith("{") and node.endswith("}")


def node_names(node: str) -> list[str]:
    """What one trace node names: a frontier ``{A, B}`` → ``["A", "B"]`` (``{}`` → ``[]``); any
    other node → ``[node]``."""
    if is_frontier(node):  # ", " parts: an entity id has no whitespace
        return [n for n in (x.strip(NODE_TRIM) for x in _FRONTIER_SEP.split(node[1:-1])) if n]
    return [node]


def trace_steps(trace_text: str) -> tuple[list[str], list[str]]:
    """The trace's nodes (:func:`trace_nodes`) and the relation written in each arrow between them
    (``""`` for a bare ``->``): ``len(rels) == len(nodes) - 1`` unless the trace is empty."""
    nodes = trace_nodes(trace_text)
    rels = [m.group(0).strip()[1:-2] for m in _ARROW_RE.finditer(trace_text.strip())] if nodes else []
    return nodes, rels


def parsed_nodes(parsed: dict[str, Any]) -> list[str]:
    """:func:`trace_nodes` of an episode's ``parsed`` block (rows without ``trace_text``: its
    named entities)."""
    if "trace_text" in parsed:
        return trace_nodes(parsed.get("trace_text") or "")
    return list(parsed.get("trace_entities") or [])


def trace_hops(trace_text: str) -> int:
    """Hops written in a trace: the ``-relation->`` arrows, whether or not the entities exist."""
    return max(0, len(trace_nodes(trace_text)) - 1)


# ---------------------------------------------------------------------------------------------
# Stop rule
# ---------------------------------------------------------------------------------------------


def answer_end(text: str) -> int | None:
    """End of the ANSWER line :func:`parse_completion` reads (the first after the first TRACE
    line), once a newline has finished it; None before. Nothing after it counts, so generation
    may stop there."""
    _, a = trace_and_answer(text)
    return a.end() if a is not None and a.end() < len(text) else None


def cut_after_answer(text: str) -> str:
    """``text`` up to the end of the ANSWER line :func:`parse_completion` reads (all of it without one)."""
    _, a = trace_and_answer(text)
    return text[:a.end()] if a is not None else text


# ---------------------------------------------------------------------------------------------
# Chat template (shared by training and generation)
# ---------------------------------------------------------------------------------------------


def chat_prompt(tokenizer, prompt: str, system: str = SYSTEM_PROMPT) -> str:
    """The chat-template text for ``system`` + user ``prompt``, ending with the assistant header."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of chat-template ``text``: the tokenizer's BOS only if the text lacks it."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos_tok = getattr(tokenizer, "bos_token", None)
    if _adds_bos(tokenizer) and not (bos_tok and text.startswith(bos_tok)):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_chat(tokenizer, prompt: str, system: str = SYSTEM_PROMPT) -> list[int]:
    """Token ids of :func:`chat_prompt` (no double BOS)."""
    return encode_text(tokenizer, chat_prompt(tokenizer, prompt, system))


def shared_prefix_len(prompts: list[list[int]], min_len: int = 8) -> int:
    """Longest common token prefix, leaving every prompt at least one token (0 if < min_len): the
    system message and instructions every chat starts with, computed once by training and generation."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return n if n >= min_len else 0
