"""tracer.cpu_ops on MLX's CPU backend: element-wise kernels, then SFT steps with and without the
compiled step, side by side.

    .venv/bin/python bench/bench_cpu_ops.py --data data/train.jsonl

Part 1 times element-wise kernels on one SFT activation (16 × 116 × 1536 fp32): an add, ``mx.exp``,
``nn.silu``, and cpu_ops' polynomial exp and SiLU, alone and under ``mx.grad`` (where MLX runs
compiled functions op by op). Part 2 runs ``train.TrainStep`` (loss, gradients, clipping, AdamW;
SmolLM2-135M fp32, LoRA rank 16 on all layers) over the first ``--batches`` batches of the SFT
schedule of ``--data``, each batch twice, in one process per variant: plain (mlx-lm's layers,
unpadded batches) and compiled (cpu_ops layers, batches padded to (8, 32)). A compiled step is
traced and built again for each new batch shape; its second run of a batch is what every later
batch of that shape costs (a configs/default_rsft.toml SFT has 33 shapes in 720 steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import per_element_ns


def part1() -> list[tuple[str, float, str]]:
    from tracer.blas import preload_openblas

    preload_openblas()
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from tracer import cpu_ops

    x = mx.random.uniform(-20, 20, (16, 116, 1536))
    mx.eval(x)
    ref = np.exp(np.array(x, dtype=np.float64))

    def ns(fn):
        return per_element_ns(mx, lambda _: fn(), x)

    def err(y):
        return f"max rel. error {np.max(np.abs(np.array(y, dtype=np.float64) - ref) / ref):.1e}"

    return [
        ("add", ns(lambda: x + 1.0), ""),
        ("mx.exp", ns(lambda: mx.exp(x)), err(mx.exp(x))),
        ("cpu_ops.exp", ns(lambda: cpu_ops.exp(x)), err(cpu_ops.exp(x))),
        ("nn.silu", ns(lambda: nn.silu(x)), ""),
        ("cpu_ops.silu", ns(lambda: cpu_ops.silu(x)), ""),
        ("grad of nn.silu (forward + backward)", ns(lambda: mx.grad(lambda y: nn.silu(y).sum())(x)), ""),
        ("grad of cpu_ops.silu, not compiled", ns(lambda: mx.grad(lambda y: cpu_ops.silu(y).sum())(x)), ""),
    ]


def step_worker(compiled: bool, data: str, n_batches: int) -> dict:
    from tracer import backend

    backend.setup()
    import mlx.core as mx
    import mlx.optimizers as optim

    from tracer import model as tm
    from tracer import adapters, batching
    from tracer import train as T
    from tracer.config import LoraConfig, TrainConfig

    model, tok = tm.load("smollm2-135m-instruct")
    adapters.add_lora(model, adapters.lora_config(LoraConfig(rank=16, alpha=320.0, num_layers=-1), model))
    model.train()
    rows = [json.loads(line) for line in open(data)]
    examples = batching.encode_pairs(tok, [(r["prompt"], r["ref"]["trace"]) for r in rows], 512)
    cfg = TrainConfig(batch_size=16)
    lengths = [len(ids) for ids, _ in examples]
    step = T.TrainStep(model, optim.AdamW(learning_rate=1e-5), cfg.grad_clip, compiled=compiled)
    first, again, shapes = [], [], []
    for s in range(n_batches):
        idx = batching.batch_for_step(s, lengths, cfg.batch_size, cfg.seed, None, False)
        b = batching.collate([examples[i] for i in idx], True, T.COMPILED_PAD if compiled else None)
        shapes.append([b.inputs.shape[1], b.positions.size])
        for times in (first, again):
            t = time.perf_counter()
            mx.eval(step(b), model.state)
            times.append(time.perf_counter() - t)
    return {"first": first, "again": again, "shapes": shapes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/train.jsonl")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--worker", choices=["plain", "compiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(step_worker(args.worker == "compiled", args.data, args.batches)))
        return
    print("| element-wise kernel, 16 × 116 × 1536 fp32 | ns per element | |\n|---|---|---|")
    for name, ns, note in part1():
        print(f"| {name} | {ns:.2f} | {note} |", flush=True)
    res = {}
    for variant in ("plain", "compiled"):
        out = subprocess.run([sys.executable, __file__, "--data", args.data, "--batches", str(args.batches),
                              "--worker", variant], capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    n = args.batches
    print(f"\n| SFT step, first {n} schedule batches (16 rows) | first run, mean s | second run, mean s |\n|---|---|---|")
    for v, r in res.items():
        print(f"| {v} | {sum(r['first']) / n:.2f} | {sum(r['again']) / n:.2f} |")
    p, c = res["plain"], res["compiled"]
    print(f"\ncompiled vs plain, second runs: {sum(p['again']) / sum(c['again']):.2f}x; first runs (with tracing "
          f"and building): {sum(p['first']) / sum(c['first']):.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
