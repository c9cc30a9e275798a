"""cpu_ops' exp below -87: the smallest normal float (before 2026-12-03) vs exactly 0 (now), side by side.

    .venv/bin/python bench/bench_subnormal.py --data data/train.jsonl --facts data/facts_scratch/train.jsonl

A causal attention's masked half of the scores comes out of the softmax as e^(finfo.min - max).
The old exp clipped its input to -87 and gave about 1.6e-38 there; every product that scales such
a value down (the softmax backward, the probabilities times V in float rounding) is subnormal, and
on x86 each subnormal result takes a microcode assist. Each variant runs in its own process with
``cpu_ops._reduce`` as the variant has it:
  1. one attention layer (SmolLM2-135M's 9 query / 3 KV heads, 64 dims, batch 16, causal),
     compiled forward + backward, at 130 and 330 positions (closed-book and open-book rows);
  2. ``train.TrainStep`` compiled (what ``tracer sft`` runs) over the first ``--batches`` SFT
     batches of each data file (16 rows; SmolLM2-135M fp32, LoRA rank 16 on all layers), each
     batch twice, the second run counted (the first traces and builds the step for its shape);
  3. greedy generation of the first ``--prompts`` eval prompts of ``--data``'s directory (base model).
Losses and completions must match between the two variants.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import attention_times, print_ab_rows, sft_steps_and_greedy


def old_reduce(mx):
    @mx.compile
    def _reduce(x):
        x = mx.minimum(mx.maximum(x, -87.0), 88.0)
        n = (x * 1.4426950408889634 + 12582912.0) - 12582912.0
        return n, (x - n * 0.693359375) - n * -2.12194440e-4

    return _reduce


def worker(variant: str, data: list[str], n_batches: int, n_prompts: int) -> dict:
    from tracer.blas import preload_openblas

    preload_openblas()
    import mlx.core as mx

    from tracer import cpu_ops

    if variant == "old":
        cpu_ops._reduce = old_reduce(mx)
    return {"attention": attention_times(mx, cpu_ops), **sft_steps_and_greedy(data, n_batches, n_prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/train.jsonl", help="closed-book training JSONL")
    ap.add_argument("--facts", default="", help="open-book (data.context = 'facts') training JSONL")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = [args.data] + ([args.facts] if args.facts else [])
    if args.worker:
        print(json.dumps(worker(args.worker, data, args.batches, args.prompts)))
        return
    res = {}
    for variant in ("old", "new"):
        cmd = [sys.executable, __file__, "--data", args.data, "--facts", args.facts, "--batches",
               str(args.batches), "--prompts", str(args.prompts), "--worker", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| task | old: exp = 1.6e-38 below -87 | new: 0 | speedup | same result |\n|---|---|---|---|---|")
    print_ab_rows(res["old"], res["new"], data, args.batches, args.prompts)
    for r in res.values():
        r.pop("completions")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
