"""glibc's default malloc vs ``tracer.heap.retain_freed_memory()``, side by side.

    .venv/bin/python bench/bench_malloc.py --data data/train.jsonl --facts data/facts_scratch/train.jsonl

MLX's CPU allocator mallocs and frees every array. By default glibc maps each block over its mmap
threshold (at most 32 MB) freshly and unmaps it on free, so large intermediates are page-faulted
and zeroed by the kernel on every use. Each variant runs in its own process, the first with
``TRACER_NO_MALLOPT=1`` (glibc's defaults), the second as tracer runs:
  1. ``x + 1`` and ``cpu_ops.exp`` over 16M float32 (compiled), ns per element;
  2. one attention layer, compiled forward + backward, at 130 and 330 positions (batch 16);
  3. the compiled SFT step over the first ``--batches`` batches of each data file, and greedy
     generation of ``--prompts`` eval prompts (``common.sft_steps_and_greedy``);
and reports its minor page faults and peak RSS. Losses and completions must match.
"""

from __future__ import annotations

import json
import resource

from common import ab_main, attention_times, per_element_ns, print_ab_rows, sft_steps_and_greedy

VARIANTS = {"default": {"TRACER_NO_MALLOPT": "1"}, "retained": {"TRACER_NO_MALLOPT": "0"}}


def worker(variant: str, data: list[str], n_batches: int, n_prompts: int) -> dict:
    from tracer.blas import preload_openblas
    from tracer.heap import heap_info, retain_freed_memory

    preload_openblas()
    retain_freed_memory()
    import mlx.core as mx

    from tracer import cpu_ops

    x = mx.random.normal((1 << 16, 256))
    res = {"heap": heap_info(),
           "add_ns": per_element_ns(mx, mx.compile(lambda x: x + 1), x),
           "exp_ns": per_element_ns(mx, mx.compile(cpu_ops.exp), x),
           "attention": attention_times(mx, cpu_ops)}
    res.update(sft_steps_and_greedy(data, n_batches, n_prompts))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    res["minflt"], res["maxrss_gb"] = usage.ru_minflt, usage.ru_maxrss / 2**20
    return res


def main() -> None:
    ran = ab_main(__doc__, VARIANTS, worker)
    if ran is None:
        return
    args, data, res = ran
    a, b = res["default"], res["retained"]
    assert b["heap"] == "retained", b["heap"]
    print("| task | glibc default | retained | speedup | same result |\n|---|---|---|---|---|")
    for key, what in (("add_ns", "x + 1"), ("exp_ns", "cpu_ops.exp")):
        print(f"| {what}, 16M float32, ns per element | {a[key]:.2f} | {b[key]:.2f} | **{a[key] / b[key]:.2f}x** | |")
    print_ab_rows(a, b, data, args.batches, args.prompts)
    print(f"| minor page faults, whole process | {a['minflt']:,} | {b['minflt']:,} | | |")
    print(f"| peak RSS | {a['maxrss_gb']:.2f} GB | {b['maxrss_gb']:.2f} GB | | |")
    for r in res.values():
        r.pop("completions")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
