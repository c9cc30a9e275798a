"""Does a trace write the relation chain its question names? Reads a phase's episodes and the
question file they answer.

    python bench/chain_adherence.py docs/results/mhr/episodes/sft.jsonl data/mhr/eval.jsonl

Prints how many traces write exactly the question's relation sequence, at which hop the written
relations first leave it, and how many right answers come with a trace that follows the chain
through real edges to the answer (``chain_nodes == hop_len + 1``).
"""

from __future__ import annotations

import sys
from collections import Counter

from tracer.dataset import read_jsonl
from tracer.format import trace_steps


def main(episodes_file: str, questions_file: str) -> None:
    chains = {r["id"]: [e["rel"] for e in r["path_star"]["edges"]] for r in read_jsonl(questions_file)}
    eps = read_jsonl(episodes_file)
    exact, first_off = 0, Counter()
    for e in eps:
        chain = chains[e["ex_id"]]
        rels = trace_steps(e["parsed"].get("trace_text") or "")[1]
        exact += rels == chain
        off = next((i for i, (a, b) in enumerate(zip(rels, chain), 1) if a != b), None)
        if off is not None:
            first_off[off] += 1
    right = [e for e in eps if e["correct"]]
    print(f"traces writing exactly the question's relations: {exact}/{len(eps)}")
    print("first written relation off the chain, by hop:", dict(sorted(first_off.items())))
    print(f"right answers whose trace follows the chain to the answer: "
          f"{sum(e['parsed'].get('chain_nodes') == e['hop_len'] + 1 for e in right)}/{len(right)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
