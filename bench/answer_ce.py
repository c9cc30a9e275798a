"""Teacher-forced cross-entropy of the answer letter's token vs every other completion token.

Shows whether a model maps the trace's last entity to its option letter (the letter's loss falls
below ln 4 = 1.386) or only knows the letters' marginal (it stays at ln 4), independently of
whether the trace itself is right. Rows are spread evenly over the file.

    python bench/answer_ce.py --rows data/facts_scratch/train.jsonl -n 96 \
        data/runs/facts_scratch120/models/sft data/runs/facts_letter/models/sft
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter


def answer_ce(model, tok, pairs: list[tuple[str, str]], batch_size: int = 16) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from tracer import batching

    examples = batching.encode_pairs(tok, pairs, 512)
    answers = batching.answer_indices(tok, pairs, examples)
    ce = {True: [], False: []}
    letters = Counter()
    for i in range(0, len(examples), batch_size):
        b = batching.collate(examples[i: i + batch_size], False, None, answers[i: i + batch_size], 2.0)
        logits = model(b.inputs)
        logits = logits.reshape(-1, logits.shape[-1])[b.positions]
        losses = nn.losses.cross_entropy(logits, b.targets, reduction="none").tolist()
        at_answer = [w == 2.0 for w in b.weights.tolist()]
        for loss, is_answer in zip(losses, at_answer):
            ce[is_answer].append(loss)
        best = mx.argmax(logits, axis=-1).tolist()
        letters.update(tok.decode([t]).strip() for t, a in zip(best, at_answer) if a)
    return {"answer_ce": sum(ce[True]) / len(ce[True]), "other_ce": sum(ce[False]) / len(ce[False]),
            "answers": len(ce[True]), "argmax": dict(sorted(letters.items()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapters", nargs="*", help="Adapter directories (none: the base model).")
    ap.add_argument("--rows", default="data/train.jsonl", help="Questions JSONL with reference traces.")
    ap.add_argument("-n", type=int, default=96, help="Rows, spread evenly over the file.")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Base model.")
    args = ap.parse_args()

    from tracer import backend

    backend.setup()  # before mlx
    from tracer import model as models

    rows = [json.loads(line) for line in open(args.rows)]
    rows = rows[:: max(len(rows) // args.n, 1)][: args.n]
    pairs = [(r["prompt"], r["ref"]["trace"]) for r in rows]
    print(f"{len(pairs)} rows of {args.rows}; chance for the letter: ln 4 = {math.log(4):.3f}")
    print("| adapter | answer-letter CE | other tokens' CE | argmax letter |\n|---|---:|---:|---|")
    for adapter in args.adapters or [None]:
        model, tok = models.load(args.model, adapter=adapter)
        r = answer_ce(model, tok, pairs)
        print(f"| {adapter or 'base'} | {r['answer_ce']:.4f} | {r['other_ce']:.4f} | {r['argmax']} |", flush=True)


if __name__ == "__main__":
    main()
