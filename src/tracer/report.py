"""Reports from run directories: rich tables, markdown, JSON, plots and wrong-answer examples.

Pure Python + rich (no MLX, no numpy); matplotlib is imported lazily, only by ``plot()``.

A *run* here is the dict returned by ``load_run()``. Phase order is ``meta["phases"]`` first,
then any other phase recorded in ``metrics.json`` in insertion order. A planned phase with no
metrics entry is ``pending``.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.errors import TracerError
from tracer.format import parsed_nodes, trace_steps
from tracer.metrics import mcnemar

if TYPE_CHECKING:  # pragma: no cover
    from tracer.kg import KG

PLOT_HINT = "plotting needs matplotlib: pip install 'tracer[plot]'"

ROW_KEYS = ("phase", "status", "n", "accuracy", "ci_lo", "ci_hi", "path_coverage", "reward",
            "format_rate", "edge_precision", "length_match", "shuffle_agreement", "wall_s", "contaminated")

# (label, row key, formatter name) for the numeric metric columns shared by the tables.
_METRIC_COLS = (
    ("Path cov.", "path_coverage", "pct"),
    ("Avg reward", "reward", "signed"),
    ("Format", "format_rate", "pct"),
    ("Edge prec.", "edge_precision", "pct"),
    ("Shuffle", "shuffle_agreement", "pct"),
)

BEST_STYLE = "bold green"


# --------------------------------------------------------------------------------------------
# loading


def _read_json(path: Path, run_dir: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TracerError(f"{run_dir}/{path.name}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise TracerError(f"{run_dir}/{path.name}: not UTF-8 text") from None
    except OSError as e:
        raise TracerError(f"{run_dir}/{path.name}: cannot read: {e.strerror or e}") from None


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Load a run directory → {"dir", "name", "meta", "metrics", "config"}.

    A run with ``meta.json`` but no ``metrics.json`` is valid (every planned phase pending).
    Raises ``TracerError`` for a missing directory, a directory with neither file, or bad JSON/TOML.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise TracerError(f"{d}: no such run directory")
    meta_p, metrics_p, config_p = d / "meta.json", d / "metrics.json", d / "config.toml"
    if not meta_p.exists() and not metrics_p.exists():
        raise TracerError(f"{d}: not a tracer run (no meta.json or metrics.json)")
    meta = _read_json(meta_p, d) if meta_p.exists() else {}
    metrics = _read_json(metrics_p, d) if metrics_p.exists() else {}
    if not isinstance(meta, dict):
        raise TracerError(f"{d}/meta.json: invalid run metadata: expected a JSON object")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("phases", {}), dict):
        raise TracerError(f"{d}/metrics.json: invalid metrics: expected an object with a 'phases' object")
    metrics.setdefault("phases", {})
    config: dict[str, Any] = {}
    if config_p.exists():
        try:
            config = tomllib.loads(config_p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise TracerError(f"{d}/config.toml: invalid TOML: {e}") from None
    name = d.name or d.resolve().name
    return {"dir": str(d), "name": name, "meta": meta, "metrics": metrics, "config": config}


def load_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``load_run`` for each directory; names made unique (``parent/name``) when basenames clash."""
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    for r in runs:
        if names.count(r["name"]) > 1:
            p = Path(r["dir"]).resolve()
            r["name"] = f"{p.parent.name}/{p.name}"
    return runs


def _as_run(run: dict[str, Any] | str | Path) -> dict[str, Any]:
    return run if isinstance(run, dict) else load_run(run)


# --------------------------------------------------------------------------------------------
# rows


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
            from tracer.metrics import wilson  # stdlib-only module

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
        for hop in sorted(ph, key=_hop_key):
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
        for hop in sorted(recall, key=_hop_key):
            h = recall[hop] or {}
            out.append({"phase": name, "hop": int(hop), "n": h.get("n"),
                        "recall": _num(h.get("recall")), "stopped": _num(h.get("stopped"))})
    return out


def _hop_key(h: Any) -> tuple[int, Any]:
    s = str(h)
    return (0, int(s)) if s.isdigit() else (1, s)


def latest_done(run: dict[str, Any]) -> dict[str, Any] | None:
    """The last finished phase row in phase order, or None if nothing finished."""
    done = [r for r in phase_rows(run) if r["status"] == "done"]
    return done[-1] if done else None


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


def paired_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=Text(f"Paired test vs {rows[0]['vs']} (exact McNemar)", style="bold"), title_justify="left")
    for h in ("Run", "Phase", "n", "fixed", "broken", "p"):
        table.add_column(h, justify="left" if h in ("Run", "Phase") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*_paired_cells(r))
    return table


