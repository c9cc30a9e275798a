"""Wrong answers of a phase, each with its trace's hops checked against the graph, as rich panels."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from tracer.errors import TracerError
from tracer.format import node_names, parsed_nodes, trace_steps
from tracer.report.load import as_run, read_episodes
from tracer.reward import written_hops

if TYPE_CHECKING:  # pragma: no cover
    from tracer.kg import KG


def _hop_list(ep: dict[str, Any], kg: KG | None) -> list[dict[str, Any]]:
    """The trace's written hops, each marked real when the graph has that edge, relation included
    (with ``kg``; else read from the episode's ``hallucinated_hops``)."""
    parsed = ep.get("parsed") or {}
    nodes = parsed_nodes(parsed)
    rels = trace_steps(parsed["trace_text"] or "")[1] if "trace_text" in parsed else [""] * len(nodes)
    bad = {tuple(h) for h in ep.get("hallucinated_hops") or [] if len(h) == 2}

    def real(a: str, r: str, b: str) -> bool:  # a frontier node b: every entity it lists
        if kg is None:
            return not any((a, y) in bad for y in node_names(b))
        if "trace_text" not in parsed:
            return kg.has_edge(a, b)
        return all(hop[3] for hop in written_hops([a, b], [r], kg))

    return [{"src": a, "dst": b, "real": real(a, r, b)} for a, r, b in zip(nodes, rels, nodes[1:])]


def wrong_examples(run: dict[str, Any] | str | Path, phase: str, n: int,
                   kg: KG | None = None) -> list[dict[str, Any]]:
    """First ``n`` wrong or invalid episodes of ``phase`` (file order).

    Each is the episode row plus ``status`` ("wrong"/"invalid") and ``hops``:
    [{"src", "dst", "real"}] for consecutive distinct trace entities (``real`` checked against
    ``kg`` when given, else taken from ``hallucinated_hops``); with ``kg`` also ``labels``
    (entity id → label for the entities involved).
    """
    run = as_run(run)
    if n < 0:
        raise TracerError(f"--wrong must be >= 0, got {n}")
    out = []
    for ep in read_episodes(run, phase):
        if len(out) >= n:
            break
        if ep.get("correct"):
            continue
        valid = bool((ep.get("parsed") or {}).get("valid_format"))
        row = dict(ep)
        row["status"] = "wrong" if valid else "invalid"
        row["hops"] = _hop_list(ep, kg)
        if kg is not None:
            parsed = ep.get("parsed") or {}
            ids = set(parsed.get("trace_entities") or []) | set(parsed.get("path_entities") or [])
            row["labels"] = {i: kg.entities[i].label for i in sorted(ids) if i in kg.entities}
        out.append(row)
    return out


def _node_spans(text: str, nodes: list[str]) -> list[tuple[int, int]]:
    """Positions of ``nodes`` found in order in ``text``; stops at the first miss."""
    spans, pos = [], 0
    for node in nodes:
        start = text.find(node, pos) if node else -1
        if start < 0:
            break
        spans.append((start, start + len(node)))
        pos = start + len(node)
    return spans


def _trace_text(ep: dict[str, Any]) -> Text:
    """The completion with hops coloured: green = KG edge, red = hallucinated."""
    completion = ep.get("completion") or ""
    text = Text(completion)
    parsed = ep.get("parsed") or {}
    trace = parsed.get("trace_text") or ""
    nodes = parsed_nodes(parsed)
    start = completion.find(trace) if trace else -1
    if start < 0 or not nodes:
        return text
    spans = [(a + start, b + start) for a, b in _node_spans(trace, nodes)]
    hops = ep.get("hops")
    if hops is None:
        hops = _hop_list(ep, None)
    for i, hop in enumerate(hops[: max(0, len(spans) - 1)]):
        style = "green" if hop["real"] else "bold red"
        text.stylize(style, spans[i][1], spans[i + 1][1])  # connector + destination node
    if spans:
        text.stylize("bold", spans[0][0], spans[0][1])
    return text


def examples_renderables(rows: Sequence[dict[str, Any]]) -> list[RenderableType]:
    """A Panel per example: id, hop length, answer vs gold, coloured trace, gold path."""
    out: list[RenderableType] = []
    for ep in rows:
        parsed = ep.get("parsed") or {}
        labels = ep.get("labels") or {}
        valid = bool(parsed.get("valid_format"))
        status = ep.get("status") or ("correct" if ep.get("correct") else "wrong" if valid else "invalid")
        gold_path = list(parsed.get("path_entities") or [])
        head = Text()
        head.append("answer: ")
        head.append(str(parsed.get("answer") or "—"), style="bold red" if not ep.get("correct") else "bold green")
        if not valid:
            head.append(" (invalid format)", style="red")
        head.append("   gold: ")
        head.append(str(ep.get("answer_star", "—")), style="bold green")
        if gold_path:
            head.append(f" ({_ent(gold_path[-1], labels)})", style="green")
        hops = ep.get("hops")
        if hops is None:
            hops = _hop_list(ep, None)
        bad = [h for h in hops if not h["real"]]
        foot = Text()
        foot.append("gold path: ", style="dim")
        foot.append(" → ".join(_ent(e, labels) for e in gold_path) or "—", style="cyan")
        if bad:
            foot.append("\nhallucinated hops: ", style="dim")
            foot.append(", ".join(f"{h['src']} → {h['dst']}" for h in bad), style="bold red")
        elif hops:
            foot.append("\nall hops are KG edges", style="dim green")
        title = f"{ep.get('ex_id', '?')} · {ep.get('hop_len', '?')} hops · {status}"
        out.append(Panel(Group(head, Text(""), _trace_text(ep), Text(""), foot), title=title,
                         title_align="left", border_style="red" if status != "correct" else "green"))
    return out


def _ent(e: str, labels: dict[str, str]) -> str:
    return f"{e} {labels[e]}" if e in labels and labels[e] != e else e
