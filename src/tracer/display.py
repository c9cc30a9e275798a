"""What the CLI shows besides the report tables: a rich progress bar for the pipeline's progress
events, and the tables and lines that summarise a command's result. Pure rich (no MLX)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


class RichProgress:
    """Renders tracer.progress.Progress events as a rich progress bar.

    Off a terminal (a log file, CI) rich draws nothing until a bar stops, so a plain status line
    is printed instead, at most every ``every`` seconds.
    """

    ETA_WINDOW = 600.0  # seconds of steps behind the eta: steps over length-grouped batches vary widely

    def __init__(self, con: Console, every: float = 60.0, clock=time.monotonic):
        self.console, self.clock = con, clock
        self.bar: Progress | None = None
        self.task = None
        self.plain, self.every, self.last = not con.is_terminal, every, float("-inf")

    def start(self, description: str, total: int | None) -> None:
        self.stop()
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False, speed_estimate_period=self.ETA_WINDOW, get_time=self.clock,
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, info="")
        self.last = float("-inf")  # the first update always prints (monotonic() starts near 0 at boot)

    def update(self, advance: int = 1, **info: Any) -> None:
        if self.bar is None:
            return
        text = "  ".join(f"{k} {fmt(v)}" for k, v in info.items())
        self.bar.update(self.task, advance=advance, info=text)
        if self.plain and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            t = self.bar.tasks[0]
            eta = f"  eta {t.time_remaining:.0f}s" if t.time_remaining is not None else ""
            self.console.print(f"{t.description} {t.completed:.0f}/{t.total or '?'}{eta}  {text}", markup=False)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def log(self, message: str) -> None:
        (self.bar.console if self.bar else self.console).print(message)


def fmt(v: Any) -> str:
    """A value beside a bar or in ``tracer doctor``: floats to 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def data_table(summary: dict) -> Table:
    """``tracer data``: questions per split and hop length, answer-letter balance, edge coverage."""
    table = Table(title="Dataset")
    table.add_column("split")
    hops = sorted({int(h) for s in summary["splits"].values() for h in s["per_hop"]})
    for h in hops:
        table.add_column(f"{h}-hop", justify="right")
    table.add_column("total", justify="right")
    table.add_column("A/B/C/D %", justify="right", no_wrap=True)
    for name, s in summary["splits"].items():
        letters = "/".join(f"{100 * summary['letters'][name].get(x, 0):.0f}" for x in "ABCD")
        table.add_row(name, *[str(s["per_hop"].get(str(h), 0)) for h in hops], str(s["n"]), letters)
    cov = summary["edge_coverage"]
    table.caption = (
        f"train edge coverage: min {cov['min']}, mean {cov['mean']:.1f}; "
        f"{100 * cov['frac_covered']:.0f}% of {cov['edges']} KG edges appear in ≥ {cov['required']} training paths"
    )
    return table


def rsft_table(rounds: list[dict]) -> Table:
    """``tracer rsft``: per round, the questions, how many got a winner, the samples' reward and accuracy."""
    table = Table(title="RSFT rounds")
    for col in ("round", "questions", "with winner", "mean sample reward", "sample acc.", "winners kept"):
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(str(r["round"]), str(r["questions"]), str(r["questions_with_winner"]),
                      f"{r['mean_sample_reward']:+.2f}", f"{100 * r['sample_accuracy']:.1f}%", str(r["winners"]))
    return table


def train_summary(stats: dict) -> str:
    """One line on a finished training run (rich markup)."""
    return (
        f"trained {stats['steps']} steps in {stats['wall_s']:.0f}s ({stats['tok_s']:.0f} tok/s), "
        f"final loss {stats['final_loss']:.4f}; adapter: {stats['adapter']}"
        + (" [red](contaminated: trained with eval overlap)[/red]" if stats.get("contaminated") else "")
    )


def kg_tables(info: dict, counts: dict) -> list[Table]:
    """`tracer kg stats`: the graph's size, each relation's fan-out, and questions per hop length."""
    size = Table(title="Graph", show_header=False)
    size.add_column(justify="left")
    size.add_column(justify="right")
    for key in ("entities", "relations", "edges"):
        size.add_row(key, f"{info[key]:,}")
    size.add_row("(entity, relation) pairs", f"{info['pairs']:,}")
    size.add_row("  with several targets", f"{info['multi_pairs']:,}")
    size.add_row("types", f"{len(info['types'])}")
    for t, n in list(info["types"].items())[:8]:
        size.add_row(f"  {t}", f"{n:,}")
    if len(info["types"]) > 8:
        size.add_row(f"  ({len(info['types']) - 8} more)", "")
    fan = Table(title="Relations")
    for col in ("relation", "edges", "heads", "> 1 target", "max"):
        fan.add_column(col, justify="left" if col == "relation" else "right")
    for r in info["fanout"]:
        fan.add_row(r["relation"], f"{r['edges']:,}", f"{r['heads']:,}", f"{r['multi']:,}", str(r["max_targets"]))
    q = Table(title="Questions the generator can make")
    for col in ("hops", "questions", "config needs", ""):
        q.add_column(col, justify="right" if col else "left")
    for h, n in counts["hops"].items():
        need = counts["need"].get(h, 0)
        ok = "" if not need else ("ok" if n >= need else "[red]too few[/red]")
        q.add_row(str(h), ("≥ " if counts["sampled"] else "") + f"{n:,}", f"{need:,}" if need else "-", ok)
    q.caption = ("sampled by random walks: the graph is too dense to list every path" if counts["sampled"]
                 else "distinct (start, relation chain, answer) with exactly one reachable option")
    return [size, fan, q]


def ask_panel(out: dict) -> Panel:
    """`tracer ask`: the question, the completion with each hop marked, the answer and the reward."""
    body = Text(out["question"] + "\n")
    for letter, option in out["options"].items():
        body.append(f"  {letter}) {option}\n", style="bold" if letter == out.get("answer_star") else "")
    body.append("\n" + out["completion"].strip() + "\n\n")
    for h in out["hops"]:
        arrow = f"-{h['rel']}->" if h["rel"] else "->"
        body.append(f"{'✓' if h['real'] else '✗'} {h['src']} {arrow} {h['dst']}\n",
                    style="green" if h["real"] else "bold red")
    verdict = "no valid answer" if not out["valid_format"] else f"answer {out['answer']}"
    if "correct" in out:
        verdict += f" ({'right' if out['correct'] else 'wrong'}; gold {out['answer_star']})"
        verdict += f"; reward {out['reward']['total']:+.2f}, path coverage {100 * out['reward']['path_coverage']:.0f}%"
    body.append(verdict, style="bold")
    return Panel(body, title=out["id"], title_align="left")
