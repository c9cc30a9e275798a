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

import json

from common import ab_main, attention_times, print_ab_rows, sft_steps_and_greedy


def old_reduce(mx):
    @mx.compile
    def _reduce(x):
        x = mx.minimum(mx.maximum(x, -87.0), 88.0)
        n = (x * 1.4426950408889634 + 12582912.0) - 12582912.0
        return n, (x - n * 0.693359375) - n * -2.12194440e-4

    return _reduce


def worker(variant: str, data: list[str], n_batches: int, n_prompts: int) -> dict:
    from tracer import backend

    backend.setup()
    import mlx.core as mx

    from tracer import cpu_ops

    if variant == "old":
        cpu_ops._reduce = old_reduce(mx)
    return {"attention": attention_times(mx, cpu_ops), **sft_steps_and_greedy(data, n_batches, n_prompts)}


def main() -> None:
    ran = ab_main(__doc__, {"old": {}, "new": {}}, worker)
    if ran is None:
        return
    args, data, res = ran
    print("| task | old: exp = 1.6e-38 below -87 | new: 0 | speedup | same result |\n|---|---|---|---|---|")
    print_ab_rows(res["old"], res["new"], data, args.batches, args.prompts)
    for r in res.values():
        r.pop("completions")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