def _paired_cells(r: dict[str, Any]) -> list[str]:
    return [r["run"], r["phase"], str(r["n"]), str(r["fixed"]), str(r["broken"]), f"{r['p']:.3g}"]


_BEST_KEYS = ("accuracy", "delta_base", "path_coverage", "reward", "format_rate", "edge_precision",
              "shuffle_agreement")


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


# --------------------------------------------------------------------------------------------
# formatting


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
        return json.dumps(_jsonable(v), ensure_ascii=False)
    return str(v)


_FMT = {"pct": fmt_pct, "signed": fmt_signed}


def _cells(row: dict[str, Any]) -> list[str]:
    """Plain-text cells of a phase row (after Phase)."""
    if row["status"] != "done":
        return ["pending"] * (3 + len(_METRIC_COLS))
    n = "—" if row["n"] is None else str(row["n"])
    return [n, fmt_acc(row)] + [_FMT[f](row[k]) for _, k, f in _METRIC_COLS] + [fmt_wall(row["wall_s"])]


_HEADERS = ["Phase", "n", "Accuracy"] + [c[0] for c in _METRIC_COLS] + ["Time"]


# --------------------------------------------------------------------------------------------
# rich tables


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
    for i, h in enumerate(_HEADERS):
        if compact:
            table.add_column(_SHORT_HEADERS.get(h, h), justify="left" if i == 0 else "right",
                             no_wrap=h != "Accuracy", overflow="ellipsis", min_width=12 if h == "Accuracy" else None)
        else:
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0, overflow="fold")
    for row in phase_rows(run):
        if row["status"] != "done":
            table.add_row(Text(row["phase"], style="dim"), Text("pending", style="dim italic"),
                          *[Text("", style="dim")] * (len(_HEADERS) - 2))
        else:
            table.add_row(row["phase"], *_cells(row))
    return table


def _hops(run: dict[str, Any]) -> list[Any]:
    hops: list[Any] = []
    for r in per_hop_rows(run):
        if r["hop"] not in hops:
            hops.append(r["hop"])
    return sorted(hops, key=_hop_key)


def per_hop_table(run: dict[str, Any]) -> Fit:
    """Phase × hop length: accuracy, path coverage and full-length traces per hop length (finished phases)."""
    return Fit(_per_hop_table(run, compact=False), _per_hop_table(run, compact=True))


def _per_hop_table(run: dict[str, Any], compact: bool) -> Table:
    """``compact``: the cells wrap between words (an accuracy above its n)."""
    title = f"{run['name']}: per hop length"
    hops = _hops(run)
    table = Table(title=Text(title, style="bold"), title_justify="left", min_width=len(title) + 2,
                  caption=None if hops else "no per-hop metrics recorded", **(_COMPACT if compact else {}))
    table.add_column("Phase", no_wrap=True)
    for header in _per_hop_headers(hops):
        table.add_column(header, justify="right", no_wrap=not compact, overflow="ellipsis")
    cells = _per_hop_cells(run, hops)
    for phase, vals in cells:
        table.add_row(phase, *vals)
    return table


