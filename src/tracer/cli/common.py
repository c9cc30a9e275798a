"""What every `tracer` command shares: the Typer app and its sub-apps, the consoles, the shared
options and the helpers that build a config and a workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

try:  # typer >= 0.26 vendors click
    from typer._click import exceptions as click_exc  # noqa: F401  (the commands and main use it)
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exc
from rich.console import Console

from tracer.config import Config, load_config, override
from tracer.display import RichProgress
from tracer.errors import TracerError

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
