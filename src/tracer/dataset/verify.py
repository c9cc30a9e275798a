"""The rules a set of splits must satisfy, checked (:func:`verify_splits`, raising on the first
broken one) and summarised (:func:`summarize`, plain data with warnings). Pure Python."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from tracer.dataset.paths import asked, passes_through, path_key, unique_edges
from tracer.errors import TracerError
from tracer.format import LETTERS, edge_tuple, format_fact

if TYPE_CHECKING:  # pragma: no cover
    from tracer.config import DataConfig
    from tracer.kg import KG

DEFAULT_MIN_EDGE_COVERAGE = 3


def train_edge_coverage(rows: list[dict[str, Any]], kg: "KG") -> dict[tuple[str, str, str], int]:
    """Times each (unique) KG edge appears in the paths of ``rows``."""
    cov = {e: 0 for e in unique_edges(kg)}
    for row in rows:
        if (row.get("meta") or {}).get("counterfactual"):
            continue
        for e in row["path_star"].get("edges") or []:
            t = edge_tuple(e)
            if t in cov:
                cov[t] += 1
    return cov


def letter_balance(rows: list[dict[str, Any]]) -> dict[str, float]:
    n = len(rows)
    c = Counter(r["answer_star"] for r in rows)
    return {L: (c[L] / n if n else 0.0) for L in LETTERS}


def verify_row(kg: "KG", row: dict[str, Any]) -> None:
    """Raise TracerError unless the row has 4 distinct options and exactly one (gold) is reachable."""
    rid = row.get("id", "?")
    opts = row["options"]
    if list(opts) != list(LETTERS):
        raise TracerError(f"{rid}: options must be A-D, got {list(opts)}")
    if len(set(opts.values())) != 4:
        raise TracerError(f"{rid}: duplicate options {opts}")
    ents = row["path_star"]["entities"]
    edges = row["path_star"]["edges"]
    rels = [e["rel"] for e in edges]
    for i, e in enumerate(edges):
        if (e["src"], e["dst"]) != (ents[i], ents[i + 1]) or e["dst"] not in kg.targets(e["src"], e["rel"]):
            raise TracerError(f"{rid}: path edge {format_fact(e)} is not in the KG")
    if len(set(ents)) != len(ents):
        raise TracerError(f"{rid}: path repeats an entity")
    reach = kg.follow(ents[0], rels)
    hits = [L for L in LETTERS if opts[L] in reach]
    if hits != [row["answer_star"]] or opts[row["answer_star"]] != ents[-1]:
        raise TracerError(f"{rid}: expected exactly the gold option reachable, reachable: {hits}")


def verify_splits(kg: "KG", splits: dict[str, list[dict[str, Any]]], cfg: "DataConfig") -> None:
    """Check every generation rule; raise TracerError on the first violation."""
    for rows in splits.values():
        for row in rows:
            verify_row(kg, row)
    keys = {name: {path_key(r) for r in rows} for name, rows in splits.items() if name != "eval_shuffled"}
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = keys[a] & keys[b]
            if both:
                s, rels, d = sorted(both)[0]
                raise TracerError(f"splits {a} and {b} share {len(both)} path(s), e.g. {s} {list(rels)} {d}")
    eval_asked = {asked(k) for k in keys.get("eval", ())}
    for name in ("train", "rsft"):
        through = sorted(k for k in keys.get(name, ()) if passes_through(k, eval_asked))
        if through:
            s, rels, _ = through[0]
            raise TracerError(f"{len(through)} {name} question(s) ask or pass through an eval question, "
                              f"e.g. {s} {list(rels)}")
    if len(keys.get("eval", ())) != len(splits.get("eval", ())):
        raise TracerError("eval repeats a path")
    if len(keys.get("rsft", ())) != len(splits.get("rsft", ())):
        raise TracerError("rsft repeats a path")
    for name, rows in splits.items():
        n = len(rows)
        # the balanced block scheme is off by at most 3/4 of a question per letter
        if n and n * cfg.letter_tolerance >= 0.75:
            bal = letter_balance(rows)
            worst = max(abs(v - 0.25) for v in bal.values())
            if worst > cfg.letter_tolerance + 1e-12:
                raise TracerError(f"{name}: answer letters unbalanced {bal}")
    if "eval_shuffled" in splits:
        for a, b in zip(splits["eval"], splits["eval_shuffled"]):
            if b["meta"].get("shuffled_from") != a["id"] or b["answer_star"] == a["answer_star"]:
                raise TracerError(f"{b['id']}: not a letter-changing shuffle of {a['id']}")
    if 1 in cfg.train_hops and cfg.min_edge_coverage > 0:
        cov = train_edge_coverage(splits["train"], kg)
        low = sorted(e for e, c in cov.items() if c < cfg.min_edge_coverage and e[0] != e[2])
        if low:
            raise TracerError(
                f"{len(low)} KG edge(s) appear in fewer than {cfg.min_edge_coverage} training paths, "
                f"e.g. {format_fact(low[0])}"
            )


def summarize(
    splits: dict[str, list[dict[str, Any]]], kg: "KG", cfg: "DataConfig | None" = None
) -> dict[str, Any]:
    """Counts per split and hop, train edge coverage, letter balance, warnings (plain data)."""
    min_cov = cfg.min_edge_coverage if cfg is not None else DEFAULT_MIN_EDGE_COVERAGE
    out: dict[str, Any] = {"splits": {}, "letters": {}, "warnings": []}
    warnings: list[str] = out["warnings"]
    for name, rows in splits.items():
        per_hop = Counter(int(r["hop_len"]) for r in rows)
        out["splits"][name] = {"n": len(rows), "per_hop": {str(h): per_hop[h] for h in sorted(per_hop)}}
        out["letters"][name] = letter_balance(rows)
    cov = train_edge_coverage(splits.get("train", []), kg)
    vals = list(cov.values())
    out["edge_coverage"] = {
        "edges": len(vals),
        "min": min(vals) if vals else 0,
        "mean": round(sum(vals) / len(vals), 3) if vals else 0.0,
        "required": min_cov,
        "frac_covered": round(sum(v >= min_cov for v in vals) / len(vals), 4) if vals else 1.0,
    }
    if vals and min(vals) < min_cov:
        warnings.append(f"{sum(v < min_cov for v in vals)} KG edge(s) appear in fewer than {min_cov} training paths")
    if cfg is not None:
        n_eval = len(splits.get("eval", []))
        n_rsft = sum(not r["meta"].get("counterfactual") for r in splits.get("rsft", []))  # renamed copies are extra
        if n_eval < cfg.eval_size:
            warnings.append(f"eval has {n_eval} questions, eval_size asks for {cfg.eval_size}")
        if n_rsft < cfg.rsft_size:
            warnings.append(
                f"rsft has {n_rsft} questions, rsft_size asks for {cfg.rsft_size} "
                f"(not enough {'/'.join(map(str, cfg.eval_hops))}-hop paths left after eval)"
            )
        for name, bal in out["letters"].items():
            if splits[name] and max(abs(v - 0.25) for v in bal.values()) > cfg.letter_tolerance:
                warnings.append(f"{name}: answer letters outside 25% ± {cfg.letter_tolerance:g}")
    keys = {n: {path_key(r) for r in rows} for n, rows in splits.items() if n != "eval_shuffled"}
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if keys[a] & keys[b]:
                warnings.append(f"splits {a} and {b} share {len(keys[a] & keys[b])} path(s)")
    return out
