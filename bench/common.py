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


def attention_times(mx, cpu_ops, lengths=(130, 330), reps: int = 3) -> dict:
    """Seconds for one attention layer's compiled forward + backward (SmolLM2-135M's 9 query /
    3 KV heads of 64 dims, batch 16, causal) at each length: closed-book and open-book rows."""
    from mlx_lm.models.base import create_causal_mask

    out = {}
    for L in lengths:
        keys = mx.random.split(mx.random.key(0), 4)
        q = mx.random.normal((16, 9, L, 64), key=keys[0])
        k, v = mx.random.normal((16, 3, L, 64), key=keys[1]), mx.random.normal((16, 3, L, 64), key=keys[2])
        w = mx.random.normal((16, 9, L, 64), key=keys[3])
        mask = create_causal_mask(L, 0)
        fn = mx.compile(mx.grad(lambda q, k, v: (cpu_ops.attention(q, k, v, 0.125, mask) * w).sum(),
                                argnums=(0, 1, 2)))
        mx.eval(fn(q, k, v))
        t = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn(q, k, v))
        out[str(L)] = (time.perf_counter() - t) / reps
    return out


def sft_steps_and_greedy(data: list[str], n_batches: int, n_prompts: int) -> dict:
    """What ``tracer sft`` and ``tracer eval`` run, on SmolLM2-135M fp32: the compiled
    ``train.TrainStep`` (LoRA rank 16 on all layers, batch 16) over the first ``n_batches``
    schedule batches of each training JSONL, each batch twice with the second run timed (the
    first traces and builds the step for its shape); then greedy generation (64 tokens) of the
    first ``n_prompts`` prompts of ``eval.jsonl`` beside ``data[0]``, base model.
    Returns ``{"steps": {path: {"s", "loss"}}, "completions", "generate_s"}``. Imports tracer:
    call it in a subprocess set up for the variant."""
    import json
    from pathlib import Path

    import mlx.core as mx
    import mlx.optimizers as optim

    from tracer import generate as G
    from tracer import model as tm
    from tracer import adapters, batching
    from tracer import train as T
    from tracer.config import LoraConfig, TrainConfig

    res: dict = {"steps": {}}
    cfg = TrainConfig(batch_size=16)
    for path in data:
        mx.random.seed(0)
        model, tok = tm.load("smollm2-135m-instruct")
        adapters.add_lora(model, adapters.lora_config(LoraConfig(rank=16, alpha=320.0, num_layers=-1), model))
        model.train()
        rows = [json.loads(line) for line in open(path)]
        examples = batching.encode_pairs(tok, [(r["prompt"], r["ref"]["trace"]) for r in rows], 512)
        lengths = [len(ids) for ids, _ in examples]
        step = T.TrainStep(model, optim.AdamW(learning_rate=1e-5), cfg.grad_clip, compiled=True)
        times, losses = [], []
        for s in range(n_batches):
            idx = batching.batch_for_step(s, lengths, cfg.batch_size, cfg.seed, None, False)
            b = batching.collate([examples[i] for i in idx], True, T.COMPILED_PAD)
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


def print_ab_rows(a: dict, b: dict, data: list[str], n_batches: int, n_prompts: int) -> None:
    """Markdown rows comparing two variants' :func:`attention_times` (under ``"attention"``) and
    :func:`sft_steps_and_greedy` results: times, speedup, and whether losses and completions agree."""
    for L in a["attention"]:
        x, y = a["attention"][L], b["attention"][L]
        print(f"| attention layer fwd + bwd, 16 × {L} positions | {x * 1e3:.0f} ms | {y * 1e3:.0f} ms | "
              f"**{x / y:.2f}x** | |")
    for path in data:
        x, y = a["steps"][path], b["steps"][path]
        same = max(abs(p - q) for p, q in zip(x["loss"], y["loss"]))
        print(f"| SFT step (compiled), first {n_batches} batches of `{path}` | {sum(x['s']) / len(x['s']):.2f} s | "
              f"{sum(y['s']) / len(y['s']):.2f} s | **{sum(x['s']) / sum(y['s']):.2f}x** | loss max diff {same:.1e} |")
    same = sum(p == q for p, q in zip(a["completions"], b["completions"]))
    print(f"| greedy, {n_prompts} eval prompts, base model, 64 tokens | {a['generate_s']:.1f} s | "
          f"{b['generate_s']:.1f} s | **{a['generate_s'] / b['generate_s']:.2f}x** | {same}/{len(a['completions'])} |")


def ab_main(doc: str, variants: dict[str, dict], worker):
    """The command line of an A/B bench over :func:`sft_steps_and_greedy`'s data: parse
    ``--data --facts --batches --prompts``; as ``--worker NAME`` print ``worker(NAME, data,
    batches, prompts)`` as JSON and return None; otherwise run each variant in its own process
    (``variants``: name -> extra environment) and return ``(args, data, {name: result})``."""
    import argparse
    import json
    import os
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data", default="data/train.jsonl", help="closed-book training JSONL")
    ap.add_argument("--facts", default="", help="open-book (data.context = 'facts') training JSONL")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--worker", choices=list(variants), help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = [args.data] + ([args.facts] if args.facts else [])
    if args.worker:
        print(json.dumps(worker(args.worker, data, args.batches, args.prompts)))
        return None
    res = {}
    for name, env in variants.items():
        cmd = [sys.executable, sys.argv[0], "--data", args.data, "--facts", args.facts, "--batches",
               str(args.batches), "--prompts", str(args.prompts), "--worker", name]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return args, data, res
