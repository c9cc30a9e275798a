"""``python -m tracer``: the same CLI as the ``tracer`` script."""

from tracer.cli import entry

entry()
