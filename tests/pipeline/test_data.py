"""The splits and the leakage guard: splits of other settings are refused, training rows that
overlap the eval split are refused or mark everything they reach."""

import json
from pathlib import Path

import pytest

from tracer.cli import main
from tracer.pipeline.data import ensure_data, eval_overlap, file_record


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rerecord(data_dir: Path) -> None:
    """Record hand-edited splits in splits.json, as if `tracer data` had written them."""
    record = json.loads((data_dir / "splits.json").read_text())
    record["files"] = {split: file_record(data_dir / f"{split}.jsonl") for split in record["files"]}
    (data_dir / "splits.json").write_text(json.dumps(record))


def test_a_split_file_changed_since_it_was_made_is_refused(tiny_work, capsys):
    """splits.json records each split's row count and SHA-256; a file cut at a line boundary (or
    edited) is one clear error, not a smaller eval."""
    assert main(["data", "-c", "tiny.toml"]) == 0
    data = tiny_work / "data" / "tiny"
    record = json.loads((data / "splits.json").read_text())["files"]
    assert set(record) == {"train", "rsft", "eval", "eval_shuffled"}
    assert record["eval"]["rows"] == 12 and len(record["eval"]["sha256"]) == 64
    eval_file = data / "eval.jsonl"
    full = eval_file.read_text()
    eval_file.write_text("".join(full.splitlines(keepends=True)[:5]))  # cut at a line boundary
    capsys.readouterr()
    assert main(["eval", "-c", "tiny.toml", "--run-dir", "cut"]) == 2
    err = capsys.readouterr().err
    assert "eval.jsonl: changed since `tracer data` wrote it (it has 5 rows, splits.json recorded 12)" in err
    assert len(err.strip().splitlines()) == 1 and not (tiny_work / "cut").exists()
    # the same rows, one of them edited; named explicitly with --examples as well
    eval_file.write_text(full.replace('"hop_len": ', '"hop_len":  ', 1))
    assert main(["eval", "-c", "tiny.toml", "--examples", str(eval_file), "--run-dir", "cut"]) == 2
    assert "content differs from the SHA-256 splits.json recorded" in capsys.readouterr().err
    eval_file.write_text(full)
    assert main(["eval", "-c", "tiny.toml", "-n", "2", "--no-shuffled", "--run-dir", "cut"]) == 0


