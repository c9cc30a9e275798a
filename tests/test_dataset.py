"""Question generation, splits, prompts and JSONL I/O (tracer.dataset)."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

from tracer import dataset as ds
from tracer.config import DataConfig
from tracer.errors import TracerError
from tracer.format import build_prompt, reference_trace
from tracer.kg import kg_from_dict, load_kg

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_KG = ROOT / "data" / "kg.json"
RELATIONS = ["caused_by", "leads_to", "diagnosed_by", "fixed_by", "uses_tool", "related_to"]


def synth_kg_dict(n_sym=40, n_cause=40, n_diag=20, n_fix=30, n_tool=15, seed=0, extra_edges=()):
    """A troubleshooting-shaped KG: functional per (src, rel) unless ``extra_edges`` add more."""
    rng = random.Random(seed)
    entities = []

    def make(prefix, n, etype):
        ids = [f"{prefix}{i:02d}" for i in range(n)]
        entities.extend({"id": i, "label": i, "type": etype} for i in ids)
        return ids

    syms = make("Sym", n_sym, "symptom")
    causes = make("Cause", n_cause, "cause")
    diags = make("Diag", n_diag, "diagnostic")
    fixes = make("Fix", n_fix, "fix")
    tools = make("Tool", n_tool, "tool")
    edges = set()
    for s in syms:
        edges.add((s, "caused_by", rng.choice(causes)))
        edges.add((s, "diagnosed_by", rng.choice(diags)))
        if rng.random() < 0.5:
            edges.add((s, "related_to", rng.choice([x for x in syms if x != s])))
    for c in causes:
        edges.add((c, "leads_to", rng.choice(syms)))
        edges.add((c, "fixed_by", rng.choice(fixes)))
    for d in diags:
        edges.add((d, "uses_tool", rng.choice(tools)))
    for f in fixes:
        edges.add((f, "uses_tool", rng.choice(tools)))
    edges.update(extra_edges)
    return {
        "version": "1",
        "domain": "test",
        "entities": entities,
        "relations": [{"id": r, "label": r.replace("_", " ")} for r in RELATIONS],
        "edges": [{"src": a, "rel": b, "dst": c} for a, b, c in sorted(edges)],
    }


@pytest.fixture(scope="module")
def kg():
    return kg_from_dict(synth_kg_dict(), "synthetic")


@pytest.fixture(scope="module")
def cfg():
    return DataConfig(eval_size=120, rsft_size=200, train_per_hop={"2": 300, "3": 300})


@pytest.fixture(scope="module")
def splits(kg, cfg):
    return ds.generate_splits(kg, cfg)


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED_KG.is_file():
        pytest.skip("data/kg.json not present")
    kg = load_kg(SHIPPED_KG)
    cfg = DataConfig()
    t0 = time.perf_counter()
    sp = ds.generate_splits(kg, cfg)
    return kg, cfg, sp, time.perf_counter() - t0


def rels_of(row):
    return [e["rel"] for e in row["path_star"]["edges"]]


def check_questions(kg, splits):
    for rows in splits.values():
        for row in rows:
            ents = row["path_star"]["entities"]
            reach = kg.follow(ents[0], rels_of(row))
            assert reach == {ents[-1]}, row["id"]
            opts = row["options"]
            assert list(opts) == ["A", "B", "C", "D"]
            assert len(set(opts.values())) == 4
            hits = [L for L, e in opts.items() if e in reach]
            assert hits == [row["answer_star"]], row["id"]
            assert opts[row["answer_star"]] == ents[-1]
            for L, e in opts.items():
                if L != row["answer_star"]:
                    assert not (kg.follow(ents[0], rels_of(row)) & {e})
            assert len(set(ents)) == len(ents)  # simple path
            for i, e in enumerate(row["path_star"]["edges"]):
                assert (e["src"], e["dst"]) == (ents[i], ents[i + 1])
                assert e["dst"] in kg.targets(e["src"], e["rel"])


def check_disjoint(splits):
    keys = {n: {ds.path_key(r) for r in rows} for n, rows in splits.items() if n != "eval_shuffled"}
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    assert len(keys["eval"]) == len(splits["eval"])
    assert len(keys["rsft"]) == len(splits["rsft"])


def check_letters(splits, tol):
    for name, rows in splits.items():
        for letter, frac in ds.letter_balance(rows).items():
            assert abs(frac - 0.25) <= tol, (name, letter, frac)


# ---------------------------------------------------------------------------------------------
# templates (prompts and reference traces: test_format.py)
# ---------------------------------------------------------------------------------------------


def test_templates_several_per_relation(kg):
    for rel in RELATIONS:
        texts = {ds.render_question(kg, "Sym00", [rel], t) for t in range(len(ds.ONE_HOP_TEMPLATES[rel]))}
        assert len(texts) >= 3
        assert all("Sym00" in t for t in texts)
    chain = {ds.render_question(kg, "Sym00", ["caused_by", "fixed_by", "uses_tool"], t) for t in range(5)}
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


# ---------------------------------------------------------------------------------------------
# generation rules on a synthetic KG
# ---------------------------------------------------------------------------------------------


def test_exactly_one_reachable_option(kg, splits):
    check_questions(kg, splits)


def test_splits_disjoint(splits):
    check_disjoint(splits)


def test_exclude_keeps_paths_out_of_every_split(kg, cfg, splits):
    held = frozenset(ds.path_key(r) for r in splits["eval"] + splits["rsft"])
    other = ds.generate_splits(kg, cfg.model_copy(update={"seed": 99}), held)
    for name, rows in other.items():
        assert rows and not {ds.path_key(r) for r in rows} & held, name
    plain = ds.generate_splits(kg, cfg.model_copy(update={"seed": 99}))
    assert {ds.path_key(r) for r in plain["rsft"]} & held  # without exclude the seeds' pools meet


def test_sizes_and_hop_mix(splits, cfg):
    assert len(splits["eval"]) == cfg.eval_size
    hops = [r["hop_len"] for r in splits["eval"]]
    assert hops.count(4) == hops.count(5) == cfg.eval_size // 2
    assert {r["hop_len"] for r in splits["rsft"]} <= {4, 5}
    assert len(splits["rsft"]) == cfg.rsft_size
    train_hops = [r["hop_len"] for r in splits["train"]]
    assert train_hops.count(2) == 300 and train_hops.count(3) == 300


def test_every_edge_covered(kg, splits, cfg):
    cov = ds.train_edge_coverage(splits["train"], kg)
    assert len(cov) == len(kg.edges)
    assert min(cov.values()) >= cfg.min_edge_coverage
    one_hop = {ds.path_key(r) for r in splits["train"] if r["hop_len"] == 1}
    assert {(e.src, (e.rel,), e.dst) for e in kg.edges} == one_hop


def test_letter_balance(splits, cfg):
    check_letters(splits, cfg.letter_tolerance)


def test_distractors_are_near_misses(kg, splits):
    same_type = total = 0
    for r in splits["eval"]:
        gold = r["options"][r["answer_star"]]
        for L, e in r["options"].items():
            if L != r["answer_star"]:
                total += 1
                same_type += kg.entities[e].type == kg.entities[gold].type
    assert same_type == total


def test_eval_shuffled(splits):
    ev, sh = splits["eval"], splits["eval_shuffled"]
    assert len(ev) == len(sh)
    for a, b in zip(ev, sh):
        assert b["id"] == a["id"] + "-shuf"
        assert b["meta"]["shuffled_from"] == a["id"]
        assert b["answer_star"] != a["answer_star"]
        assert b["options"][b["answer_star"]] == a["options"][a["answer_star"]]
        assert set(b["options"].values()) == set(a["options"].values())
        assert b["path_star"] == a["path_star"] and b["question"] == a["question"]
        assert b["ref"]["trace"].endswith(f"ANSWER: {b['answer_star']}")


def test_no_shuffled_split_when_disabled(kg):
    cfg = DataConfig(eval_size=40, rsft_size=40, train_per_hop={"2": 50, "3": 50}, shuffled_eval=False)
    assert set(ds.generate_splits(kg, cfg)) == {"train", "rsft", "eval"}


def test_facts_mode(kg):
    cfg = DataConfig(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    sp = ds.generate_splits(kg, cfg)
    check_questions(kg, sp)
    for rows in sp.values():
        for r in rows:
            facts_block = r["prompt"].split("Facts:\n", 1)[1].split("\n\n", 1)[0]
            facts = facts_block.split("\n")
            assert len(facts) <= cfg.max_facts
            assert len(set(facts)) == len(facts)
            for e in r["path_star"]["edges"]:
                assert f"{e['src']} -{e['rel']}-> {e['dst']}" in facts
            for f in facts:  # every listed fact is a real KG edge
                src, rest = f.split(" -", 1)
                rel, dst = rest.split("-> ", 1)
                assert dst in kg.targets(src, rel)
            assert r["meta"]["context"] == "facts"
    # distractor facts are present when there is room
    assert any(len(r["meta"]["facts"]) > r["hop_len"] for r in sp["eval"])


def test_facts_mode_needs_room_for_gold_edges(kg):
    cfg = DataConfig(eval_size=10, rsft_size=10, context="facts", max_facts=3)
    with pytest.raises(TracerError, match="max_facts"):
        ds.generate_splits(kg, cfg)


def test_not_enough_long_paths():
    small = kg_from_dict(synth_kg_dict(n_sym=6, n_cause=6, n_diag=4, n_fix=4, n_tool=4), "small")
    with pytest.raises(TracerError, match="eval_size"):
        ds.generate_splits(small, DataConfig(eval_size=5000))


def test_rsft_shortfall_is_a_warning(kg):
    n4 = len(ds.enumerate_paths(kg, [4, 5])[4]) + len(ds.enumerate_paths(kg, [4, 5])[5])
    cfg = DataConfig(eval_size=100, rsft_size=n4, train_per_hop={"2": 50, "3": 50})
    sp = ds.generate_splits(kg, cfg)
    assert 0 < len(sp["rsft"]) == n4 - 100
    summary = ds.summarize(sp, kg, cfg)
    assert any("rsft" in w for w in summary["warnings"])
    with pytest.raises(TracerError, match="RSFT"):
        ds.generate_splits(kg, DataConfig(eval_size=n4, rsft_size=10))


def test_non_functional_relations(kg):
    """A relation with several targets: chains through it become questions whose chain reaches
    several entities, exactly one of them an option; every target answers a 1-hop question."""
    d = synth_kg_dict(extra_edges=[("Sym00", "caused_by", "Cause39"), ("Sym00", "caused_by", "Cause38")])
    nf = kg_from_dict(d, "nonfunctional")
    targets = set(nf.follow("Sym00", ["caused_by"]))
    assert len(targets) >= 3
    cfg = DataConfig(eval_size=100, rsft_size=100, train_per_hop={"2": 200, "3": 200})
    sp = ds.generate_splits(nf, cfg)
    branching = 0
    for name, rows in sp.items():
        for r in rows:
            ents, rels = r["path_star"]["entities"], rels_of(r)
            reach = nf.follow(ents[0], rels)
            hits = [L for L, e in r["options"].items() if e in reach]
            assert hits == [r["answer_star"]]
            assert ds.canonical_path(nf, ents[0], tuple(rels), ents[-1]) == tuple(ents)  # the reference trace
            branching += len(reach) > 1 and r["hop_len"] > 1
    assert branching > 0  # multi-hop chains through the many-target pair are asked now
    one_hop = [r for r in sp["train"] if r["hop_len"] == 1 and r["path_star"]["entities"][0] == "Sym00"
               and rels_of(r) == ["caused_by"]]
    assert {r["path_star"]["entities"][-1] for r in one_hop} == targets
    for r in one_hop:  # distractors lie outside the pair's targets
        assert not (set(r["options"].values()) - {r["options"][r["answer_star"]]}) & targets
    cov = ds.train_edge_coverage(sp["train"], nf)
    assert min(cov.values()) >= cfg.min_edge_coverage


def test_generation_is_deterministic(kg, cfg, tmp_path):
    a = ds.write_splits(ds.generate_splits(kg, cfg), tmp_path / "a")
    b = ds.write_splits(ds.generate_splits(kg, cfg), tmp_path / "b")
    c = ds.write_splits(ds.generate_splits(kg, cfg.model_copy(update={"seed": cfg.seed + 1})), tmp_path / "c")
    assert set(a) == {"train", "rsft", "eval", "eval_shuffled"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()


# ---------------------------------------------------------------------------------------------
# the shipped KG with the default config
# ---------------------------------------------------------------------------------------------


def test_shipped_kg_default_config(shipped):
    kg, cfg, sp, seconds = shipped
    assert seconds < 10, f"generation took {seconds:.1f}s"
    assert len(sp["eval"]) >= 300
    assert len(sp["rsft"]) > 0
    check_questions(kg, sp)
    check_disjoint(sp)
    check_letters(sp, cfg.letter_tolerance)
    cov = ds.train_edge_coverage(sp["train"], kg)
    assert min(cov.values()) >= 3
    summary = ds.summarize(sp, kg, cfg)
    assert summary["edge_coverage"]["frac_covered"] == 1.0
    assert summary["splits"]["eval"]["n"] == len(sp["eval"])


def test_shipped_kg_files_byte_identical(shipped, tmp_path):
    kg, cfg, sp, _ = shipped
    a = ds.write_splits(sp, tmp_path / "a")
    b = ds.write_splits(ds.generate_splits(kg, cfg), tmp_path / "b")
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
    rows = ds.load_examples(a["eval"], kg)
    assert rows == sp["eval"]


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def test_summarize(kg, splits, cfg):
    s = ds.summarize(splits, kg, cfg)
    assert s["splits"]["eval"]["n"] == cfg.eval_size
    assert s["splits"]["eval"]["per_hop"] == {"4": 60, "5": 60}
    assert set(s["splits"]["train"]["per_hop"]) == {"1", "2", "3"}
    assert s["edge_coverage"]["min"] >= 3 and s["edge_coverage"]["frac_covered"] == 1.0
    assert s["edge_coverage"]["mean"] >= s["edge_coverage"]["min"]
    assert abs(sum(s["letters"]["train"].values()) - 1.0) < 1e-9
    assert s["warnings"] == []
    json.dumps(s)  # plain data


# ---------------------------------------------------------------------------------------------
# JSONL I/O
# ---------------------------------------------------------------------------------------------


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


def _follow_facts(facts, start, rels):
    """Entities reached from ``start`` along ``rels`` using only the listed facts."""
    edges = [re.match(r"^(\S+) -(\S+)-> (\S+)$", f).groups() for f in facts]
    now = {start}
    for rel in rels:
        now = {d for s, r, d in edges if s in now and r == rel}
    return now


def test_counterfactual_copies_contradict_the_kg_but_not_their_facts(kg):
    base = dict(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    plain = ds.generate_splits(kg, DataConfig(**base))
    sp = ds.generate_splits(kg, DataConfig(**base, counterfactual=0.25))
    n = len(plain["train"])
    # the ordinary splits are unchanged; the copies are added to train only
    assert sp["train"][:n] == plain["train"] and sp["eval"] == plain["eval"] and sp["rsft"] == plain["rsft"]
    cf = sp["train"][n:]
    assert len(cf) == round(0.25 * n) and len({r["id"] for r in cf}) == len(cf)
    held = {ds.path_key(r) for r in sp["eval"] + sp["rsft"]}
    by_id = {r["id"]: r for r in plain["train"]}
    for r in cf:
        src = by_id[r["meta"]["renamed_from"]]
        assert r["meta"]["counterfactual"] and r["hop_len"] == src["hop_len"]
        assert r["answer_star"] == src["answer_star"] and r["options"][r["answer_star"]] == r["path_star"]["entities"][-1]
        start, rels, answer = ds.path_key(r)
        # the prompt's facts lead to the gold option and to no other option ...
        reached = _follow_facts(r["meta"]["facts"], start, rels)
        assert [L for L, e in r["options"].items() if e in reached] == [r["answer_star"]]
        # ... while the KG (what a closed-book model remembers) does not lead to it
        assert answer not in kg.follow(start, list(rels))
        assert (start, rels, answer) not in held
        assert "Facts:\n" + "\n".join(r["meta"]["facts"]) + "\n\n" in r["prompt"]
        assert start in r["question"] and r["prompt"].endswith(
            "\n".join(f"{L}) {r['options'][L]}" for L in "ABCD"))
        assert r["ref"]["trace"] == reference_trace(r["path_star"]["entities"], r["path_star"]["edges"],
                                                       r["answer_star"])
        for e in r["path_star"]["entities"]:  # renamed within type
            assert e in kg.entities
        assert [kg.entities[e].type for e in r["path_star"]["entities"]] == \
            [kg.entities[e].type for e in src["path_star"]["entities"]]
    # the copies do not count as coverage of real KG edges
    assert ds.train_edge_coverage(sp["train"], kg) == ds.train_edge_coverage(plain["train"], kg)


def test_counterfactual_from_any_hop_keeps_a_real_prefix_and_renames_the_rest(kg):
    base = dict(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    plain = ds.generate_splits(kg, DataConfig(**base))
    sp = ds.generate_splits(kg, DataConfig(**base, counterfactual=0.25, counterfactual_from="any_hop"))
    n = len(plain["train"])
    assert sp["train"][:n] == plain["train"] and sp["eval"] == plain["eval"]
    cf, by_id = sp["train"][n:], {r["id"]: r for r in plain["train"]}
    assert len(cf) == round(0.25 * n)
    held = {ds.path_key(r) for r in sp["eval"] + sp["rsft"]}
    real_prefix = []
    for r in cf:
        src = by_id[r["meta"]["renamed_from"]]
        new, old = r["path_star"]["entities"], src["path_star"]["entities"]
        j = next(i for i, (a, b) in enumerate(zip(new, old)) if a != b)  # first renamed entity
        assert j >= 1 and new[-1] != old[-1] and new[:j] == old[:j]
        assert [kg.entities[e].type for e in new] == [kg.entities[e].type for e in old]
        assert len(ds._row_entities(r)) == len(ds._row_entities(src))  # fresh names: no two entities merged
        edges = r["path_star"]["edges"]
        for e in edges[: j - 1]:  # the hops before the renamed entity are KG facts, the one into it is not
            assert e["dst"] in kg.follow(e["src"], [e["rel"]])
        assert edges[j - 1]["dst"] not in kg.follow(edges[j - 1]["src"], [edges[j - 1]["rel"]])
        start, rels, answer = ds.path_key(r)
        assert answer not in kg.follow(start, list(rels)) and (start, rels, answer) not in held
        assert [L for L, e in r["options"].items() if e in _follow_facts(r["meta"]["facts"], start, rels)] == \
            [r["answer_star"]]
        real_prefix.append(j)
    assert max(real_prefix) >= 2  # some copies diverge mid-chain, not only at the answer


def test_counterfactual_pool_copies_follow_their_originals(kg):
    base = dict(eval_size=60, rsft_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    plain = ds.generate_splits(kg, DataConfig(**base))
    sp = ds.generate_splits(kg, DataConfig(**base, counterfactual_pool=0.5))
    assert sp["train"] == plain["train"] and sp["eval"] == plain["eval"]
    originals = [r for r in sp["rsft"] if not r["meta"].get("counterfactual")]
    assert originals == plain["rsft"]
    copies = [r for r in sp["rsft"] if r["meta"].get("counterfactual")]
    assert len(copies) == 30 and len({r["id"] for r in sp["rsft"]}) == len(sp["rsft"])
    held = {ds.path_key(r) for r in plain["eval"] + plain["rsft"]}
    for prev, r in zip(sp["rsft"], sp["rsft"][1:]):
        if r["meta"].get("counterfactual"):
            assert r["meta"]["renamed_from"] == prev["id"] and r["hop_len"] == prev["hop_len"]
            start, rels, answer = ds.path_key(r)
            assert answer not in kg.follow(start, list(rels)) and (start, rels, answer) not in held
            assert _follow_facts(r["meta"]["facts"], start, rels) & set(r["options"].values()) == {answer}


def test_pool_shortfall_is_counted_without_the_renamed_copies(kg):
    base = dict(eval_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    available = len(ds.generate_splits(kg, DataConfig(**base, rsft_size=10_000))["rsft"])
    cfg = DataConfig(**base, rsft_size=available + 1, counterfactual_pool=1.0)  # copies would cover the gap
    splits = ds.generate_splits(kg, cfg)
    assert len(splits["rsft"]) > available + 1
    warnings = ds.summarize(splits, kg, cfg)["warnings"]
    assert f"rsft has {available} questions, rsft_size asks for {available + 1}" in " ".join(warnings)


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


def test_counterfactual_needs_facts_mode():
    with pytest.raises(ValueError, match="context = 'facts'"):
        DataConfig(counterfactual=0.2)
    with pytest.raises(ValueError, match="counterfactual_pool"):
        DataConfig(counterfactual_pool=0.2)
