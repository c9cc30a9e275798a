"""`tracer ask`: one question, its trace checked hop by hop against the graph."""

from pathlib import Path

import pytest

from tracer import ask
from tracer.config import Config
from tracer.errors import TracerError
from tracer.kg import KG, Edge, Entity, Relation, load_kg
from tracer.reward import EntityMatcher

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_free_text_question_and_options():
    q, opts = ask.parse_free_text("What is DiskFull caused by?\nA) LogGrowth\nB. CronJob\nC: Other\n D) Noise \n")
    assert q == "What is DiskFull caused by?" and opts == {"A": "LogGrowth", "B": "CronJob", "C": "Other", "D": "Noise"}
    for bad, msg in [("Q?\nA) x\nB) y", "four options"), ("A) a\nB) b\nC) c\nD) d", "empty")]:
        with pytest.raises(TracerError, match=msg):
            ask.parse_free_text(bad)
    text = "What is DiskFull caused by?\nA) LogGrowth\nB) CronJob\nC) Other\nD) Noise"
    assert ask.question_row(text)["prompt"].endswith("caused by?\nA) LogGrowth\nB) CronJob\nC) Other\nD) Noise")
    assert ask.question_row(text, tags=True)["prompt"].endswith("\nLogGrowth (A)\nCronJob (B)\nOther (C)\nNoise (D)")


def test_hops_are_checked_with_their_relation():
    kg = KG("1", "t", {n: Entity(n, n, "t") for n in "XYZ"}, {"r": Relation("r", "r")},
            [Edge("X", "r", "Y"), Edge("Y", "r", "Z")])
    hops = ask.checked_hops("TRACE: X -r-> Y -s-> Z -r-> X\nANSWER: A", kg, EntityMatcher(kg.entities))
    assert [h["real"] for h in hops] == [True, False, False] and hops[1] == {"src": "Y", "rel": "s", "dst": "Z", "real": False}


def test_ask_a_row_with_gold_is_scored(tiny_model):
    from tracer import dataset
    from tracer import model as models

    kg = load_kg(FIXTURES / "tiny_kg.json")
    cfg = Config()
    row = dataset.generate_splits(kg, cfg.data.model_copy(update={"eval_size": 4, "rsft_size": 0,
                                                                  "train_per_hop": {}, "eval_hops": [2]}))["eval"][0]
    model, tok = models.load(str(tiny_model))
    out = ask.ask(model, tok, row, kg, cfg)
    assert out["answer_star"] == row["answer_star"] and set(out["reward"]) >= {"total", "path_coverage"}
    assert isinstance(out["completion"], str) and all(set(h) == {"src", "rel", "dst", "real"} for h in out["hops"])
    free = ask.ask(model, tok, ask.question_row("Which?\nA) a\nB) b\nC) c\nD) d"), kg, cfg)
    assert "reward" not in free and free["id"] == "ask"


def test_ask_command(tiny_work, capsys):
    from tracer.cli import main

    assert main(["ask", "-c", "tiny.toml", "--id", "eval-00001"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "eval-00001" in out and "reward" in out
    assert main(["ask", "-c", "tiny.toml", "Which?\nA) a\nB) b\nC) c\nD) d"]) == 0
    for argv, msg in ((["ask", "-c", "tiny.toml"], "give a question text or --id"),
                      (["ask", "-c", "tiny.toml", "--id", "nope"], "no question with id 'nope'"),
                      (["ask", "-c", "tiny.toml", "Which?\nA) a"], "four options")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
