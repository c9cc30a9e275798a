"""How exact a run's frontier traces are, hop by hop, and what its wrong answers' last frontiers hold.

A frontier trace lists every entity each hop reaches (``data.trace = "frontier"``). Each written
frontier is judged one step at a time: against the entities that the chain's relation reaches
from the frontier the model wrote before it (so one mistake is counted once, not at every later
hop). Wrong answers are sorted by what their last written frontier holds among the four options.

    python bench/frontier_exact.py ../shared/data/multi-hop-reasoning/kg.json data/mhr_one/eval.jsonl \\
        docs/results/mhr_one/episodes/sft.jsonl

Prints, per hop position: how many traces reach it, the share whose frontier is exact, the true
frontier's mean size, and the entities missed and added per frontier; then the wrong answers'
counts by their last frontier.
"""

from __future__ import annotations

import argparse
from collections import Counter

from tracer.dataset import read_jsonl
from tracer.format import node_names, trace_steps, untagged
from tracer.kg import load_kg


def judge(kg, start: str, chain: list[str], trace_text: str) -> list[tuple[set[str], set[str]]]:
    """(written, true) frontier pairs for each hop the trace writes along the chain; stops at the
    first hop that names another relation than the chain's or a start other than the question's."""
    nodes, rels = trace_steps(untagged(trace_text))
    if not nodes or node_names(nodes[0]) != [start]:
        return []
    out, before = [], {start}
    for node, rel, want in zip(nodes[1:], rels, chain):
        if rel != want:
            break
        written = set(node_names(node))
        out.append((written, {t for e in before for t in kg.targets(e, rel)}))
        before = written
    return out


def last_frontier(written: set[str], options: dict[str, str], answer: str) -> str:
    """What a wrong answer's last written frontier holds among the options."""
    held = {k for k, v in options.items() if v in written}
    if not held:
        return "no option"
    if answer in held:
        return "answer alone (another letter picked)" if held == {answer} else "the answer and a distractor"
    return "a distractor, not the answer"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kg")
    ap.add_argument("eval", help="the eval file the episodes answer (JSONL; its prompts are checked)")
    ap.add_argument("episodes", help="a phase's episodes (JSONL)")
    args = ap.parse_args()
    kg = load_kg(args.kg)
    rows = {r["id"]: r for r in read_jsonl(args.eval)}
    per_hop: dict[int, list[tuple[set[str], set[str]]]] = {}
    wrong: Counter[str] = Counter()
    for ep in read_jsonl(args.episodes):
        row = rows.get(ep["ex_id"])
        if row is None or row["prompt"] != ep["prompt"]:  # another build of the splits reuses ids
            raise SystemExit(f"{args.episodes}: episode {ep['ex_id']} does not answer a question of {args.eval}")
        chain = [e["rel"] for e in row["path_star"]["edges"]]
        steps = judge(kg, row["path_star"]["entities"][0], chain, ep["parsed"].get("trace_text") or "")
        for i, pair in enumerate(steps, 1):
            per_hop.setdefault(i, []).append(pair)
        if not ep["correct"]:
            full = len(steps) == len(chain)
            wrong[last_frontier(steps[-1][0], row["options"], row["answer_star"]) if full else "short or off the chain"] += 1
    print(f"{'hop':>3} {'traces':>6} {'exact':>7} {'true size':>9} {'missed':>6} {'added':>6}")
    for h, pairs in sorted(per_hop.items()):
        n = len(pairs)
        exact = sum(w == t for w, t in pairs) / n
        size, missed, added = (sum(f(w, t) for w, t in pairs) / n for f in
                               (lambda w, t: len(t), lambda w, t: len(t - w), lambda w, t: len(w - t)))
        print(f"{h:>3} {n:>6} {100 * exact:>6.1f}% {size:>9.1f} {missed:>6.2f} {added:>6.2f}")
    print(f"\nwrong answers: {sum(wrong.values())}")
    for k, v in wrong.most_common():
        print(f"  {v:>4}  {k}")


if __name__ == "__main__":
    main()
