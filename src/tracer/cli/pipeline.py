"""The pipeline commands: data, eval, sft, continue, rsft, grpo, consolidate, run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tracer import runs
from tracer.cli.common import (AdapterOpt, ConfigOpt, ForceOpt, KgOpt, ModelOpt, OverlapOpt, RunDirOpt, SeedOpt,
                               TypesOpt, _config, _old_name, _progress, _renamed, _workspace, app, click_exc,
                               console, err_console, print_phase)
from tracer.display import data_table, rsft_table, train_summary
from tracer.errors import TracerError


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
    if runs.is_follower():  # under mlx.launch rank 0 records the phase and prints it
        return
    print_phase(out["run_dir"])
    console.print(f"episodes: {out['episodes']}")


def _print_train(stats: dict) -> None:
    console.print(train_summary(stats))


@app.command()
def sft(
    config: Optional[Path] = ConfigOpt,
    train: Optional[list[str]] = typer.Option(
        None, "--train", "-t", help="Training JSONL (default: the train split); repeat it to train on several files together."),
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
    train: list[str] = typer.Option(..., "--train", "-t", help="New training examples (JSONL); repeat it for several files."),
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
    if runs.is_follower():  # under mlx.launch rank 0 records the rounds and prints them
        return
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
    if runs.is_follower():  # under mlx.launch rank 0 records the phase and prints it
        return
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
    if runs.is_follower():  # under mlx.launch rank 0 records the phase and prints it
        return
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
        None, "--seed", help="Seed of the whole run: sets run.seed and the sft, rsft, grpo, consolidate and "
                             "eval seeds (data.seed, which picks the questions, is kept)."),
    allow_eval_overlap: bool = OverlapOpt,
) -> None:
    """The whole pipeline: data → base eval → SFT → eval → RSFT → eval (→ consolidate → eval) → report."""
    from tracer.pipeline.run import run as run_pipeline

    if force and resume:
        raise TracerError("--force and --resume exclude each other")
    cfg = _config(config, run__name=name, model__path=model, run__seed=seed, sft__seed=seed, rsft__seed=seed,
                  grpo__seed=seed, consolidate__seed=seed, eval__seed=seed)
    out = run_pipeline(_workspace(cfg), force=force, resume=resume, allow_eval_overlap=allow_eval_overlap)
    if runs.is_follower():  # under mlx.launch rank 0 writes the run and prints it
        return
    if out.get("data"):
        console.print(data_table(out["data"]["summary"]))
    print_phase(out["run_dir"])
    console.print(f"run directory: {out['run_dir']}")
