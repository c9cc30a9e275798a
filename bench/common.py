"""Helpers shared by the bench scripts. Standard library only at import time: the reference-BLAS
subprocesses must import mlx themselves, without tracer (importing tracer loads OpenBLAS)."""

from __future__ import annotations

import time


def gemm_gflops(mx, n: int = 1024, reps: int = 5) -> float:
    """fp32 ``n × n`` matmul GFLOP/s with the BLAS that ``mx`` (mlx.core) was loaded with."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def per_element_ns(mx, fn, x, reps: int = 10) -> float:
    """Nanoseconds per element of ``x`` for one evaluated ``fn(x)``, after a warm-up call."""
    mx.eval(fn(x))
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn(x))
    return (time.perf_counter() - t) / reps / x.size * 1e9
