"""Run by tests/test_distributed.py, alone and under `mlx.launch -n 2`: `tracer ARGS...` with GRPO's
KG reward plus a length bonus (the tiny random model's completions are all unparseable, and equal
rewards would leave nothing to learn)."""

import sys

from tracer import backend

backend.setup()

from tracer import grpo  # noqa: E402
from tracer.cli.main import main  # noqa: E402

kg_scorer = grpo.kg_scorer


def scorer_with_length_bonus(kg, cfg):
    score = kg_scorer(kg, cfg)

    def scored(text, row):
        s = score(text, row)
        return dict(s, total=s["total"] + 0.1 * len(text))

    return scored


grpo.kg_scorer = scorer_with_length_bonus

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
