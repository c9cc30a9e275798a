"""JSONL I/O: question and episode files written atomically, read with errors that name the file
and line, and example rows (ours, or the public multi-hop-reasoning layout) validated and filled
in (:func:`load_examples`). Pure Python."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tracer.errors import TracerError
from tracer.format import LETTERS, build_prompt, is_fact, reference_trace
from tracer.runs import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from tracer.kg import KG

SPLIT_FILES = ("train", "rsft", "eval", "eval_shuffled")


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
    options = _checked_question(row, where)
    ents, edges = _checked_path(row["path_star"], where, kg)
    meta = _checked_meta(row, where)
    if not edges and isinstance(meta.get("relations"), list) and len(meta["relations"]) == len(ents) - 1:
        edges = [{"src": ents[i], "rel": r, "dst": ents[i + 1]} for i, r in enumerate(meta["relations"])]
    meta.setdefault("relations", [e["rel"] for e in edges])
    meta.setdefault("context", context)
    meta.setdefault("template", 0)
    hop_len = row.get("hop_len")
    if not isinstance(hop_len, int):
        hop_len = len(edges) if edges else len(ents) - 1
    tags = meta.get("option_tags", False)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        facts = meta.get("facts") if context == "facts" else None
        prompt = build_prompt(row["question"], options, facts, tags)
    ref = dict(row.get("ref") or {})
    if not isinstance(ref.get("trace"), str) and edges and len(edges) == len(ents) - 1:
        ref["trace"] = reference_trace(ents, edges, row["answer_star"], tags)
    out = {
        "id": str(row["id"]),
        "split": row.get("split") or "unknown",
        "hop_len": hop_len,
        "question": row["question"],
        "options": options,
        "answer_star": row["answer_star"],
        "path_star": {**row["path_star"], "entities": list(ents), "edges": edges},
        "prompt": prompt,
        "ref": ref,
        "meta": meta,
    }
    for k, v in row.items():
        if k not in _ROW_ORDER:
            out[k] = v
    return out


def _checked_question(row: dict[str, Any], where: str) -> dict[str, str]:
    """The row's options in A-D order, once its required fields, question and answer are checked."""
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
    return options


def _checked_path(ps: Any, where: str, kg: "KG | None") -> tuple[list[str], list[dict[str, str]]]:
    """The ``path_star`` entities and edges (src, rel, dst only), checked (the entities against ``kg``)."""
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
    return ents, edges


def _checked_meta(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of the row's ``meta``, once it and ``ref`` are objects and its facts are strings (a
    renamed row's written as facts: they are its reward's KG)."""
    for field in ("meta", "ref"):
        if row.get(field) is not None and not isinstance(row[field], dict):
            raise TracerError(f"{where}: '{field}' must be an object, got {type(row[field]).__name__}")
    meta = dict(row.get("meta") or {})
    facts = meta.get("facts")
    if facts is not None and (not isinstance(facts, list) or not all(isinstance(f, str) for f in facts)):
        raise TracerError(f"{where}: 'meta.facts' must be a list of strings")
    unparsed = [f for f in facts or [] if not is_fact(f)] if meta.get("counterfactual") else []
    if unparsed:
        raise TracerError(f"{where}: renamed row's fact {unparsed[0]!r} is not written 'src -rel-> dst'")
    return meta


def load_examples(path: str | Path, kg: "KG | None" = None, context: str = "closed") -> list[dict[str, Any]]:
    """Read and normalise example rows (ours, or the public multi-hop-reasoning layout)."""
    return [normalize_row(row, f"{path}:{lineno}", kg, context) for lineno, row in _read_lines(path)]
