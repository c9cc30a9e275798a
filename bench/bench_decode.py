"""One decode step, batch of closed-book eval prompts: mlx-lm's layers vs tracer's grouped decode
attention vs cpu_ops' layers (what generation uses on the CPU), side by side; plus what an element
costs in MLX's CPU kernels.

    .venv/bin/python bench/bench_decode.py --batch 32 --steps 24

Greedy, fixed batch (no stops, no refills), the shared system-prompt prefix cached once; each
variant runs ``--reps`` times, alternating, and the fastest counts.
"""

from __future__ import annotations

import argparse
import json
import time

from tracer import backend

backend.setup()

import mlx.core as mx  # noqa: E402
from common import per_element_ns  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

from tracer import cpu_ops  # noqa: E402
from tracer import format as F  # noqa: E402
from tracer import generate as G  # noqa: E402
from tracer import model as tm  # noqa: E402


VARIANTS = {  # attention and MLP classes of every layer
    "mlx-lm attention": (llama.Attention, llama.MLP),
    "grouped decode": (G.GroupedDecodeAttention, llama.MLP),
    "cpu_ops layers": (cpu_ops.CpuAttention, cpu_ops.CpuMLP),
}


def decode_ms(model, enc: list[list[int]], prefix_kv, P: int, steps: int) -> tuple[float, list]:
    inputs, padding = G.left_pad(enc)
    cache = G.make_cache(model, padding, prefix_kv)
    y = mx.argmax(G.last_logits(model, inputs[:, P:], cache), axis=-1)
    mx.eval(y)
    toks = []
    t = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(G.last_logits(model, y[:, None], cache), axis=-1)
        mx.eval(y)
        toks.append(y.tolist())
    return (time.perf_counter() - t) / steps * 1000, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", default="data/eval.jsonl")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    model, tok = tm.load(args.model)
    prompts = [json.loads(line)["prompt"] for line in open(args.examples)][: args.batch]
    enc = [F.encode_chat(tok, p) for p in prompts]
    P = F.shared_prefix_len(enc)
    prefix_kv = G.prefix_cache(model, enc[0][:P])
    best: dict[str, float] = {}
    outputs: dict[str, list] = {}
    for _ in range(args.reps):
        for name, (attn, mlp) in VARIANTS.items():
            for layer in model.layers:
                layer.self_attn.__class__, layer.mlp.__class__ = attn, mlp
            ms, outputs[name] = decode_ms(model, enc, prefix_kv, P, args.steps)
            best[name] = min(best.get(name, float("inf")), ms)
    x = mx.random.normal((1 << 20,))
    result = {
        "batch": args.batch, "steps": args.steps, "prompt_tokens": [min(map(len, enc)), max(map(len, enc))],
        "decode_ms_per_step": {k: round(v, 1) for k, v in best.items()},
        "speedup_grouped_vs_mlx_lm": round(best["mlx-lm attention"] / best["grouped decode"], 2),
        "speedup_cpu_ops_vs_grouped": round(best["grouped decode"] / best["cpu_ops layers"], 2),
        "same_tokens_as_mlx_lm": {k: outputs[k] == outputs["mlx-lm attention"] for k in VARIANTS},
        "ns_per_element_1M_fp32": {name: round(per_element_ns(mx, fn, x), 2) for name, fn in
                                   (("add", lambda a: a + 1.0), ("exp", mx.exp), ("sigmoid", mx.sigmoid))},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
