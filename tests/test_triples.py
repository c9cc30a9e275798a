"""Graphs brought as triples files, types files, `tracer kg stats`, and the public project's graph."""

import json
from pathlib import Path

import pytest

from tracer import dataset as ds
from tracer.cli import main
from tracer.config import DataConfig
from tracer.errors import TracerError
from tracer.kg import describe, load_kg

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_KG = ROOT.parent / "shared" / "data" / "multi-hop-reasoning" / "kg.json"
public = pytest.mark.skipif(not PUBLIC_KG.is_file(), reason="../shared/data/multi-hop-reasoning is not here")


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_tsv_and_csv_with_or_without_header(tmp_path):
    rows = [("Disk Full", "caused by", "Log Growth"), ("Log Growth", "fixed-by", "Rotate Logs")]
    plain = write(tmp_path / "a.tsv", "".join("\t".join(r) + "\n" for r in rows))
    header = write(tmp_path / "b.tsv", "head\trelation\ttail\n# a comment\n\n" + "".join("\t".join(r) + "\n" for r in rows))
    quoted = write(tmp_path / "c.csv", 'subject,predicate,object\n"Disk Full",caused by,Log Growth\n'
                                       'Log Growth,fixed-by,"Rotate Logs"\n')
    graphs = [load_kg(p) for p in (plain, header, quoted)]
    for kg in graphs:
        assert [(e.src, e.rel, e.dst) for e in kg.edges] == [("Disk_Full", "caused_by", "Log_Growth"),
                                                            ("Log_Growth", "fixed_by", "Rotate_Logs")]
        assert kg.entities["Disk_Full"].label == "Disk Full"  # labels keep the names
        assert kg.relations["fixed_by"].label == "fixed-by"
        # no types given: inferred from the relation that points at the entity
        assert kg.entities["Rotate_Logs"].type == "in:fixed_by" and kg.entities["Disk_Full"].type == "out:caused_by"


def test_types_file_and_duplicates(tmp_path):
    kg_file = write(tmp_path / "g.tsv", "a\tr\tb\na\tr\tb\nb\tr\tb\nb\ts\tc\n")
    kg = load_kg(kg_file)
    assert len(kg.edges) == 2
    assert any("1 duplicate" in n for n in kg.notes) and any("1 self-loop" in n for n in kg.notes)
    types = write(tmp_path / "types.csv", "entity,type\na,symptom\nb,cause\n")
    typed = load_kg(kg_file, types)
    assert typed.entities["a"].type == "symptom" and typed.entities["b"].type == "cause"
    assert typed.entities["c"].type == "in:s"  # missing from the file: inferred, and said so
    assert any("1 entities without a type" in n for n in typed.notes)


