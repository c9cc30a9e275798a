"""`tracer eval` on the tiny config."""

import json
from pathlib import Path


from tracer.cli import main


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_max_tokens_caps_completions(tiny_work):
    """Greedy answers under a 2-token budget are strict prefixes of the unbudgeted ones."""
    args = ["eval", "-c", "tiny.toml", "-n", "4", "--no-shuffled"]
    assert main(args + ["--run-dir", "full"]) == 0
    assert main(args + ["--max-tokens", "2", "--run-dir", "short"]) == 0
    full = read_jsonl(tiny_work / "full" / "episodes" / "eval.jsonl")
    short = read_jsonl(tiny_work / "short" / "episodes" / "eval.jsonl")
    assert len(full) == len(short) == 4
    for f, s in zip(full, short):
        assert f["completion"].startswith(s["completion"]) and len(s["completion"]) < len(f["completion"])
    assert main(args + ["--max-tokens", "0"]) == 2
