"""The text of a report's cells (numbers formatted, a pending phase marked), shared by the rich
tables and the markdown."""

from __future__ import annotations

import json
from typing import Any

from tracer.report.rows import hop_recall_rows, hop_key, jsonable, per_hop_rows, phase_rows

# (label, row key, formatter name) for the numeric metric columns shared by the tables.
METRIC_COLS = (
    ("Path cov.", "path_coverage", "pct"),
    ("Avg reward", "reward", "signed"),
    ("Format", "format_rate", "pct"),
    ("Edge prec.", "edge_precision", "pct"),
    ("Shuffle", "shuffle_agreement", "pct"),
)


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def fmt_acc(row: dict[str, Any]) -> str:
    """``61.0% [55.3–66.4]`` (Wilson 95% CI) or ``61.0%`` without an interval."""
    acc = row.get("accuracy")
    if acc is None:
        return "—"
    lo, hi = row.get("ci_lo"), row.get("ci_hi")
    if lo is None or hi is None:
        return fmt_pct(acc)
    return f"{100 * acc:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]"


def fmt_signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def fmt_pp(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f} pp"


def fmt_wall(s: float | None) -> str:
    """``12.4s``, ``1m 21s``, ``2h 03m``."""
    if s is None:
        return "—"
    if s < 59.95:
        return f"{s:.1f}s"
    total = int(round(s))
    m, sec = divmod(total, 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def fmt_value(v: Any) -> str:
    """A config value as text (None → "—")."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, (list, dict)):
        return json.dumps(jsonable(v), ensure_ascii=False)
    return str(v)


_FMT = {"pct": fmt_pct, "signed": fmt_signed}


def phase_cells(row: dict[str, Any]) -> list[str]:
    """Plain-text cells of a phase row (after Phase)."""
    if row["status"] != "done":
        return ["pending"] * (3 + len(METRIC_COLS))
    n = "—" if row["n"] is None else str(row["n"])
    return [n, fmt_acc(row)] + [_FMT[f](row[k]) for _, k, f in METRIC_COLS] + [fmt_wall(row["wall_s"])]


HEADERS = ["Phase", "n", "Accuracy"] + [c[0] for c in METRIC_COLS] + ["Time"]


def hops_of(run: dict[str, Any]) -> list[Any]:
    hops: list[Any] = []
    for r in per_hop_rows(run):
        if r["hop"] not in hops:
            hops.append(r["hop"])
    return sorted(hops, key=hop_key)


def per_hop_headers(hops: list[Any]) -> list[str]:
    """acc = accuracy, cov = path coverage, len = traces with exactly the question's hop count."""
    return [f"{h}-hop {x}" for h in hops for x in ("acc", "cov", "len")]


def per_hop_cells(run: dict[str, Any], hops: list[Any]) -> list[tuple[str, list[str]]]:
    by = {(r["phase"], r["hop"]): r for r in per_hop_rows(run)}
    out = []
    for row in phase_rows(run):
        if row["status"] != "done":
            continue
        vals = []
        for h in hops:
            r = by.get((row["phase"], h))
            if r is None:
                vals += ["—", "—", "—"]
            else:
                n = f" (n={r['n']})" if r.get("n") is not None else ""
                vals += [fmt_pct(r["accuracy"]) + n, fmt_pct(r["path_coverage"]), fmt_pct(r["length_match"])]
        out.append((row["phase"], vals))
    return out


def hop_recall_cells(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the hop-recall table: phase, then "recall (n reaching it)" per position."""
    rows = hop_recall_rows(run)
    hops = sorted({r["hop"] for r in rows})
    by = {(r["phase"], r["hop"]): r for r in rows}
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    cells = [[p] + [fmt_pct(by[p, h]["recall"]) + f" ({by[p, h]['n']})" if (p, h) in by else "—" for h in hops]
             for p in phases]
    return ["Phase"] + [f"hop {h}" for h in hops], cells


CMP_COLS = (  # (header, key, formatter)
    ("n", "n", lambda v: "—" if v is None else str(v)),
    ("Accuracy", "accuracy", None),
    ("Δ vs base", "delta_base", fmt_pp),
    ("Path cov.", "path_coverage", fmt_pct),
    ("Avg reward", "reward", fmt_signed),
    ("Format", "format_rate", fmt_pct),
    ("Edge prec.", "edge_precision", fmt_pct),
    ("Shuffle agr.", "shuffle_agreement", fmt_pct),
    ("Wall time", "wall_s", fmt_wall),
)


def cmp_cell(row: dict[str, Any], key: str, f: Any) -> str:
    if row["status"] != "done":
        return "pending" if key == "accuracy" else ""
    return fmt_acc(row) if key == "accuracy" else f(row.get(key))


def paired_cells(r: dict[str, Any]) -> list[str]:
    return [r["run"], r["phase"], str(r["n"]), str(r["fixed"]), str(r["broken"]), f"{r['p']:.3g}"]
