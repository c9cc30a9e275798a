"""The process's compute backend, set up once before MLX is first imported.

:func:`setup` preloads OpenBLAS (:mod:`tracer.blas`: MLX's CPU matmuls then use it rather than
the wheel's reference BLAS) and keeps freed memory in glibc's heap (:mod:`tracer.heap`: MLX's
large CPU arrays stop page-faulting). It must run before the first ``import mlx``, so the entry
points call it: the CLI for every command that loads MLX, a generation worker process as it
starts, and the test suite's conftest. The modules that use MLX only import it; a library caller
that imports them without :func:`setup` gets MLX's own BLAS and glibc's default malloc.
No mlx import here.
"""

from __future__ import annotations

from tracer.blas import blas_info, preload_openblas
from tracer.heap import heap_info, retain_freed_memory


def setup() -> dict:
    """Preload OpenBLAS and retain freed heap memory (idempotent); returns :func:`info`."""
    preload_openblas()
    retain_freed_memory()
    return info()


def info() -> dict:
    """What :func:`setup` did: ``{"blas": blas_info(), "malloc": heap_info()}``."""
    return {"blas": blas_info(), "malloc": heap_info()}
