"""The report in the terminal: rich tables that fit the console's width (a compact layout on a
narrow one, with no number split across lines)."""

from __future__ import annotations

from typing import Any, Sequence

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from tracer.report.cells import (CMP_COLS, HEADERS, cmp_cell, fmt_value, hop_recall_cells, hops_of,
                                 paired_cells, per_hop_cells, per_hop_headers, phase_cells)
from tracer.report.rows import (comparison_rows, config_diff, hop_recall_rows, is_contaminated, paired_rows,
                                per_hop_rows, phase_rows)

BEST_STYLE = "bold green"

# A narrow terminal gets each table without its vertical rules and with short headers, so a whole
# number fits in every cell; a table that still does not fit wraps only between words.
_COMPACT = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "collapse_padding": True}
_SHORT_HEADERS = {"Path cov.": "Cov.", "Avg reward": "Reward", "Edge prec.": "Edges", "Shuffle": "Shuf."}


class Fit:
    """Renders the first of ``layouts`` that fits the console's width without wrapping, else the
    last one: the boxed table on a wide terminal, the compact one on a narrow terminal."""

    def __init__(self, *layouts: RenderableType):
        self.layouts = layouts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        unbounded = options.update_width(10_000)  # a measurement is capped at the width it is given
        for layout in self.layouts[:-1]:
            if Measurement.get(console, unbounded, layout).maximum <= options.max_width:
                yield layout
                return
        yield self.layouts[-1]

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.layouts[-1])


def _title(run: dict[str, Any]) -> Text:
    t = Text(run["name"], style="bold")
    if is_contaminated(run):
        t.append(" [contaminated]", style="bold red")
    return t


def run_table(run: dict[str, Any], per_hop: bool = False) -> Fit | Group:
    """Phase table for one run; with ``per_hop`` (and per-hop data) a Group of it and ``per_hop_table(run)``."""
    table = Fit(_phase_table(run, compact=False), _phase_table(run, compact=True))
    if per_hop and per_hop_rows(run):
        extra = [hop_recall_table(run)] if hop_recall_rows(run) else []
        return Group(table, per_hop_table(run), *extra)
    return table


def _phase_table(run: dict[str, Any], compact: bool) -> Table:
    """One row per phase; ``compact``: short headers, and only the accuracy wraps (its CI below it)."""
    table = Table(title=_title(run), title_justify="left", **(_COMPACT if compact else {}))
    for i, h in enumerate(HEADERS):
        if compact:
            table.add_column(_SHORT_HEADERS.get(h, h), justify="left" if i == 0 else "right",
                             no_wrap=h != "Accuracy", overflow="ellipsis", min_width=12 if h == "Accuracy" else None)
        else:
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0, overflow="fold")
    for row in phase_rows(run):
        if row["status"] != "done":
            table.add_row(Text(row["phase"], style="dim"), Text("pending", style="dim italic"),
                          *[Text("", style="dim")] * (len(HEADERS) - 2))
        else:
            table.add_row(row["phase"], *phase_cells(row))
    return table


def per_hop_table(run: dict[str, Any]) -> Fit:
    """Phase × hop length: accuracy, path coverage and full-length traces per hop length (finished phases)."""
    return Fit(_per_hop_table(run, compact=False), _per_hop_table(run, compact=True))


def _per_hop_table(run: dict[str, Any], compact: bool) -> Table:
    """``compact``: the cells wrap between words (an accuracy above its n)."""
    title = f"{run['name']}: per hop length"
    hops = hops_of(run)
    table = Table(title=Text(title, style="bold"), title_justify="left", min_width=len(title) + 2,
                  caption=None if hops else "no per-hop metrics recorded", **(_COMPACT if compact else {}))
    table.add_column("Phase", no_wrap=True)
    for header in per_hop_headers(hops):
        table.add_column(header, justify="right", no_wrap=not compact, overflow="ellipsis")
    cells = per_hop_cells(run, hops)
    for phase, vals in cells:
        table.add_row(phase, *vals)
    return table


