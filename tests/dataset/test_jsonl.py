"""JSONL files and example rows: writing, reading with located errors, validating and filling rows (tracer.dataset.jsonl)."""

from __future__ import annotations

import json
import re

import pytest

from tracer import dataset as ds
from tracer.errors import TracerError
from tracer.format import build_prompt


def test_write_jsonl_roundtrip_atomic(tmp_path):
    rows = [{"id": "x", "q": "naïve → ok"}, {"id": "y"}]
    p = ds.write_jsonl(tmp_path / "sub" / "f.jsonl", rows)
    assert ds.read_jsonl(p) == rows
    assert "naïve → ok" in p.read_text(encoding="utf-8")
    assert [q.name for q in p.parent.iterdir()] == ["f.jsonl"]  # no temp file left


def test_jsonl_keeps_rows_whose_strings_hold_unicode_line_separators(tmp_path):
    # a sampled completion may hold U+2028 / U+0085, which the writer leaves unescaped
    rows = [{"id": "x", "completion": "TRACE: A -r-> B\u2028\nANSWER: B\u0085"}, {"id": "y"}]
    assert ds.read_jsonl(ds.write_jsonl(tmp_path / "s.jsonl", rows)) == rows


def test_write_splits_nothing_written_on_bad_row(tmp_path):
    with pytest.raises(TypeError):
        ds.write_splits({"train": [{"id": 1}], "eval": [{"bad": object()}]}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_read_jsonl_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TracerError, match=re.escape(f"{missing}: no such file")):
        ds.read_jsonl(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n\n{"id": 2,\n', encoding="utf-8")
    with pytest.raises(TracerError, match=re.escape(f"{bad}:3: invalid JSON")):
        ds.read_jsonl(bad)
    arr = tmp_path / "arr.jsonl"
    arr.write_text('{"id": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(TracerError, match=re.escape(f"{arr}:2: ")):
        ds.read_jsonl(arr)
    with pytest.raises(TracerError, match=re.escape(f"{tmp_path}: not a file")):
        ds.read_jsonl(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(TracerError, match=re.escape(f"{empty}: no examples")):
        ds.read_jsonl(empty)


PUBLIC_ROW = {
    "id": "ex_eval_000000",
    "question": "Your system shows Sym00. What is the most likely underlying cause?",
    "options": {"A": "Diag01", "B": "Diag02", "C": "Diag03", "D": "Diag04"},
    "answer_star": "C",
    "path_star": {
        "entities": ["Sym00", "Cause01", "Fix02"],
        "edges": [{"src": "Sym00", "rel": "caused_by", "dst": "Cause01"},
                  {"src": "Cause01", "rel": "fixed_by", "dst": "Fix02"}],
    },
    "meta": {"topic": "caused_by", "difficulty": "hard"},
}


def test_load_examples_public_row(tmp_path):
    p = tmp_path / "public.jsonl"
    full = dict(PUBLIC_ROW, id="ex2", split="eval", hop_len=2, prompt="P", ref={"trace": "TRACE: prose\nANSWER: C",
                                                                                  "style_rules": ["x"]})
    p.write_text(json.dumps(PUBLIC_ROW) + "\n" + json.dumps(full) + "\n", encoding="utf-8")
    rows = ds.load_examples(p)
    r = rows[0]
    assert r["split"] == "unknown" and r["hop_len"] == 2
    assert r["prompt"] == build_prompt(PUBLIC_ROW["question"], PUBLIC_ROW["options"])
    assert r["ref"]["trace"] == "TRACE: Sym00 -caused_by-> Cause01 -fixed_by-> Fix02\nANSWER: C"
    assert r["meta"]["relations"] == ["caused_by", "fixed_by"] and r["meta"]["topic"] == "caused_by"
    assert ds.path_key(r) == ("Sym00", ("caused_by", "fixed_by"), "Fix02")
    # present fields are kept as they are
    assert rows[1]["prompt"] == "P" and rows[1]["ref"]["trace"] == "TRACE: prose\nANSWER: C"
    assert rows[1]["split"] == "eval"


def test_load_examples_without_edges(tmp_path):
    row = dict(PUBLIC_ROW, path_star={"entities": ["Sym00", "Cause01", "Fix02"]})
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (r,) = ds.load_examples(p)
    assert r["hop_len"] == 2 and r["path_star"]["edges"] == [] and "trace" not in r["ref"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"id": None}, "missing 'id'"),
        ({"question": None}, "missing 'question'"),
        ({"options": {"A": "x", "B": "y", "C": "z"}}, "options"),
        ({"answer_star": "E"}, "answer_star"),
        ({"path_star": {"entities": []}}, "path_star.entities"),
        ({"path_star": {"edges": []}}, "path_star.entities"),
        ({"answer_star": ["A"]}, "answer_star"),
        ({"meta": "a note"}, "'meta' must be an object, got str"),
        ({"ref": "TRACE: a\nANSWER: A"}, "'ref' must be an object, got str"),
    ],
)
def test_load_examples_required_fields(tmp_path, change, message):
    row = {k: v for k, v in {**PUBLIC_ROW, **change}.items() if v is not None}
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(PUBLIC_ROW) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(TracerError, match=rf"{re.escape(str(p))}:2: .*{message}"):
        ds.load_examples(p)


def test_load_examples_unknown_entity(tmp_path, kg):
    row = dict(PUBLIC_ROW, path_star={"entities": ["Sym00", "NotAnEntity"]})
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps(PUBLIC_ROW) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    ds.load_examples(tmp_path / "u.jsonl")  # no KG: accepted
    with pytest.raises(TracerError, match=rf"{re.escape(str(p))}:2: unknown entity 'NotAnEntity'"):
        ds.load_examples(p, kg)


def test_load_examples_roundtrip(tmp_path, kg, splits):
    paths = ds.write_splits(splits, tmp_path)
    for name, p in paths.items():
        assert ds.load_examples(p, kg) == splits[name]


def test_facts_of_a_row_must_be_strings(tmp_path):
    row = {"id": "q1", "question": "q?", "options": dict(zip("ABCD", "wxyz")), "answer_star": "A",
           "path_star": {"entities": ["s", "w"]}}
    for facts, msg in ([["s", "r", "w"]], "'meta.facts' must be a list of strings"), \
                      ("s -r-> w", "'meta.facts' must be a list of strings"):
        with pytest.raises(TracerError, match=re.escape(f"f:1: {msg}")):
            ds.normalize_row(dict(row, meta={"facts": facts}), "f:1", context="facts")
    with pytest.raises(TracerError, match="fact 's leads to w' is not written 'src -rel-> dst'"):
        ds.normalize_row(dict(row, meta={"facts": ["s leads to w"], "counterfactual": True}), "f:1", context="facts")
    assert "Facts:\ns -r-> w\n" in ds.normalize_row(dict(row, meta={"facts": ["s -r-> w"]}), "f:1", context="facts")["prompt"]
