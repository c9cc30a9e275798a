"""fp32 matmul GFLOP/s and one SmolLM2-135M forward pass, OpenBLAS preload vs mlx-cpu's reference BLAS.

    .venv/bin/python bench/bench_blas.py                 # both variants, side by side
    .venv/bin/python bench/bench_blas.py --slow-batch 16   # reference forward at full batch (minutes)

Each variant runs in its own subprocess (the BLAS is fixed at the first ``import mlx``): the
slow one with ``TRACER_NO_OPENBLAS=1``. Prints GFLOP/s (1024² and 2048² fp32 matmul), the
forward-pass time (batch 16 × 146 tokens, full logits) and the OpenBLAS / reference ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import gemm_gflops

MODEL = "smollm2-135m-instruct"


def worker(args) -> dict:
    from tracer import backend
    from tracer.blas import blas_info

    backend.setup()  # no OpenBLAS under TRACER_NO_OPENBLAS=1
    import mlx.core as mx

    out = {"blas": blas_info()}

    out["gflops_1024"] = gemm_gflops(mx, 1024, args.mm_reps)
    out["gflops_2048"] = gemm_gflops(mx, 2048, max(1, args.mm_reps // 2))

    from tracer import model as M

    m, _ = M.load(MODEL)
    inputs = mx.random.randint(0, 49152, (args.batch, args.seq)).astype(mx.int32)
    print(f"gemm done {out['gflops_1024']:.1f} GFLOP/s; forward {args.batch}x{args.seq}", file=sys.stderr, flush=True)
    mx.eval(m(inputs[:1, :8]))  # tiny warm-up (graph / allocator), not the full pass
    times = []
    for _ in range(args.fwd_reps):
        t = time.perf_counter()
        mx.eval(m(inputs))
        times.append(time.perf_counter() - t)
    out["fwd_s"] = min(times)
    out["fwd_times"] = times
    n_params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(m.parameters()))
    out["fwd_gflops"] = 2 * n_params * args.batch * args.seq / out["fwd_s"] / 1e9
    return out


def run_variant(reference: bool, args) -> dict:
    env = dict(os.environ)
    if reference:
        env["TRACER_NO_OPENBLAS"] = "1"
    else:
        env.pop("TRACER_NO_OPENBLAS", None)
    batch = args.slow_batch if reference else args.batch
    cmd = [sys.executable, __file__, "--worker", "--batch", str(batch), "--seq", str(args.seq),
           "--mm-reps", str(args.slow_mm_reps if reference else args.mm_reps),
           "--fwd-reps", str(args.slow_fwd_reps if reference else args.fwd_reps)]
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"variant {'reference' if reference else 'openblas'} failed")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    out["batch"] = batch
    if batch != args.batch:  # extrapolate the forward time linearly in tokens
        out["fwd_s_measured"] = out["fwd_s"]
        out["fwd_s"] = out["fwd_s"] * args.batch / batch
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=146)
    p.add_argument("--mm-reps", type=int, default=6)
    p.add_argument("--fwd-reps", type=int, default=3)
    p.add_argument("--slow-mm-reps", type=int, default=2)
    p.add_argument("--slow-fwd-reps", type=int, default=1)
    p.add_argument("--slow-batch", type=int, default=2,
                   help="batch of the reference-BLAS forward (its time is scaled to --batch)")
    p.add_argument("--timeout", type=int, default=330)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    fast = run_variant(False, args)
    slow = run_variant(True, args)
    print(f"{'':24s}{'OpenBLAS':>14s}{'reference':>14s}{'ratio':>9s}")
    for key, label, unit in [("gflops_1024", "matmul 1024² GFLOP/s", ""), ("gflops_2048", "matmul 2048² GFLOP/s", ""),
                             ("fwd_s", f"fwd {args.batch}x{args.seq} s", ""),
                             ("fwd_gflops", "fwd GFLOP/s (2·N·tok)", "")]:
        f, s = fast[key], slow[key]
        ratio = s / f if key == "fwd_s" else f / s
        print(f"{label:24s}{f:14.2f}{s:14.2f}{ratio:8.1f}x")
    if slow["batch"] != args.batch:
        print(f"(reference forward measured at batch {slow['batch']}: {slow['fwd_s_measured']:.2f} s, "
              f"scaled x{args.batch / slow['batch']:g} to batch {args.batch})")
    print(f"openblas: {fast['blas']['status']} ({fast['blas']['openblas']})")
    print(f"reference: {slow['blas']['status']}")
    print(f"fwd times (s): openblas {[round(x, 2) for x in fast['fwd_times']]}, "
          f"reference {[round(x, 2) for x in slow['fwd_times']]}")
    print(json.dumps({"openblas": fast, "reference": slow}))


if __name__ == "__main__":
    main()
