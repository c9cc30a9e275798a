"""Generation in one process vs a pool of worker processes (``tracer.workers.Pool``), one run.

    .venv/bin/python bench/bench_workers.py --adapter data/runs/default/models/sft

Both sides run the same jobs: RSFT-style sampling (``--jobs`` jobs of ``-n`` pool questions × K,
each job its own seed, as ``tracer rsft`` chunks a round) and a greedy eval of ``--eval``
questions (``Pool.generate``, sharded over the workers). "one process" is the pool of size 1:
every job in this process with all the cores' OpenBLAS threads (what tracer did before); the
pool of ``--workers`` starts that many processes, each loading the model and taking the free
jobs (its start-up is inside the timing). Sampled completions must be identical on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tracer import backend
from tracer.blas import THREAD_ENV, blas_info

backend.setup()

from tracer import workers  # noqa: E402


def timed(pool: workers.Pool, fn):
    t = time.perf_counter()
    out = fn(pool)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--pool", default="data/rsft.jsonl", help="sampled questions (JSONL with 'prompt')")
    ap.add_argument("--examples", default="data/eval.jsonl", help="greedy eval questions")
    ap.add_argument("--jobs", type=int, default=2, help="sampling jobs")
    ap.add_argument("-n", type=int, default=16, help="questions per sampling job")
    ap.add_argument("-k", type=int, default=4, help="samples per question")
    ap.add_argument("--eval", type=int, default=64, help="greedy eval questions")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if any(os.environ.get(k) for k in THREAD_ENV):
        ap.error(f"unset {', '.join(THREAD_ENV)}: the pool sets each process's thread count")
    pool_qs = [json.loads(line)["prompt"] for line in open(args.pool)][: args.jobs * args.n]
    eval_qs = [json.loads(line)["prompt"] for line in open(args.examples)][: args.eval]
    jobs = [{"prompts": [q for q in pool_qs[j * args.n : (j + 1) * args.n] for _ in range(args.k)],
             "max_tokens": args.max_tokens, "temperature": 0.8, "seed": 100 + j, "batch_size": args.batch_size}
            for j in range(args.jobs)]
    load = {"spec": args.model, "adapter": args.adapter, "fuse": True}
    tasks = {
        f"sample {args.jobs} jobs x {args.n} questions x {args.k}": lambda p: p.map(jobs),
        f"greedy eval of {len(eval_qs)}": lambda p: p.generate(eval_qs, max_tokens=args.max_tokens,
                                                              batch_size=args.batch_size),
    }
    print(json.dumps({"blas": blas_info()["config"], "cores": len(os.sched_getaffinity(0)), "workers": args.workers}))
    one = workers.Pool(load, 1)
    one.local_model()  # the one-process side keeps its model loaded, as a run's eval does
    result = {}
    for name, fn in tasks.items():
        want, t1 = timed(one, fn)
        with workers.Pool(load, args.workers) as pool:
            got, tn = timed(pool, fn)
        result[name] = {"one_process_s": round(t1, 1), f"{args.workers}_workers_s": round(tn, 1),
                        "speedup": round(t1 / tn, 2), "same_outputs": got == want}
        print(name, result[name], flush=True)
    one.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
