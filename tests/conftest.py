"""Load OpenBLAS before any test module imports MLX (the reference BLAS is ~50x slower)."""

from tracer.blas import preload_openblas

preload_openblas()
