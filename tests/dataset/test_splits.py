"""The splits on a synthetic KG and on the shipped one: every generation rule, sizes, determinism (tracer.dataset.splits)."""

from __future__ import annotations

import time

import pytest

from tracer import dataset as ds
from tracer.dataset import splits as splits_mod
from tracer.config import DataConfig, RewardConfig
from tracer.dataset.paths import canonical_path
from tracer.dataset.verify import letter_balance
from tracer.errors import TracerError
from tracer.format import node_names, trace_steps
from tracer.kg import kg_from_dict, load_kg
from tracer.reward import EntityMatcher, score

from synthetic import SHIPPED_KG, synth_kg_dict


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
        for letter, frac in letter_balance(rows).items():
            assert abs(frac - 0.25) <= tol, (name, letter, frac)


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
            assert canonical_path(nf, ents[0], tuple(rels), ents[-1]) == tuple(ents)  # the reference trace
            branching += len(reach) > 1 and r["hop_len"] > 1
    assert branching > 0  # multi-hop chains through the many-target pair are asked now
    one_hop = [r for r in sp["train"] if r["hop_len"] == 1 and r["path_star"]["entities"][0] == "Sym00"
               and rels_of(r) == ["caused_by"]]
    assert {r["path_star"]["entities"][-1] for r in one_hop} == targets
    for r in one_hop:  # distractors lie outside the pair's targets
        assert not (set(r["options"].values()) - {r["options"][r["answer_star"]]}) & targets
    cov = ds.train_edge_coverage(sp["train"], nf)
    assert min(cov.values()) >= cfg.min_edge_coverage


def dense_many_to_many():
    """Every symptom with a second cause and every cause with a second symptom it leads to: most
    4-5-hop chains reach several entities, so questions with one start and chain and other answers
    abound."""
    extra = [(f"Sym{i:02d}", "caused_by", f"Cause{(7 * i + 3) % 40:02d}") for i in range(40)]
    extra += [(f"Cause{i:02d}", "leads_to", f"Sym{(11 * i + 5) % 40:02d}") for i in range(40)]
    return kg_from_dict(synth_kg_dict(extra_edges=extra), "dense")


def test_no_pool_question_asks_or_passes_through_an_eval_question(monkeypatch):
    """The RSFT pool shares no start and relation chain with the eval split, not only no path: on a
    many-to-many graph another answer of an eval question's chain would teach its frontier. Nor
    does a pool chain start with an eval question's and go on: its trace would reach the eval
    answer on the way. The other splits are what they would be without that rule, and --exclude
    keeps such questions out."""
    dense = dense_many_to_many()
    cfg = DataConfig(eval_size=100, rsft_size=200, train_per_hop={"2": 200, "3": 200})
    sp = ds.generate_splits(dense, cfg)
    asked = {n: [ds.asked(ds.path_key(r)) for r in rows] for n, rows in sp.items()}

    def through(rows, questions):
        return [i for i, r in enumerate(rows) if ds.passes_through(ds.path_key(r), questions)]

    assert not through(sp["rsft"], set(asked["eval"]))
    assert len(asked["eval"]) > len(set(asked["eval"]))  # eval itself asks some chains twice
    assert len(sp["rsft"]) == 200 and [r["id"] for r in sp["rsft"]] == [f"rsft-{i:05d}" for i in range(1, 201)]
    for r in sp["rsft"]:  # each replacement a question with exactly one reachable option
        reach = dense.follow(r["path_star"]["entities"][0], rels_of(r))
        assert [L for L, e in r["options"].items() if e in reach] == [r["answer_star"]]
    check_disjoint(sp)
    check_letters(sp, cfg.letter_tolerance)
    # without the rule the pool asks some eval questions; with it only those rows differ
    monkeypatch.setattr(splits_mod, "_pool_apart_from_eval", lambda kg, cfg, pools, sp, taken: sp["rsft"])
    with pytest.raises(TracerError, match=r"\d+ rsft question\(s\) ask or pass through an eval question"):
        ds.generate_splits(dense, cfg)  # verify_splits checks the rule
    monkeypatch.setattr(splits_mod, "verify_splits", lambda *a: None)
    plain = ds.generate_splits(dense, cfg)
    monkeypatch.undo()
    clash = through(plain["rsft"], set(asked["eval"]))
    same = [i for i in clash if ds.asked(ds.path_key(plain["rsft"][i])) in set(asked["eval"])]
    assert same and len(clash) > len(same)  # both kinds: another answer, and a longer chain
    assert all(plain[n] == sp[n] for n in ("train", "eval", "eval_shuffled"))
    assert [i for i, (a, b) in enumerate(zip(plain["rsft"], sp["rsft"])) if a != b] == clash
    assert all(plain["rsft"][i]["answer_star"] == sp["rsft"][i]["answer_star"] for i in clash)
    # a training hop length the eval shares: its training questions keep out of the eval's as well
    four = ds.generate_splits(dense, cfg.model_copy(update={"train_hops": [1, 2, 3, 4], "train_per_hop": {"4": 200}}))
    assert not through(four["train"], {ds.asked(ds.path_key(r)) for r in four["eval"]})
    assert any(r["hop_len"] == 4 for r in four["train"])
    held = frozenset(ds.path_key(r) for r in sp["eval"])
    other = ds.generate_splits(dense, cfg.model_copy(update={"seed": 5}), held)
    for name in ("rsft", "eval"):
        assert not through(other[name], set(asked["eval"])), name


