"""The entry point: one-line errors (exit 2) for bad input, no tracebacks; the backend set up once
before a command that loads MLX; SIGINT and SIGTERM stop training cleanly; under mlx.launch a rank
that stopped ends the others with one line (exit 1)."""

from __future__ import annotations

import os
import signal
import sys

import typer

from tracer import __version__, runs
from tracer.cli.common import app, click_exc, console, err_console
from tracer.distributed import launched, peer_lost
from tracer.errors import PeerLost, TracerError, TrainingInterrupted


NO_MLX_COMMANDS = {"data", "kg", "report"}  # pure Python: they start without loading the backend
# what runs sharded under mlx.launch: training (tracer.train), GRPO (tracer.grpo), generation
# (tracer.distributed); `run` with any of its phases
DATA_PARALLEL_COMMANDS = {"sft", "continue", "eval", "rsft", "grpo", "consolidate", "run"}


def _data_parallel(command: str | None) -> None:
    """Under ``mlx.launch``: only :data:`DATA_PARALLEL_COMMANDS` run sharded, and ranks other
    than 0 print nothing but errors."""
    if not launched():
        return
    if command not in DATA_PARALLEL_COMMANDS:
        raise TracerError(f"tracer {command}: under mlx.launch only {', '.join(sorted(DATA_PARALLEL_COMMANDS))} "
                          "run data-parallel; run it as one process")
    console.quiet = runs.is_follower()


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
    except (PeerLost, RuntimeError) as e:
        if not peer_lost(e):
            raise
        _STOPPING["signal"] = _PEER_LOST
        err_console.print(f"error: {_peer_lost_line(e)}", markup=False)
        return 1
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


def _peer_lost_line(e: BaseException) -> str:
    """The line for a rank whose peer stopped: training's :class:`PeerLost` says where it stopped."""
    if isinstance(e, PeerLost):
        return f"{e}; rerun with --resume to continue"
    return f"rank {os.environ.get('MLX_RANK', '0')}: lost the connection to another rank, which stopped; the job stops"


_STOPPING: dict = {"signal": None}
_PEER_LOST = "peer lost"  # _STOPPING's signal once another rank stopped: mlx.launch's SIGTERM follows


def _stop(signum, frame) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (`kill`, a CI cancel, a job scheduler's stop) alike: the first
    raises KeyboardInterrupt, so training saves a checkpoint and exits 130 with the --resume hint.
    Later ones are noted and ignored, so they cannot abort that checkpoint half-written
    (kill -9 still stops the process at once). Under mlx.launch, once this rank met a stopped peer
    (it is handling that error, or has), the SIGTERM mlx.launch sends all ranks then is ignored."""
    if _STOPPING["signal"] is None and peer_lost(sys.exc_info()[1]):
        _STOPPING["signal"] = _PEER_LOST
    if _STOPPING["signal"] == _PEER_LOST:
        return
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
