"""tracer: teach small language models to reason over a knowledge graph."""

__version__ = "0.1.0"