def test_exclude_keeps_out_what_passes_through_held_out_questions_only():
    """--exclude: an excluded question of an eval hop length is neither asked again nor passed
    through; a shorter one (a training file's) is only not asked again: longer chains still start
    with it, as eval questions start with training chains."""
    dense = dense_many_to_many()
    cfg = DataConfig(eval_size=100, rsft_size=200, train_per_hop={"2": 200, "3": 200})
    sp = ds.generate_splits(dense, cfg)
    two_hop = [r for r in sp["train"] if r["hop_len"] == 2]
    other = ds.generate_splits(dense, cfg.model_copy(update={"seed": 5}),
                               frozenset(ds.path_key(r) for r in sp["eval"] + two_hop))
    held, short = ({ds.asked(ds.path_key(r)) for r in rows} for rows in (sp["eval"], two_hop))
    keys = [ds.path_key(r) for name in ("train", "rsft", "eval") for r in other[name]]
    assert not any(ds.passes_through(k, held) for k in keys)
    assert not any(ds.asked(k) in short for k in keys)
    assert any(ds.passes_through(k, short) for k in keys)


def test_frontier_traces_list_every_entity_each_hop_reaches(kg):
    """trace = 'frontier': the same questions, each reference trace naming the chain's whole frontier
    after every hop; the last frontier holds the answer and no distractor, and the trace scores full."""
    d = synth_kg_dict(extra_edges=[("Sym00", "caused_by", "Cause39"), ("Sym00", "caused_by", "Cause38")])
    nf = kg_from_dict(d, "nonfunctional")
    cfg = DataConfig(eval_size=100, rsft_size=100, train_per_hop={"2": 200, "3": 200})
    path, frontier = ds.generate_splits(nf, cfg), ds.generate_splits(nf, cfg.model_copy(update={"trace": "frontier"}))
    matcher, wide = EntityMatcher(nf.entities), 0
    for name in path:
        for p, f in zip(path[name], frontier[name]):
            assert {k: v for k, v in p.items() if k != "ref"} == {k: v for k, v in f.items() if k != "ref"}
            nodes, rels = trace_steps(f["ref"]["trace"].split("\n")[0].removeprefix("TRACE: "))
            start, chain = f["path_star"]["entities"][0], rels_of(f)
            assert nodes[0] == start and rels == chain
            for i, node in enumerate(nodes[1:], 1):
                assert set(node_names(node)) == nf.follow(start, chain[:i])
            wide += len(node_names(nodes[-1])) > 1
            assert f["ref"]["trace"].endswith(f"ANSWER: {f['answer_star']}")
            r = score(f["ref"]["trace"], f, matcher, nf, RewardConfig())
            assert r["correct"] and r["path_coverage"] == 1.0 and r["edge_precision"] == 1.0 and not r["spam_penalty"]
    assert wide > 0


def test_generation_is_deterministic(kg, cfg, tmp_path):
    a = ds.write_splits(ds.generate_splits(kg, cfg), tmp_path / "a")
    b = ds.write_splits(ds.generate_splits(kg, cfg), tmp_path / "b")
    c = ds.write_splits(ds.generate_splits(kg, cfg.model_copy(update={"seed": cfg.seed + 1})), tmp_path / "c")
    assert set(a) == {"train", "rsft", "eval", "eval_shuffled"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()


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


@pytest.mark.parametrize("trace", ["path", "frontier"])
def test_tagged_splits_ask_the_same_questions_with_letters_after_entities(kg, trace):
    """data.option_tags: the same questions, options written ``X (A)``, and every reference trace
    (the shuffled eval's included) tags the answer with its letter; it scores as the untagged one."""
    d = synth_kg_dict(extra_edges=[("Sym00", "caused_by", "Cause39"), ("Sym00", "caused_by", "Cause38")])
    nf = kg_from_dict(d, "nonfunctional")
    cfg = DataConfig(eval_size=100, rsft_size=100, train_per_hop={"2": 200, "3": 200}, trace=trace)
    plain, tagged = ds.generate_splits(nf, cfg), ds.generate_splits(nf, cfg.model_copy(update={"option_tags": True}))
    matcher = EntityMatcher(nf.entities)
    assert set(tagged) == set(plain) and "eval_shuffled" in tagged
    for name in plain:
        for p, t in zip(plain[name], tagged[name], strict=True):
            assert {k: v for k, v in p.items() if k not in ("ref", "prompt", "meta")} == \
                   {k: v for k, v in t.items() if k not in ("ref", "prompt", "meta")}
            assert t["meta"]["option_tags"] is True and "option_tags" not in p["meta"]
            letter, answer = t["answer_star"], t["options"][t["answer_star"]]
            assert t["prompt"].endswith("\n".join(f"{t['options'][L]} ({L})" for L in "ABCD"))
            line = t["ref"]["trace"].split("\n")[0]
            assert line.count(f"({letter})") == 1 and line.count("(") == 1 and f"{answer} ({letter})" in line
            assert t["ref"]["trace"].replace(f" ({letter})", "") == p["ref"]["trace"]
            assert score(t["ref"]["trace"], t, matcher, nf, RewardConfig()) == \
                   score(p["ref"]["trace"], p, matcher, nf, RewardConfig())