@pytest.mark.parametrize("name, text, message", [
    ("ragged.tsv", "a\tr\tb\nc\td\n", "ragged.tsv:2: expected 3 columns (head, relation, tail), got 2"),
    ("empty.tsv", "a\tr\tb\n\t\tc\n", "empty.tsv:2: empty head"),
    ("empty_rel.csv", "a,r,b\nc,,d\n", "empty_rel.csv:2: empty relation"),
    ("none.tsv", "head\trelation\ttail\n# nothing\n", "none.tsv: no edges"),
    ("g.txt", "a r b\n", "g.txt: unknown KG format '.txt'"),
    ("clash.tsv", "a b\tr\tc\na_b\tr\td\n", "clash.tsv:2: entity names 'a b' and 'a_b' both become id 'a_b'"),
    ("bad.tsv", "a\t!!!\tb\n", "bad.tsv:1: relation '!!!' has no letters or digits"),
])
def test_bad_triples_files_name_the_file_and_line(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(TracerError) as err:
        load_kg(path)
    assert str(err.value).startswith(f"{tmp_path}/{message}")


def test_bad_types_file(tmp_path):
    kg_file = write(tmp_path / "g.tsv", "a\tr\tb\n")
    for text, msg in [("a,x\nzz,y\n", "types.csv:2: unknown entity 'zz'"), ("a,x\na,y\n", "has two types"),
                      ("a,x,z\n", "types.csv:1: expected 2 columns (entity, type), got 3")]:
        with pytest.raises(TracerError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            load_kg(kg_file, write(tmp_path / "types.csv", text))


def test_cli_bad_triples_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "g.tsv", "a\tr\tb\nc\td\n")
    for argv in (["data", "--kg", "g.tsv", "--data-dir", "out"], ["kg", "stats", "g.tsv"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: g.tsv:2: expected 3 columns (head, relation, tail), got 2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.tsv"]


def chain_graph_tsv(path: Path) -> str:
    """A small many-to-many graph: 12 symptoms, each caused by 2 of 8 causes, each cause fixed by
    2 of 8 fixes, each fix using one of 4 tools."""
    rows = []
    for i in range(12):
        rows += [(f"S{i}", "caused_by", f"C{i % 8}"), (f"S{i}", "caused_by", f"C{(i * 3 + 1) % 8}")]
    for j in range(8):
        rows += [(f"C{j}", "fixed_by", f"F{j}"), (f"C{j}", "fixed_by", f"F{(j + 3) % 8}")]
        rows += [(f"F{j}", "uses_tool", f"T{j % 4}")]
    return write(path, "".join("\t".join(r) + "\n" for r in rows))


def test_small_many_to_many_graph_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    chain_graph_tsv(tmp_path / "g.tsv")
    kg = load_kg("g.tsv")
    assert describe(kg)["multi_pairs"] == 12 + 8
    cfg = DataConfig(kg="g.tsv", train_hops=[1, 2], eval_hops=[3], eval_size=8, rsft_size=4,
                     train_per_hop={"2": 20}, letter_tolerance=0.25)
    sp = ds.generate_splits(kg, cfg)
    for rows in sp.values():
        for r in rows:
            ents, rels = r["path_star"]["entities"], [e["rel"] for e in r["path_star"]["edges"]]
            reach = kg.follow(ents[0], rels)
            assert [L for L in "ABCD" if r["options"][L] in reach] == [r["answer_star"]]
    assert any(len(kg.follow(r["path_star"]["entities"][0], r["meta"]["relations"])) > 1 for r in sp["eval"])
    assert main(["kg", "stats", "g.tsv", "--config", write(tmp_path / "c.toml", "[data]\neval_hops = [3]\n")]) == 0
    out = capsys.readouterr().out
    assert "with several targets" in out and "Questions the generator can make" in out
    assert 'consider data.trace = "frontier"' in " ".join(out.split())
    assert main(["kg", "stats", "g.tsv", "--config", write(tmp_path / "f.toml", '[data]\ntrace = "frontier"\n')]) == 0
    assert "consider" not in capsys.readouterr().out


@public
def test_public_project_graph_default_settings(tmp_path, monkeypatch):
    """The done-when of the real-graph issue: default settings on the public project's kg.json,
    and the same triples as a headerless TSV."""
    monkeypatch.chdir(tmp_path)
    assert main(["data", "--kg", str(PUBLIC_KG), "--data-dir", "json"]) == 0
    d = json.loads(PUBLIC_KG.read_text())
    write(tmp_path / "kg.tsv", "".join(f"{e['src']}\t{e['rel']}\t{e['dst']}\n" for e in d["edges"]))
    assert main(["data", "--kg", "kg.tsv", "--data-dir", "tsv"]) == 0
    for out, kg in (("json", load_kg(PUBLIC_KG)), ("tsv", load_kg("kg.tsv"))):
        sp = {s: ds.read_jsonl(tmp_path / out / f"{s}.jsonl") for s in ("train", "rsft", "eval")}
        assert len(sp["eval"]) >= 300 and len(sp["rsft"]) >= 600
        assert {r["hop_len"] for r in sp["eval"] + sp["rsft"]} == {4, 5}
        assert min(ds.train_edge_coverage(sp["train"], kg).values()) >= 3
        for rows in sp.values():
            for r in rows:
                ds.verify_row(kg, r)  # exactly one option reachable by the chain, a real reference path


def test_types_file_through_the_cli_and_the_sft_budget_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    chain_graph_tsv(tmp_path / "g.tsv")
    types = "".join(f"{p}{i},{kind}\n" for p, kind, n in (("S", "symptom", 12), ("C", "cause", 8),
                                                         ("F", "fix", 8), ("T", "tool", 4)) for i in range(n))
    write(tmp_path / "types.csv", types)
    cfg = write(tmp_path / "c.toml", "[data]\ntrain_hops = [1]\neval_hops = [2]\neval_size = 8\nrsft_size = 4\n"
                                     "letter_tolerance = 0.25\n[sft]\niters = 2\nbatch_size = 4\n")
    assert main(["data", "-c", cfg, "--kg", "g.tsv", "--types", "types.csv", "--data-dir", "d"]) == 0
    out, err = capsys.readouterr()
    assert "SFT trains on 8 examples (sft.iters x sft.batch_size)" in err
    settings = json.loads((tmp_path / "d" / "splits.json").read_text())
    assert settings["types_sha256"] and "types" not in settings
    rows = ds.read_jsonl(tmp_path / "d" / "eval.jsonl")
    kg = load_kg("g.tsv", "types.csv")
    typed = 0
    for r in rows:  # distractors of the answer's type, wherever three of that type are unreached
        ents, rels = r["path_star"]["entities"], r["meta"]["relations"]
        kind = kg.entities[ents[-1]].type
        free = [e for e, x in kg.entities.items() if x.type == kind and e not in kg.follow(ents[0], rels)]
        if len(free) >= 3:
            typed += 1
            assert {kg.entities[e].type for e in r["options"].values()} == {kind}
    assert typed >= len(rows) // 2
