"""Run by tests/test_distributed.py under `mlx.launch -n 2`: `tracer ARGS...` (through the CLI's
entry, with its signal handlers) where rank 1 stops once it finished step STEP: killed (SIGKILL)
or, with HOW "exit", exiting with code 0, which mlx.launch takes for a rank that is done.
Usage: dist_die.py STEP HOW ARGS..."""

import os
import signal
import sys

from tracer import backend

backend.setup()

from tracer import train  # noqa: E402
from tracer.cli.main import entry  # noqa: E402

STEP, HOW = int(sys.argv.pop(1)), sys.argv.pop(1)
_after_step = train._after_step


def after_step_then_stop(model, optimizer, rec, tokens, done, *args):
    _after_step(model, optimizer, rec, tokens, done, *args)
    if done == STEP and os.environ.get("MLX_RANK") == "1":
        if HOW == "exit":
            os._exit(0)
        os.kill(os.getpid(), signal.SIGKILL)


train._after_step = after_step_then_stop

if __name__ == "__main__":
    entry()
