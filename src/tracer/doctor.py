"""What ``tracer doctor`` reports: backend, device, BLAS, heap, a matmul benchmark, generation
workers and versions. Call :func:`tracer.backend.setup` before importing this (it imports MLX)."""

from __future__ import annotations

import time

import mlx.core as mx

from tracer import backend, cpu_ops
from tracer.blas import share_cores
from tracer.workers import auto_workers


def measure_matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """fp32 ``n×n @ n×n`` throughput on the default device, GFLOP/s."""
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def device_info() -> dict:
    """Backend, device, versions, BLAS and a quick fp32 matmul benchmark."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlx_lm_version = version("mlx-lm")
    except PackageNotFoundError:  # pragma: no cover
        mlx_lm_version = None
    share_cores(0)  # as many threads as a training step in this situation gets
    setup = backend.info()
    return {
        "backend": "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu",
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "blas": setup["blas"],
        "malloc": setup["malloc"],
        "matmul_gflops_fp32": round(measure_matmul_gflops(), 1),
        "generation_workers": auto_workers(0),
        # compiled training steps (with sft.compile) and generation on tracer.cpu_ops, for float32 weights
        "cpu_ops": cpu_ops.available(),
    }
