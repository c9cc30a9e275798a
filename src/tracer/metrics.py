"""Aggregate episode rows into phase metrics (pure Python, stdlib only)."""

from __future__ import annotations

import math
from typing import Any

from tracer.format import parsed_nodes, trace_hops, trace_nodes


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; n = 0 → (0.0, 0.0)."""
    if n <= 0:
        return 0.0, 0.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact (binomial) two-sided McNemar test of runs ``a`` and ``b`` on the questions both answered
    (episodes paired by ``ex_id``): ``fixed`` = wrong in a, right in b; ``broken`` = the reverse;
    ``p`` = the chance of a split at least this uneven if neither run were better."""
    right_a = {e["ex_id"]: bool(e["correct"]) for e in a}
    pairs = [(right_a[e["ex_id"]], bool(e["correct"])) for e in b if e["ex_id"] in right_a]
    fixed = sum(1 for x, y in pairs if not x and y)
    broken = sum(1 for x, y in pairs if x and not y)
    n = fixed + broken
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2 ** n if n else 1.0
    return {"n": len(pairs), "fixed": fixed, "broken": broken, "p": min(1.0, 2 * tail)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _full_length(e: dict[str, Any]) -> bool:
    p = e["parsed"]
    return p["valid_format"] and trace_hops(p.get("trace_text") or "") == int(e["hop_len"])


def _summary(eps: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(eps)
    correct = sum(1 for e in eps if e["correct"])
    lo, hi = wilson(correct, n)
    valid = [e for e in eps if e["parsed"]["valid_format"]]
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci": [lo, hi],
        "path_coverage": _mean([e["reward"]["path_coverage"] for e in eps]),
        "reward": _mean([e["reward"]["total"] for e in eps]),
        "format_rate": len(valid) / n if n else 0.0,
        "edge_precision": _mean([e["reward"]["edge_precision"] for e in valid]),
        "length_match": sum(map(_full_length, eps)) / n if n else 0.0,
    }


def hop_recall(episodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Recall of each hop position given a correct prefix, read from the trace's written nodes
    (:func:`tracer.format.trace_nodes`).

    For hop i (1-based), ``n`` counts the episodes whose trace's first i nodes follow the
    question's chain from its start through real edges toward the answer (``parsed.chain_nodes``
    >= i, :func:`tracer.reward.chain_walk`; episodes recorded before it existed: the first i
    nodes are gold path entities 0..i-1); ``recall`` is the share of them whose next hop does too,
    ``stopped`` the share whose trace has no more hops (a node that is no entity is a wrong hop,
    not a stop). Episodes of every format count (an invalid one's trace runs to the end of its
    text). Keyed by ``str(i)``.
    """
    reached: dict[int, list[int]] = {}  # hop -> [n, right, stopped]
    for e in episodes:
        p = e["parsed"]
        trace, gold = parsed_nodes(p), p.get("path_entities") or []
        if "chain_nodes" in p:  # judged against the graph: any valid branch is right
            for i in range(1, len(gold)):
                if p["chain_nodes"] < i:
                    break
                c = reached.setdefault(i, [0, 0, 0])
                c[0] += 1
                c[1] += p["chain_nodes"] > i
                c[2] += len(trace) == i
            continue
        for i in range(1, len(gold)):
            if trace[:i] != gold[:i]:
                break
            c = reached.setdefault(i, [0, 0, 0])
            c[0] += 1
            c[1] += len(trace) > i and trace[i] == gold[i]
            c[2] += len(trace) == i
    return {str(i): {"n": n, "recall": right / n, "stopped": stopped / n}
            for i, (n, right, stopped) in sorted(reached.items())}


FAILURES = ("format", "start", "broken", "branch", "short", "letter")


def failure(e: dict[str, Any]) -> str | None:
    """Why an episode is wrong (None when right, or recorded before ``walk_nodes`` existed):

    - ``format``: no well-formed TRACE/ANSWER (e.g. ran out of tokens);
    - ``start``: the trace does not start at the question's start entity;
    - ``branch``: the first wrong step is a real chain edge to where the rest of the chain can no
      longer reach the answer (the wrong branch of a many-target pair), whatever the trace writes
      after it (often a made-up hop to reach an option);
    - ``broken``: the first wrong step is a hop within the chain's length that is no edge of the
      graph under the chain's relation (a hallucinated hop or a wrong relation);
    - ``short``: real chain edges, on the answer's branch, that stop before the chain ends;
    - ``letter``: the trace follows the chain to the answer, and the letter is wrong.
    """
    p = e["parsed"]
    if e["correct"] or "walk_nodes" not in p:
        return None
    if not p["valid_format"]:
        return "format"
    h, on_path, walked = int(e["hop_len"]), p["chain_nodes"], p["walk_nodes"]
    written = len(trace_nodes(p.get("trace_text") or ""))
    if on_path == h + 1:
        return "letter"
    if walked == 0:
        return "start"
    if on_path < walked:
        return "branch"
    return "broken" if walked < min(written, h + 1) else "short"


def failures(episodes: list[dict[str, Any]]) -> dict[str, int]:
    """Wrong episodes per :func:`failure` kind (kinds in :data:`FAILURES` order; empty for old rows)."""
    kinds = [k for k in map(failure, episodes) if k]
    return {k: kinds.count(k) for k in FAILURES if k in kinds}


def aggregate(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase entry for metrics.json (without wall_s, finished_at, shuffle_agreement).

    ``edge_precision`` is averaged over valid-format episodes only (0.0 if none).
    ``length_match`` is the share of episodes whose valid trace has exactly ``hop_len`` hops.
    ``per_hop`` is keyed by ``str(hop_len)`` in ascending hop order; each entry has the same
    fields as the top level except ``correct``. ``hop_recall`` is :func:`hop_recall`,
    ``failures`` :func:`failures`.
    """
    out = _summary(episodes)
    by_hop: dict[int, list[dict[str, Any]]] = {}
    for e in episodes:
        by_hop.setdefault(int(e["hop_len"]), []).append(e)
    per_hop = {}
    for hop in sorted(by_hop):
        s = _summary(by_hop[hop])
        s.pop("correct")
        per_hop[str(hop)] = s
    out["per_hop"] = per_hop
    out["hop_recall"] = hop_recall(episodes)
    out["failures"] = failures(episodes)
    return out


def _picked(ep: dict[str, Any], example: dict[str, Any] | None) -> str | None:
    """The entity a valid episode picked, or None."""
    if example is None or not ep["parsed"]["valid_format"]:
        return None
    letter = ep["parsed"]["answer"]
    return example["options"].get(letter) if letter else None


def shuffle_agreement(orig_eps: list[dict[str, Any]], shuf_eps: list[dict[str, Any]],
                      orig_examples: list[dict[str, Any]], shuf_examples: list[dict[str, Any]]) -> float | None:
    """Fraction of questions where the same entity was picked before and after option shuffling.

    Pairs ``ex_id`` with ``ex_id + "-shuf"``; only questions present in both are counted.
    Invalid or missing answers count as disagreement. No pairs → None (nothing measured, not 0%).
    """
    ox = {e["id"]: e for e in orig_examples}
    sx = {e["id"]: e for e in shuf_examples}
    shuf_by_id = {e["ex_id"]: e for e in shuf_eps}
    pairs = 0
    agree = 0
    for ep in orig_eps:
        sid = ep["ex_id"] + "-shuf"
        sep = shuf_by_id.get(sid)
        if sep is None:
            continue
        pairs += 1
        a = _picked(ep, ox.get(ep["ex_id"]))
        b = _picked(sep, sx.get(sid))
        if a is not None and a == b:
            agree += 1
    return agree / pairs if pairs else None