def hop_recall_table(run: dict[str, Any]) -> Fit:
    """Phase × hop position: how often the next hop is right when every hop before it was."""
    return Fit(_hop_recall_table(run, compact=False), _hop_recall_table(run, compact=True))


def _hop_recall_table(run: dict[str, Any], compact: bool) -> Table:
    title = f"{run['name']}: hop recall given a correct prefix"
    headers, rows = hop_recall_cells(run)
    table = Table(title=Text(title, style="bold"), title_justify="left", min_width=len(title) + 2,
                  caption="recall (episodes whose trace reached the hop)", **(_COMPACT if compact else {}))
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    return table


def comparison_table(runs: Sequence[dict[str, Any]]) -> Fit:
    """One row per run: latest finished phase, accuracy delta vs base; best values bold green. On a
    terminal too narrow for that, one column per run."""
    rows = comparison_rows(runs)
    return Fit(_comparison_by_run(rows), _comparison_by_metric(rows))


_CMP_TITLE = "Comparison (latest finished phase per run)"


def _comparison_cells(row: dict[str, Any]) -> tuple[Text, list[Text]]:
    """A comparison row's run name and its cells: phase, then :data:`CMP_COLS`."""
    name = Text(row["run"])
    if row["contaminated"]:
        name.append(" [contaminated]", style="red")
    cells = [Text(row["phase"] or "—", style="" if row["phase"] else "dim")]
    for _, key, f in CMP_COLS:
        style = BEST_STYLE if key in row["best"] else ("dim" if row["status"] != "done" else "")
        cells.append(Text(cmp_cell(row, key, f), style=style))
    return name, cells


def _comparison_by_run(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=Text(_CMP_TITLE, style="bold"), title_justify="left")
    table.add_column("Run", no_wrap=True)
    table.add_column("Phase", no_wrap=True)
    for h, _, _ in CMP_COLS:
        table.add_column(h, justify="right", no_wrap=True)
    for row in rows:
        name, cells = _comparison_cells(row)
        table.add_row(name, *cells)
    return table


def _comparison_by_metric(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=Text(_CMP_TITLE, style="bold"), title_justify="left", **_COMPACT)
    table.add_column("", no_wrap=True)
    by_run = [_comparison_cells(row) for row in rows]
    for name, _ in by_run:
        table.add_column(name, justify="right", overflow="ellipsis")
    for i, label in enumerate(["Phase"] + [h for h, _, _ in CMP_COLS]):
        table.add_row(label, *[cells[i] for _, cells in by_run])
    return table


def config_diff_table(runs: Sequence[dict[str, Any]]) -> Table | None:
    """Config keys that differ between runs (None when there are none)."""
    diff = config_diff(runs)
    if not diff:
        return None
    table = Table(title=Text("Config differences", style="bold"), title_justify="left")
    table.add_column("Key", no_wrap=True)
    for r in runs:
        table.add_column(r["name"], overflow="fold")
    for key, vals in diff:
        table.add_row(key, *[Text(fmt_value(v), style="dim" if v is None else "") for v in vals])
    return table


def paired_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=Text(f"Paired test vs {rows[0]['vs']} (exact McNemar)", style="bold"), title_justify="left")
    for h in ("Run", "Phase", "n", "fixed", "broken", "p"):
        table.add_column(h, justify="left" if h in ("Run", "Phase") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*paired_cells(r))
    return table


def report_renderables(runs: Sequence[dict[str, Any]], per_hop: bool = False) -> list[RenderableType]:
    """Everything ``tracer report`` prints: a table per run, then comparison + config diff (2+ runs)."""
    out: list[RenderableType] = []
    for run in runs:
        out.append(run_table(run, per_hop=per_hop))
    if len(runs) > 1:
        out.append(comparison_table(runs))
        paired = paired_rows(runs)
        if paired:
            out.append(paired_table(paired))
        diff = config_diff_table(runs)
        out.append(diff if diff is not None else Text("No config differences.", style="dim"))
    return out
