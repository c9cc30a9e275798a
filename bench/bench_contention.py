"""Two tracer processes on one machine: OpenBLAS threads per core each (before) vs cores shared
(``tracer.blas.share_cores``), against one process alone; same work, measured in one run.

    .venv/bin/python bench/bench_contention.py --prompts 4 --units 3

Each worker loads the model and runs ``--units`` prefills of ``--prompts`` closed-book eval
prompts (one call of ``share_cores`` before each, as a training step does); the first unit is a
warm-up and the mean of the others counts. "before" pins ``OPENBLAS_NUM_THREADS`` to the core
count, which is what every process used before ``share_cores``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(args) -> None:
    from tracer import backend
    from tracer.blas import share_cores

    backend.setup()
    import mlx.core as mx

    from tracer import format as F
    from tracer import generate as G
    from tracer import model as tm

    model, tok = tm.load(args.model)
    prompts = [json.loads(line)["prompt"] for line in open(args.examples)][: args.prompts]
    inputs, padding = G.left_pad([F.encode_chat(tok, p) for p in prompts])
    times, threads = [], []
    for _ in range(args.units):
        threads.append(share_cores(0))
        t = time.perf_counter()
        mx.eval(G.last_logits(model, inputs, G.make_cache(model, padding)))
        times.append(time.perf_counter() - t)
    print(json.dumps({"unit_s": times, "threads": threads}))


def run(n: int, env: dict, argv: list[str]) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", *argv], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", default="data/eval.jsonl")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--units", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    argv = ["--model", args.model, "--examples", args.examples, "--prompts", str(args.prompts),
            "--units", str(args.units)]
    from tracer.blas import THREAD_ENV

    base = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    cores = len(os.sched_getaffinity(0))
    modes = {"alone": (1, base), "two, before (a thread per core each)": (2, {**base, "OPENBLAS_NUM_THREADS": str(cores)}),
             "two, share_cores": (2, base)}
    result = {"cores": cores, "prompts": args.prompts, "modes": {}}
    for name, (n, env) in modes.items():
        outs = run(n, env, argv)
        mean = [sum(o["unit_s"][1:]) / max(1, len(o["unit_s"]) - 1) for o in outs]
        result["modes"][name] = {"unit_s": [round(m, 2) for m in mean], "threads": [o["threads"] for o in outs]}
        print(name, result["modes"][name], file=sys.stderr, flush=True)
    before = max(result["modes"]["two, before (a thread per core each)"]["unit_s"])
    shared = max(result["modes"]["two, share_cores"]["unit_s"])
    result["speedup_two_processes"] = round(before / shared, 2)
    result["shared_vs_alone"] = round(shared / result["modes"]["alone"]["unit_s"][0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