def _hop_recall_cells(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the hop-recall table: phase, then "recall (n reaching it)" per position."""
    rows = hop_recall_rows(run)
    hops = sorted({r["hop"] for r in rows})
    by = {(r["phase"], r["hop"]): r for r in rows}
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    cells = [[p] + [fmt_pct(by[p, h]["recall"]) + f" ({by[p, h]['n']})" if (p, h) in by else "—" for h in hops]
             for p in phases]
    return ["Phase"] + [f"hop {h}" for h in hops], cells


def hop_recall_table(run: dict[str, Any]) -> Fit:
    """Phase × hop position: how often the next hop is right when every hop before it was."""
    return Fit(_hop_recall_table(run, compact=False), _hop_recall_table(run, compact=True))


def _hop_recall_table(run: dict[str, Any], compact: bool) -> Table:
    title = f"{run['name']}: hop recall given a correct prefix"
    headers, rows = _hop_recall_cells(run)
    table = Table(title=Text(title, style="bold"), title_justify="left", min_width=len(title) + 2,
                  caption="recall (episodes whose trace reached the hop)", **(_COMPACT if compact else {}))
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    return table


def _per_hop_headers(hops: list[Any]) -> list[str]:
    """acc = accuracy, cov = path coverage, len = traces with exactly the question's hop count."""
    return [f"{h}-hop {x}" for h in hops for x in ("acc", "cov", "len")]


def _per_hop_cells(run: dict[str, Any], hops: list[Any]) -> list[tuple[str, list[str]]]:
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


_CMP_COLS = (  # (header, key, formatter)
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


def _cmp_cell(row: dict[str, Any], key: str, f: Any) -> str:
    if row["status"] != "done":
        return "pending" if key == "accuracy" else ""
    return fmt_acc(row) if key == "accuracy" else f(row.get(key))


def comparison_table(runs: Sequence[dict[str, Any]]) -> Fit:
    """One row per run: latest finished phase, accuracy delta vs base; best values bold green. On a
    terminal too narrow for that, one column per run."""
    rows = comparison_rows(runs)
    return Fit(_comparison_by_run(rows), _comparison_by_metric(rows))


_CMP_TITLE = "Comparison (latest finished phase per run)"


def _comparison_cells(row: dict[str, Any]) -> tuple[Text, list[Text]]:
    """A comparison row's run name and its cells: phase, then :data:`_CMP_COLS`."""
    name = Text(row["run"])
    if row["contaminated"]:
        name.append(" [contaminated]", style="red")
    cells = [Text(row["phase"] or "—", style="" if row["phase"] else "dim")]
    for _, key, f in _CMP_COLS:
        style = BEST_STYLE if key in row["best"] else ("dim" if row["status"] != "done" else "")
        cells.append(Text(_cmp_cell(row, key, f), style=style))
    return name, cells


def _comparison_by_run(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=Text(_CMP_TITLE, style="bold"), title_justify="left")
    table.add_column("Run", no_wrap=True)
    table.add_column("Phase", no_wrap=True)
    for h, _, _ in _CMP_COLS:
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
    for i, label in enumerate(["Phase"] + [h for h, _, _ in _CMP_COLS]):
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


# --------------------------------------------------------------------------------------------
# markdown / JSON


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
                rows.append([row["phase"], "_pending_"] + [""] * (len(_HEADERS) - 2))
            else:
                rows.append([row["phase"]] + _cells(row))
        parts += [title, _md_table(_HEADERS, rows)]
        if per_hop and per_hop_rows(run):
            hops = _hops(run)
            headers = ["Phase"] + _per_hop_headers(hops)
            hop_rows = [[p] + vals for p, vals in _per_hop_cells(run, hops)]
            parts += [f"### {run['name']}: per hop length", _md_table(headers, hop_rows)]
            if hop_recall_rows(run):
                parts += [f"### {run['name']}: hop recall given a correct prefix", _md_table(*_hop_recall_cells(run))]
    if len(runs) > 1:
        headers = ["Run", "Phase"] + [h for h, _, _ in _CMP_COLS]
        rows = []
        for row in comparison_rows(runs):
            name = row["run"] + (" [contaminated]" if row["contaminated"] else "")
            cells = []
            for _, key, f in _CMP_COLS:
                c = _cmp_cell(row, key, f)
                cells.append(f"**{c}**" if key in row["best"] and c else c)
            rows.append([name, row["phase"] or "—"] + cells)
        parts += ["## Comparison (latest finished phase per run)", _md_table(headers, rows, right_from=2)]
        paired = paired_rows(runs)
        if paired:
            parts += [f"## Paired test vs {paired[0]['vs']} (exact McNemar)",
                      _md_table(["Run", "Phase", "n", "fixed", "broken", "p"],
                                [_paired_cells(r) for r in paired], right_from=2)]
        diff = config_diff(runs)
        parts.append("## Config differences")
        if diff:
            parts.append(_md_table(["Key"] + [r["name"] for r in runs],
                                   [[k] + [fmt_value(v) for v in vals] for k, vals in diff], right_from=99))
        else:
            parts.append("No config differences.")
    return "\n\n".join(parts) + "\n"


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
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
    return _jsonable(data)


# --------------------------------------------------------------------------------------------
# plot


def plot(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a PNG: accuracy (with CI), path coverage and reward across phases, one line per run."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TracerError(PLOT_HINT) from None
    del matplotlib  # Agg via FigureCanvasAgg: no pyplot, no global backend switch
    phases: list[str] = []
    for run in runs:
        for p in phase_order(run):
            if p not in phases:
                phases.append(p)
    xs = list(range(len(phases)))
    logs = {run["name"]: grpo_log(run) for run in runs}
    logs = {name: rows for name, rows in logs.items() if rows}
    fig = Figure(figsize=(15, 8.5 if logs else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(2 if logs else 1, 3, squeeze=False)
    axes = grid[0]
    if logs:
        _plot_grpo(grid[1], logs)
    specs = (("accuracy", "Accuracy", "accuracy (%)", 100.0),
             ("path_coverage", "Path coverage", "path coverage (%)", 100.0),
             ("reward", "Average reward", "reward", 1.0))
    nan = float("nan")
    for ax, (key, title, ylabel, scale) in zip(axes, specs):
        for run in runs:
            by = {r["phase"]: r for r in phase_rows(run) if r["status"] == "done"}
            ys = [by[p][key] * scale if p in by and by[p][key] is not None else nan for p in phases]
            label = run["name"] + (" [contaminated]" if is_contaminated(run) else "")
            line = ax.plot(xs, ys, marker="o", label=label)[0]
            if key == "accuracy":
                lo = [by[p]["ci_lo"] * 100 if p in by and by[p]["ci_lo"] is not None else nan for p in phases]
                hi = [by[p]["ci_hi"] * 100 if p in by and by[p]["ci_hi"] is not None else nan for p in phases]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("phase")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs, phases)
        ax.grid(True, alpha=0.3)
        if key == "reward":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.legend(fontsize="small")
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=110)
    except OSError as e:
        raise TracerError(f"{out}: cannot write plot: {e.strerror or e}") from None
    return out


def grpo_log(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The GRPO step log of a run (``models/grpo/grpo_log.jsonl``), [] when it has none."""
    path = Path(run["dir"]) / "models" / "grpo" / "grpo_log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TracerError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    return rows


def _plot_grpo(axes: Any, logs: dict[str, list[dict[str, Any]]]) -> None:
    """GRPO steps: reward mean ± std; accuracy and format rate; KL and clip fraction."""
    for name, rows in logs.items():
        steps = [r["step"] for r in rows]
        mean = [r["reward_mean"] for r in rows]
        std = [r.get("reward_std") or 0.0 for r in rows]
        line = axes[0].plot(steps, mean, label=name)[0]
        axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color=line.get_color(), alpha=0.15, linewidth=0)
        axes[1].plot(steps, [100 * r["accuracy"] for r in rows], label=f"{name} accuracy")
        axes[1].plot(steps, [100 * r["format_rate"] for r in rows], linestyle="--", label=f"{name} format")
        kl = [(r["step"], r["kl"]) for r in rows if r.get("kl") is not None]
        if kl:
            axes[2].plot(*zip(*kl), label=f"{name} KL")
        axes[2].plot(steps, [r["clip_frac"] for r in rows], linestyle="--", label=f"{name} clip fraction")
    for ax, title, ylabel in zip(axes, ("GRPO reward (mean ± std)", "GRPO samples", "GRPO KL and clipping"),
                                 ("reward", "%", "")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")


# --------------------------------------------------------------------------------------------
# examples


def read_episodes(run: dict[str, Any], phase: str) -> list[dict[str, Any]]:
    """Rows of ``episodes/<phase>.jsonl``; TracerError naming the file if missing or malformed."""
    path = Path(run["dir"]) / "episodes" / f"{phase}.jsonl"
    if not path.is_file():
        avail = sorted(p.stem for p in (Path(run["dir"]) / "episodes").glob("*.jsonl"))
        hint = f" (available: {', '.join(avail)})" if avail else ""
        raise TracerError(f"{path}: no episodes for phase '{phase}'{hint}")
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TracerError(f"{path}:{i}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TracerError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    return rows


def _hop_list(ep: dict[str, Any], kg: KG | None) -> list[dict[str, Any]]:
    """The trace's written hops, each marked real when the graph has that edge, relation included
    (with ``kg``; else read from the episode's ``hallucinated_hops``)."""
    parsed = ep.get("parsed") or {}
    nodes = parsed_nodes(parsed)
    rels = trace_steps(parsed["trace_text"] or "")[1] if "trace_text" in parsed else [""] * len(nodes)
    bad = {tuple(h) for h in ep.get("hallucinated_hops") or [] if len(h) == 2}

    def real(a: str, r: str, b: str) -> bool:
        if kg is None:
            return (a, b) not in bad
        return kg.has_triple(a, r, b) if "trace_text" in parsed else kg.has_edge(a, b)

    return [{"src": a, "dst": b, "real": real(a, r, b)} for a, r, b in zip(nodes, rels, nodes[1:])]


def wrong_examples(run: dict[str, Any] | str | Path, phase: str, n: int,
                   kg: KG | None = None) -> list[dict[str, Any]]:
    """First ``n`` wrong or invalid episodes of ``phase`` (file order).

    Each is the episode row plus ``status`` ("wrong"/"invalid") and ``hops``:
    [{"src", "dst", "real"}] for consecutive distinct trace entities (``real`` checked against
    ``kg`` when given, else taken from ``hallucinated_hops``); with ``kg`` also ``labels``
    (entity id → label for the entities involved).
    """
    run = _as_run(run)
    if n < 0:
        raise TracerError(f"--wrong must be >= 0, got {n}")
    out = []
    for ep in read_episodes(run, phase):
        if len(out) >= n:
            break
        if ep.get("correct"):
            continue
        valid = bool((ep.get("parsed") or {}).get("valid_format"))
        row = dict(ep)
        row["status"] = "wrong" if valid else "invalid"
        row["hops"] = _hop_list(ep, kg)
        if kg is not None:
            parsed = ep.get("parsed") or {}
            ids = set(parsed.get("trace_entities") or []) | set(parsed.get("path_entities") or [])
            row["labels"] = {i: kg.entities[i].label for i in sorted(ids) if i in kg.entities}
        out.append(row)
    return out


def _node_spans(text: str, nodes: list[str]) -> list[tuple[int, int]]:
    """Positions of ``nodes`` found in order in ``text``; stops at the first miss."""
    spans, pos = [], 0
    for node in nodes:
        start = text.find(node, pos) if node else -1
        if start < 0:
            break
        spans.append((start, start + len(node)))
        pos = start + len(node)
    return spans


def _trace_text(ep: dict[str, Any]) -> Text:
    """The completion with hops coloured: green = KG edge, red = hallucinated."""
    completion = ep.get("completion") or ""
    text = Text(completion)
    parsed = ep.get("parsed") or {}
    trace = parsed.get("trace_text") or ""
    nodes = parsed_nodes(parsed)
    start = completion.find(trace) if trace else -1
    if start < 0 or not nodes:
        return text
    spans = [(a + start, b + start) for a, b in _node_spans(trace, nodes)]
    hops = ep.get("hops")
    if hops is None:
        hops = _hop_list(ep, None)
    for i, hop in enumerate(hops[: max(0, len(spans) - 1)]):
        style = "green" if hop["real"] else "bold red"
        text.stylize(style, spans[i][1], spans[i + 1][1])  # connector + destination node
    if spans:
        text.stylize("bold", spans[0][0], spans[0][1])
    return text


def examples_renderables(rows: Sequence[dict[str, Any]]) -> list[RenderableType]:
    """A Panel per example: id, hop length, answer vs gold, coloured trace, gold path."""
    out: list[RenderableType] = []
    for ep in rows:
        parsed = ep.get("parsed") or {}
        labels = ep.get("labels") or {}
        valid = bool(parsed.get("valid_format"))
        status = ep.get("status") or ("correct" if ep.get("correct") else "wrong" if valid else "invalid")
        gold_path = list(parsed.get("path_entities") or [])
        head = Text()
        head.append("answer: ")
        head.append(str(parsed.get("answer") or "—"), style="bold red" if not ep.get("correct") else "bold green")
        if not valid:
            head.append(" (invalid format)", style="red")
        head.append("   gold: ")
        head.append(str(ep.get("answer_star", "—")), style="bold green")
        if gold_path:
            head.append(f" ({_ent(gold_path[-1], labels)})", style="green")
        hops = ep.get("hops")
        if hops is None:
            hops = _hop_list(ep, None)
        bad = [h for h in hops if not h["real"]]
        foot = Text()
        foot.append("gold path: ", style="dim")
        foot.append(" → ".join(_ent(e, labels) for e in gold_path) or "—", style="cyan")
        if bad:
            foot.append("\nhallucinated hops: ", style="dim")
            foot.append(", ".join(f"{h['src']} → {h['dst']}" for h in bad), style="bold red")
        elif hops:
            foot.append("\nall hops are KG edges", style="dim green")
        title = f"{ep.get('ex_id', '?')} · {ep.get('hop_len', '?')} hops · {status}"
        out.append(Panel(Group(head, Text(""), _trace_text(ep), Text(""), foot), title=title,
                         title_align="left", border_style="red" if status != "correct" else "green"))
    return out


def _ent(e: str, labels: dict[str, str]) -> str:
    return f"{e} {labels[e]}" if e in labels and labels[e] != e else e
