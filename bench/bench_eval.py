"""Wall time of generating answers to the eval questions with the eval settings (greedy, batch 32).

    .venv/bin/python bench/bench_eval.py --examples data/eval.jsonl
    .venv/bin/python bench/bench_eval.py --examples ... --adapter data/runs/run/sft --limit 64

Uses ``tracer.generate.generate`` exactly as ``tracer.pipeline.evaluate`` calls it (max_tokens from
``--max-tokens``, default both 160 and 96; batch_size 32; stop at the end of the ANSWER line). Prints wall
time, generated tokens and tokens/s per setting; with ``--limit`` also a linear extrapolation to
all questions in the file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tracer import backend
from tracer.blas import blas_info

backend.setup()

from tracer import generate as G  # noqa: E402
from tracer import model as M  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", default="data/eval.jsonl")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=None)
    p.add_argument("--limit", type=int, default=0, help="first N questions only (0 = all)")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[160, 96])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    rows = [json.loads(x) for x in Path(args.examples).read_text().splitlines() if x.strip()]
    total = len(rows)
    if args.limit:
        rows = rows[: args.limit]
    prompts = [r["prompt"] for r in rows]
    print(f"blas: {blas_info()['status']}; {len(prompts)} of {total} questions")
    results = []
    for adapter in [None] + ([args.adapter] if args.adapter else []):
        model, tok = M.load(args.model, adapter=adapter)
        for mt in args.max_tokens:
            t = time.perf_counter()
            toks = G.generate_tokens(model, tok, prompts, max_tokens=mt, batch_size=args.batch_size)
            wall = time.perf_counter() - t
            n = sum(len(x) for x in toks)
            full = sum(1 for x in toks if len(x) >= mt)
            r = {"adapter": adapter, "max_tokens": mt, "questions": len(prompts), "wall_s": wall,
                 "gen_tokens": n, "tok_s": n / wall, "hit_max_tokens": full,
                 "wall_s_all_questions_est": wall * total / len(prompts)}
            results.append(r)
            print(f"adapter={adapter or 'base'} max_tokens={mt}: {wall:.1f} s for {len(prompts)} questions, "
                  f"{n} tokens, {n / wall:.1f} tok/s, {full}/{len(prompts)} hit max_tokens"
                  + (f"; est. {r['wall_s_all_questions_est']:.0f} s for all {total}" if len(prompts) < total else ""),
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
