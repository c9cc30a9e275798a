"""One question row from a path: templates, the row schema, near-miss distractors (tracer.dataset.questions, .templates)."""

from __future__ import annotations

from tracer.dataset.templates import ONE_HOP_TEMPLATES, render_question
from tracer.format import build_prompt, reference_trace
from synthetic import RELATIONS


def test_templates_several_per_relation(kg):
    for rel in RELATIONS:
        texts = {render_question(kg, "Sym00", [rel], t) for t in range(len(ONE_HOP_TEMPLATES[rel]))}
        assert len(texts) >= 3
        assert all("Sym00" in t for t in texts)
    chain = {render_question(kg, "Sym00", ["caused_by", "fixed_by", "uses_tool"], t) for t in range(5)}
    assert len(chain) >= 3
    assert "Start from `Sym00`. Follow caused by, then fixed by, then uses tool. Which entity do you reach?" in chain


def test_rows_use_entity_ids_and_schema(splits):
    row = splits["eval"][0]
    assert list(row) == ["id", "split", "hop_len", "question", "options", "answer_star", "path_star",
                         "prompt", "ref", "meta"]
    assert row["id"] == "eval-00001" and splits["train"][0]["id"] == "train-00001"
    assert splits["rsft"][0]["id"] == "rsft-00001"
    for name, rows in splits.items():
        for r in rows:
            assert r["split"] == name
            assert r["path_star"]["entities"][0] in r["question"]
            assert r["hop_len"] == len(r["path_star"]["edges"]) == len(r["meta"]["relations"])
            assert r["ref"]["trace"] == reference_trace(r["path_star"]["entities"], r["path_star"]["edges"],
                                                           r["answer_star"])
            assert r["prompt"] == build_prompt(r["question"], r["options"], r["meta"].get("facts"))
            assert isinstance(r["meta"]["template"], int)


def test_distractors_are_near_misses(kg, splits):
    same_type = total = 0
    for r in splits["eval"]:
        gold = r["options"][r["answer_star"]]
        for L, e in r["options"].items():
            if L != r["answer_star"]:
                total += 1
                same_type += kg.entities[e].type == kg.entities[gold].type
    assert same_type == total
