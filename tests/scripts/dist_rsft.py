"""Run by tests/test_distributed.py, alone and under `mlx.launch -n 2`: `tracer ARGS...` with RSFT
sampling a few questions per chunk, so a round's chunks outnumber the ranks."""

import sys

from tracer import backend

backend.setup()

from tracer.cli.main import main  # noqa: E402
from tracer.pipeline import rsft  # noqa: E402

rsft.SAMPLE_CHUNK = 5

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