def test_leakage_guard_refuses_and_marks(tiny_work, capsys):
    assert main(["data", "--config", "tiny.toml"]) == 0
    data = tiny_work / "data" / "tiny"
    eval_rows = read_jsonl(data / "eval.jsonl")
    leaky = data / "leaky.jsonl"
    leaky.write_text((data / "train.jsonl").read_text() + json.dumps(eval_rows[0]) + "\n")
    capsys.readouterr()
    assert main(["sft", "--config", "tiny.toml", "--train", str(leaky), "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "overlap the eval split" in err and eval_rows[0]["id"] in err
    assert not (tiny_work / "data" / "runs").exists()
    # a leaked path under a new id is caught as well
    renamed = dict(eval_rows[1], id="innocent-looking-id")
    leaky.write_text(json.dumps(renamed) + "\n")
    assert main(["sft", "--config", "tiny.toml", "--train", str(leaky), "--iters", "2"]) == 2
    # overriding trains; the adapter carries the mark into every eval that uses it
    leaky.write_text((data / "train.jsonl").read_text() + json.dumps(eval_rows[0]) + "\n")
    assert main(["sft", "--config", "tiny.toml", "--train", str(leaky), "--iters", "2", "--adapter-out", "leaky_adapter",
                 "--allow-eval-overlap"]) == 0
    assert json.loads((tiny_work / "leaky_adapter" / "adapter_config.json").read_text())["contaminated"] is True
    assert main(["eval", "--config", "tiny.toml", "--adapter", "leaky_adapter", "--run-dir", "leaky_run"]) == 0
    assert json.loads((tiny_work / "leaky_run" / "metrics.json").read_text())["contaminated"] is True
    # ... and so does a whole run trained on a leaky train split
    (data / "train.jsonl").write_text((data / "train.jsonl").read_text() + json.dumps(eval_rows[0]) + "\n")
    rerecord(data)  # (a split edited by hand is refused otherwise: see below)
    text = (tiny_work / "tiny.toml").read_text().replace('phases = ["base", "sft", "rsft", "consolidate"]', 'phases = ["sft"]')
    (tiny_work / "tiny.toml").write_text(text.replace("iters = 12", "iters = 2"))
    assert main(["run", "tiny.toml", "--allow-eval-overlap"]) == 0
    run = tiny_work / "data" / "runs" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["contaminated"] is True
    assert json.loads((run / "meta.json").read_text())["contaminated"] is True


def test_splits_of_other_data_settings_are_refused_not_reused(tiny_work, capsys):
    from tracer.config import load_config
    from tracer.errors import TracerError

    assert main(["data", "-c", "tiny.toml"]) == 0
    cfg = load_config(tiny_work / "tiny.toml")
    assert ensure_data(cfg) is None  # same settings: the files are reused
    split = tiny_work / "data" / "tiny" / "eval.jsonl"
    before = split.read_text()

    text = (tiny_work / "tiny.toml").read_text()
    (tiny_work / "other.toml").write_text(text.replace("seed = 7", "seed = 8", 1))
    code = main(["eval", "-c", "other.toml"])
    err = capsys.readouterr().err
    assert code == 2 and "data.seed" in err and len(err.strip().splitlines()) == 1, err
    assert split.read_text() == before

    kg_file = tiny_work / "data" / "tiny_kg.json"
    original = kg_file.read_text()
    kg = json.loads(original)
    kg_file.write_text(json.dumps(kg))  # reformatted only: still the same KG
    assert ensure_data(cfg) is None
    kg["edges"] = kg["edges"][1:]
    kg_file.write_text(json.dumps(kg))
    with pytest.raises(TracerError, match=r"\(the KG differ\)"):
        ensure_data(cfg)

    settings = tiny_work / "data" / "tiny" / "splits.json"
    kg_file.write_text(original)  # the KG as before
    record = json.loads(settings.read_text())
    del record["counterfactual_pool"]  # a record older than a knob left at its default
    settings.write_text(json.dumps(record))
    assert ensure_data(cfg) is None

    kg_file.write_text(json.dumps(kg))  # the changed KG again, but ...
    settings.unlink()  # ... splits from before splits.json existed are taken as they are
    assert ensure_data(cfg) is None


def test_entity_chain_counts_only_for_rows_without_relations():
    def row(rid, rels):
        edges = [{"src": s, "rel": r, "dst": d} for s, r, d in zip("ab", rels, "bc")]
        return {"id": rid, "path_star": {"entities": ["a", "b", "c"], "edges": edges}, "meta": {}}

    # the eval path a -r-> b -r-> c; the same entities by another relation are another question
    assert eval_overlap([row("bare", ""), row("other", "sr"), row("same", "rr")], [row("e1", "rr")]) == ["bare", "same"]


def test_another_answer_to_an_eval_question_is_refused():
    """On a many-to-many graph a row with an eval row's start and relation chain but another answer
    asks the same question (its frontier trace is the eval one's); a row whose chain begins with the
    eval row's and goes on passes through it (its trace reaches the eval answer on the way); a row
    whose chain is the start of the eval row's is another question (the eval goes one hop further)."""
    def row(rid, ents, rels):
        edges = [{"src": s, "rel": r, "dst": d} for s, r, d in zip(ents, rels, ents[1:])]
        return {"id": rid, "path_star": {"entities": ents, "edges": edges}, "meta": {}}

    ev = [row("e1", ["a", "b", "c"], ["r", "s"])]
    rows = [row("other-end", ["a", "x", "y"], ["r", "s"]), row("prefix", ["a", "b"], ["r"]),
            row("longer", ["a", "b", "c", "d"], ["r", "s", "t"]), row("other-start", ["z", "b", "c"], ["r", "s"])]
    assert eval_overlap(rows, ev) == ["other-end", "longer"]
