"""The report as a PNG: accuracy (with its interval), path coverage and reward across phases, and
a GRPO run's step log. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tracer.errors import TracerError
from tracer.report.load import grpo_log
from tracer.report.rows import is_contaminated, phase_order, phase_rows

PLOT_HINT = "plotting needs matplotlib: pip install 'tracer[plot]'"


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
