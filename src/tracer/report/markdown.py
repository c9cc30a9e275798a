"""The report as GitHub markdown."""

from __future__ import annotations

from typing import Any, Sequence

from tracer.report.cells import (CMP_COLS, HEADERS, cmp_cell, fmt_value, hop_recall_cells, hops_of, paired_cells,
                                 per_hop_cells, per_hop_headers, phase_cells)
from tracer.report.rows import (comparison_rows, config_diff, hop_recall_rows, is_contaminated, paired_rows,
                                per_hop_rows, phase_rows)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |",
             "|" + "|".join(":---" if i < right_from else "---:" for i in range(len(headers))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in r) + " |")
    return "\n".join(lines)


def to_markdown(runs: Sequence[dict[str, Any]], per_hop: bool = False) -> str:
    """The report as GitHub markdown (best comparison values in bold)."""
    parts = []
    for run in runs:
        title = f"## {run['name']}" + (" **[contaminated]**" if is_contaminated(run) else "")
        rows = []
        for row in phase_rows(run):
            if row["status"] != "done":
                rows.append([row["phase"], "_pending_"] + [""] * (len(HEADERS) - 2))
            else:
                rows.append([row["phase"]] + phase_cells(row))
        parts += [title, _md_table(HEADERS, rows)]
        if per_hop and per_hop_rows(run):
            hops = hops_of(run)
            headers = ["Phase"] + per_hop_headers(hops)
            hop_rows = [[p] + vals for p, vals in per_hop_cells(run, hops)]
            parts += [f"### {run['name']}: per hop length", _md_table(headers, hop_rows)]
            if hop_recall_rows(run):
                parts += [f"### {run['name']}: hop recall given a correct prefix", _md_table(*hop_recall_cells(run))]
    if len(runs) > 1:
        headers = ["Run", "Phase"] + [h for h, _, _ in CMP_COLS]
        rows = []
        for row in comparison_rows(runs):
            name = row["run"] + (" [contaminated]" if row["contaminated"] else "")
            cells = []
            for _, key, f in CMP_COLS:
                c = cmp_cell(row, key, f)
                cells.append(f"**{c}**" if key in row["best"] and c else c)
            rows.append([name, row["phase"] or "—"] + cells)
        parts += ["## Comparison (latest finished phase per run)", _md_table(headers, rows, right_from=2)]
        paired = paired_rows(runs)
        if paired:
            parts += [f"## Paired test vs {paired[0]['vs']} (exact McNemar)",
                      _md_table(["Run", "Phase", "n", "fixed", "broken", "p"],
                                [paired_cells(r) for r in paired], right_from=2)]
        diff = config_diff(runs)
        parts.append("## Config differences")
        if diff:
            parts.append(_md_table(["Key"] + [r["name"] for r in runs],
                                   [[k] + [fmt_value(v) for v in vals] for k, vals in diff], right_from=99))
        else:
            parts.append("No config differences.")
    return "\n\n".join(parts) + "\n"
