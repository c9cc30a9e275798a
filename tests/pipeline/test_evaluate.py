"""`tracer eval` on the tiny config."""

import json
from pathlib import Path


from tracer.cli import main


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_max_tokens_caps_completions(tiny_work, capsys):
    """Greedy answers under a 2-token budget are strict prefixes of the unbudgeted ones; a budget
    shorter than the reference traces is said."""
    args = ["eval", "-c", "tiny.toml", "-n", "4", "--no-shuffled"]
    assert main(args + ["--max-tokens", "96", "--run-dir", "full"]) == 0  # the tiny traces' longest is 68
    assert "eval.max_tokens" not in capsys.readouterr().out
    assert main(args + ["--max-tokens", "2", "--run-dir", "short"]) == 0
    assert "warning: 4 of 4 reference traces are longer than eval.max_tokens (2 tokens;" in capsys.readouterr().out
    full = read_jsonl(tiny_work / "full" / "episodes" / "eval.jsonl")
    short = read_jsonl(tiny_work / "short" / "episodes" / "eval.jsonl")
    assert len(full) == len(short) == 4
    for f, s in zip(full, short):
        assert f["completion"].startswith(s["completion"]) and len(s["completion"]) < len(f["completion"])
    assert main(args + ["--max-tokens", "0"]) == 2
