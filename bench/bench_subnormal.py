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
import time
from pathlib import Path


def old_reduce(mx):
    @mx.compile
    def _reduce(x):
        x = mx.minimum(mx.maximum(x, -87.0), 88.0)
        n = (x * 1.4426950408889634 + 12582912.0) - 12582912.0
        return n, (x - n * 0.693359375) - n * -2.12194440e-4

    return _reduce


def attention_times(mx, cpu_ops) -> dict:
    from mlx_lm.models.base import create_causal_mask

    out = {}
    for L in (130, 330):
        keys = mx.random.split(mx.random.key(0), 4)
        q = mx.random.normal((16, 9, L, 64), key=keys[0])
        k, v = mx.random.normal((16, 3, L, 64), key=keys[1]), mx.random.normal((16, 3, L, 64), key=keys[2])
        w = mx.random.normal((16, 9, L, 64), key=keys[3])
        mask = create_causal_mask(L, 0)
        fn = mx.compile(mx.grad(lambda q, k, v: (cpu_ops.attention(q, k, v, 0.125, mask) * w).sum(),
                                argnums=(0, 1, 2)))
        mx.eval(fn(q, k, v))
        t = time.perf_counter()
        for _ in range(3):
            mx.eval(fn(q, k, v))
        out[L] = (time.perf_counter() - t) / 3
    return out


def worker(variant: str, data: list[str], n_batches: int, n_prompts: int) -> dict:
    from tracer.blas import preload_openblas

    preload_openblas()
    import mlx.core as mx
    import mlx.optimizers as optim

    from tracer import cpu_ops
    from tracer import generate as G
    from tracer import model as tm
    from tracer import train as T
    from tracer.config import LoraConfig, TrainConfig

    if variant == "old":
        cpu_ops._reduce = old_reduce(mx)
    res = {"attention": attention_times(mx, cpu_ops), "steps": {}}
    cfg = TrainConfig(batch_size=16)
    for path in data:
        mx.random.seed(0)
        model, tok = tm.load("smollm2-135m-instruct")
        T.add_lora(model, T.lora_config(LoraConfig(rank=16, alpha=320.0, num_layers=-1), model))
        model.train()
        rows = [json.loads(line) for line in open(path)]
        examples = T.encode_pairs(tok, [(r["prompt"], r["ref"]["trace"]) for r in rows], 512)
        lengths = [len(ids) for ids, _ in examples]
        step = T.TrainStep(model, optim.AdamW(learning_rate=1e-5), cfg.grad_clip, compiled=True)
        times, losses = [], []
        for s in range(n_batches):
            idx = T.batch_for_step(s, lengths, cfg.batch_size, cfg.seed, None, False)
            b = T.collate([examples[i] for i in idx], True, T.COMPILED_PAD)
            for _ in range(2):
                t = time.perf_counter()
                loss = step(b)
                mx.eval(loss, model.state)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
        res["steps"][path] = {"s": times, "loss": losses}
    model, tok = tm.load("smollm2-135m-instruct")
    G.use_fast_layers(model)
    eval_rows = [json.loads(line) for line in open(Path(data[0]).parent / "eval.jsonl")][:n_prompts]
    t = time.perf_counter()
    res["completions"] = G.generate(model, tok, [r["prompt"] for r in eval_rows], max_tokens=64, batch_size=16)
    res["generate_s"] = time.perf_counter() - t
    return res


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
    o, n = res["old"], res["new"]
    print("| task | old: exp = 1.6e-38 below -87 | new: 0 | speedup | same result |\n|---|---|---|---|---|")
    for L in ("130", "330"):
        a, b = o["attention"][L], n["attention"][L]
        print(f"| attention layer fwd + bwd, 16 × {L} positions | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | "
              f"**{a / b:.2f}x** | |")
    for path in data:
        a, b = o["steps"][path], n["steps"][path]
        same = max(abs(x - y) for x, y in zip(a["loss"], b["loss"]))
        print(f"| SFT step (compiled), first {args.batches} batches of `{path}` | {sum(a['s']) / len(a['s']):.2f} s | "
              f"{sum(b['s']) / len(b['s']):.2f} s | **{sum(a['s']) / sum(b['s']):.2f}x** | loss max diff {same:.1e} |")
    same = sum(x == y for x, y in zip(o["completions"], n["completions"]))
    print(f"| greedy, {args.prompts} eval prompts, base model, 64 tokens | {o['generate_s']:.1f} s | "
          f"{n['generate_s']:.1f} s | **{o['generate_s'] / n['generate_s']:.2f}x** | {same}/{len(o['completions'])} |")
    for r in res.values():
        r.pop("completions")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
