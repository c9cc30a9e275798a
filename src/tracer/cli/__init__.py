"""The `tracer` command line: parses options, calls the pipeline stages (tracer.pipeline), prints rich tables.

Bad input is reported as one line on stderr with exit code 2 and no traceback. The commands live in
:mod:`tracer.cli.pipeline` and :mod:`tracer.cli.tools`, the entry point in :mod:`tracer.cli.main`.
"""

from tracer.cli import pipeline, tools  # noqa: F401  (importing them registers the commands)
from tracer.cli.common import app
from tracer.cli.main import entry, main

__all__ = ["app", "entry", "main"]
