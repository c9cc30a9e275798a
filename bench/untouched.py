"""Accuracy on the eval questions that no training row asks or passes through, for runs made on
splits from before that rule (``tracer.dataset.passes_through``). Reads the eval questions, the
training files a run learned from, and the runs' episodes.

    python bench/untouched.py data/mhr_frontier/eval.jsonl \\
        --train data/mhr_frontier/rsft.jsonl data/mhr_frontier/more_mix.jsonl \\
        --runs docs/results/mhr_frontier_pool/episodes/sft.jsonl docs/results/mhr_frontier_more/episodes/sft.jsonl

Prints how many eval questions the training rows touch, each run's accuracy (95% Wilson interval)
on the untouched and the touched ones, and the exact McNemar test of each run against the first
on the untouched questions. ``--write FILE`` writes the untouched questions as JSONL, to evaluate
a run on them (``tracer eval -e FILE``), for example the RSFT pool's questions that a run which
never saw the pool did not train through:

    python bench/untouched.py data/mhr/rsft.jsonl --train data/mhr/train.jsonl --write /tmp/pool.jsonl
"""

from __future__ import annotations

import argparse

from tracer.dataset import asked, passes_through, path_key, read_jsonl, write_jsonl
from tracer.metrics import mcnemar, wilson


def touched(eval_rows: list[dict], train_rows: list[dict]) -> set[str]:
    """Ids of the eval questions some training row asks or passes through."""
    eval_asked = {asked(path_key(q)) for q in eval_rows}
    keys = [k for k in map(path_key, train_rows) if passes_through(k, eval_asked)]  # the few that touch any
    return {q["id"] for q in eval_rows if any(passes_through(k, {asked(path_key(q))}) for k in keys)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval", help="the eval questions (JSONL)")
    ap.add_argument("--train", nargs="+", required=True, help="training files the runs learned from")
    ap.add_argument("--runs", nargs="*", default=[], help="episodes files (JSONL), one per run")
    ap.add_argument("--write", metavar="FILE", help="write the untouched questions to FILE (JSONL)")
    args = ap.parse_args()
    eval_rows = read_jsonl(args.eval)
    hit = touched(eval_rows, [r for f in args.train for r in read_jsonl(f)])
    untouched = [q for q in eval_rows if q["id"] not in hit]
    clean = [q["id"] for q in untouched]
    print(f"{len(eval_rows)} eval questions: {len(hit)} touched, {len(clean)} untouched")
    if args.write:
        write_jsonl(args.write, untouched)
    first = None
    for path in args.runs:
        eps = {e["ex_id"]: e for e in read_jsonl(path)}
        k = sum(bool(eps[i]["correct"]) for i in clean)
        lo, hi = wilson(k, len(clean))
        line = f"{path}: untouched {k}/{len(clean)} = {100 * k / len(clean):.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]"
        answered = [i for i in hit if i in eps]  # none when the run answered the untouched questions alone
        if answered:
            line += f", touched {sum(bool(eps[i]['correct']) for i in answered)}/{len(answered)}"
        mine = [eps[i] for i in clean]
        if first is None:
            first = mine
        else:
            m = mcnemar(first, mine)
            line += f"; against the first: {m['fixed']} fixed, {m['broken']} broken, p = {m['p']:.2g}"
        print(line)


if __name__ == "__main__":
    main()
