"""A run's metrics as rows of plain data: one per phase, per (phase, hop length), per hop position;
the comparison of runs, their paired test and their config differences; the whole as JSON.

A *run* is the dict :func:`tracer.report.load.load_run` returns. Phase order is ``meta["phases"]``
first, then any other phase recorded in ``metrics.json`` in insertion order. A planned phase with
no metrics entry is ``pending``.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Sequence

from tracer.metrics import mcnemar, wilson
from tracer.report.load import read_episodes

ROW_KEYS = ("phase", "status", "n", "accuracy", "ci_lo", "ci_hi", "path_coverage", "reward",
            "format_rate", "edge_precision", "length_match", "shuffle_agreement", "wall_s", "contaminated")


def is_contaminated(run: dict[str, Any]) -> bool:
    """True if the leakage guard was overridden for this run (metrics.json or meta.json)."""
    return bool(run["metrics"].get("contaminated")) or bool(run["meta"].get("contaminated"))


def phase_order(run: dict[str, Any]) -> list[str]:
    """Planned phases (meta order) then any other recorded phase (insertion order)."""
    order: list[str] = []
    for p in list(run["meta"].get("phases") or []) + list(run["metrics"].get("phases", {})):
        if p not in order:
            order.append(p)
    return order


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def phase_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per phase (planned + recorded); pending phases have None metrics."""
    phases = run["metrics"].get("phases", {})
    timings = run["meta"].get("timings") or {}
    run_cont = is_contaminated(run)
    rows = []
    for name in phase_order(run):
        e = phases.get(name)
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        row["phase"] = name
        row["contaminated"] = run_cont
        if not isinstance(e, dict):
            row["status"] = "pending"
            rows.append(row)
            continue
        row["status"] = "done"
        n = e.get("n")
        row["n"] = int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None
        row["accuracy"] = _num(e.get("accuracy"))
        ci = e.get("accuracy_ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            row["ci_lo"], row["ci_hi"] = _num(ci[0]), _num(ci[1])
        elif isinstance(e.get("correct"), int) and row["n"]:
            row["ci_lo"], row["ci_hi"] = wilson(e["correct"], row["n"])
        for key in ("path_coverage", "reward", "format_rate", "edge_precision", "length_match", "shuffle_agreement"):
            row[key] = _num(e.get(key))
        row["wall_s"] = _num(e.get("wall_s"))
        if row["wall_s"] is None:
            row["wall_s"] = _num(timings.get(name))
        row["contaminated"] = run_cont or bool(e.get("contaminated"))
        rows.append(row)
    return rows


def _phase_entries(run: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(phase, metrics.json entry) of every recorded phase, in phase order."""
    phases = run["metrics"].get("phases", {})
    return [(name, phases[name]) for name in phase_order(run) if isinstance(phases.get(name), dict)]


def per_hop_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (finished phase, hop length), hops in numeric order."""
    out = []
    for name, e in _phase_entries(run):
        ph = e.get("per_hop") or {}
        for hop in sorted(ph, key=hop_key):
            h = ph[hop] or {}
            out.append({
                "phase": name,
                "hop": int(hop) if str(hop).isdigit() else hop,
                "n": h.get("n"),
                "accuracy": _num(h.get("accuracy")),
                "path_coverage": _num(h.get("path_coverage")),
                "reward": _num(h.get("reward")),
                "format_rate": _num(h.get("format_rate")),
                "edge_precision": _num(h.get("edge_precision")),
                "length_match": _num(h.get("length_match")),
            })
    return out


def hop_recall_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (finished phase, hop position) with recorded ``hop_recall``, positions in order."""
    out = []
    for name, e in _phase_entries(run):
        recall = e.get("hop_recall") or {}
        for hop in sorted(recall, key=hop_key):
            h = recall[hop] or {}
            out.append({"phase": name, "hop": int(hop), "n": h.get("n"),
                        "recall": _num(h.get("recall")), "stopped": _num(h.get("stopped"))})
    return out


def hop_key(h: Any) -> tuple[int, Any]:
    s = str(h)
    return (0, int(s)) if s.isdigit() else (1, s)


def latest_done(run: dict[str, Any]) -> dict[str, Any] | None:
    """The last finished phase row in phase order, or None if nothing finished."""
    done = [r for r in phase_rows(run) if r["status"] == "done"]
    return done[-1] if done else None


_BEST_KEYS = ("accuracy", "delta_base", "path_coverage", "reward", "format_rate", "edge_precision",
              "shuffle_agreement")


def comparison_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: its latest finished phase plus ``delta_base`` (accuracy − base accuracy).

    ``delta_base`` is None when the run has no finished ``base`` phase or its latest phase is base.
    ``best`` lists the numeric keys where this row holds the best value (ties share it);
    contaminated runs are not eligible for best unless every candidate is contaminated.
    """
    rows = []
    for run in runs:
        prs = phase_rows(run)
        last = next((r for r in reversed(prs) if r["status"] == "done"), None)
        base = next((r for r in prs if r["phase"] == "base" and r["status"] == "done"), None)
        row = {"run": run["name"], "dir": run["dir"], "contaminated": is_contaminated(run)}
        row.update({k: (last or {}).get(k) for k in ROW_KEYS if k not in ("contaminated",)})
        if last is None:
            row["phase"], row["status"] = None, "pending"
        delta = None
        if last is not None and base is not None and last["phase"] != "base" \
                and last["accuracy"] is not None and base["accuracy"] is not None:
            delta = last["accuracy"] - base["accuracy"]
        row["delta_base"] = delta
        row["best"] = []
        rows.append(row)
    for key in _BEST_KEYS:
        cands = [r for r in rows if r.get(key) is not None]
        clean = [r for r in cands if not r["contaminated"]]
        pool = clean or cands
        if len(rows) < 2 or not pool:
            continue
        best = max(r[key] for r in pool)
        for r in pool:
            if math.isclose(r[key], best, rel_tol=1e-12, abs_tol=1e-12):
                r["best"].append(key)
    return rows


def paired_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run after the first against the first, question by question (:func:`tracer.metrics.mcnemar`
    on their latest finished phases' episodes): ``fixed`` = questions the first run gets wrong and
    this one right, ``broken`` the reverse, ``p`` the exact two-sided p-value. Runs without
    episodes for that phase are left out."""
    def episodes(run: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
        last = latest_done(run)
        path = Path(run["dir"]) / "episodes" / f"{(last or {}).get('phase')}.jsonl"
        return (last["phase"], read_episodes(run, last["phase"])) if last and path.is_file() else None

    first = episodes(runs[0]) if runs else None
    rows = []
    for run in runs[1:] if first else []:
        other = episodes(run)
        if other is not None:
            rows.append({"run": run["name"], "phase": other[0], "vs": f"{runs[0]['name']}/{first[0]}",
                         **mcnemar(first[1], other[1])})
    return rows


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(runs: Sequence[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """Dotted config keys whose values differ between runs → [(key, [value per run])], sorted.

    A key missing from a run's config is None there.
    """
    flats = [_flatten(r.get("config") or {}) for r in runs]
    keys = sorted({k for f in flats for k in f})
    out = []
    _missing = object()
    for k in keys:
        vals = [f.get(k, _missing) for f in flats]
        if any(v is not vals[0] and v != vals[0] for v in vals):  # a missing key differs too
            out.append((k, [None if v is _missing else v for v in vals]))
    return out


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def to_json(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON-serialisable report: rows + per-hop rows per run, comparison and config diff."""
    data = {
        "runs": [
            {"name": r["name"], "dir": r["dir"], "run_id": r["metrics"].get("run_id", r["meta"].get("run_id")),
             "contaminated": is_contaminated(r), "phases": phase_order(r),
             "rows": phase_rows(r), "per_hop": per_hop_rows(r), "hop_recall": hop_recall_rows(r)}
            for r in runs
        ],
        "comparison": comparison_rows(runs),
        "paired": paired_rows(runs),
        "config_diff": [{"key": k, "values": dict(zip([r["name"] for r in runs], vals))}
                        for k, vals in config_diff(runs)],
    }
    return jsonable(data)
