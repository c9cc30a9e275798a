"""Throughput: mlx_lm single-stream greedy vs tracer.generate batched greedy, same prompts.

    PYTHONPATH=src python bench/bench_generate.py                      # tiny model, built on the fly
    PYTHONPATH=src python bench/bench_generate.py --shape smollm2      # random SmolLM2-135M-shaped
    PYTHONPATH=src python bench/bench_generate.py --model ~/.cache/tracer/models/smollm2-135m-instruct
    .venv/bin/python bench/bench_generate.py --model smollm2-135m-instruct --adapter data/runs/default/models/sft \
        --sample 4 --prompts data/default/rsft.jsonl -n 64 --single-n 4

Both paths generate until eos or ``--max-tokens`` (no ANSWER stop), so tokens/s compare like
for like; reported rates include prefill.

``--sample K``: RSFT's sampling instead (K completions per prompt, ``--temperature``, ``--top-p``):
``mlx_lm.stream_generate`` with mlx-lm's sampler, one completion at a time, against tracer three
ways: in this process with the sampler of 6528212 (top-p by sorting the whole vocabulary), in this
process with this checkout's, and as ``tracer rsft`` samples, jobs of ``--job-size`` prompts x K on
a ``tracer.workers.Pool`` (``--workers`` processes, their start-up and model loading inside the
timing). Tokens are counted the same way everywhere: each completion's text encoded again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tracer import backend
from tracer.blas import blas_info

backend.setup()

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tracer import format as F  # noqa: E402
from tracer import generate as G  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_model import build_tiny_model  # noqa: E402  (the tests' tiny model builder)

ENTS = ["DiskFull", "LogRotation", "CronJob", "OOMKill", "MemoryLimit", "CacheEviction",
        "TLSHandshake", "CertExpiry", "DNSTimeout", "ResolverConfig", "PoolExhausted", "ConnLeak"]
RELS = ["caused_by", "fixed_by", "depends_on", "mitigated_by", "symptom_of"]

SMOLLM2 = dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536)


def make_prompts(n: int) -> list[str]:
    """Realistic eval-style user prompts (~130-180 tokens with the chat template)."""
    from tracer.format import build_prompt

    out = []
    for i in range(n):
        e = [ENTS[(i + j * 5) % len(ENTS)] for j in range(6)]
        facts = [f"{e[j]} -{RELS[(i + j) % len(RELS)]}-> {e[j + 1]}" for j in range(3 + i % 3)]
        q = (f"Starting from {e[0]}, follow {RELS[i % 5]} then {RELS[(i + 1) % 5]}"
             f"{' then ' + RELS[(i + 2) % 5] if i % 2 else ''}. Which entity do you reach?")
        options = {k: e[2 + j] for j, k in enumerate("ABCD")}
        out.append(build_prompt(q, options, facts))
    return out


def build_model(shape: str) -> Path:
    texts = make_prompts(64) + ["TRACE: DiskFull -caused_by-> LogRotation\nANSWER: C"] * 8
    tmp = Path(tempfile.mkdtemp(prefix="tracer-bench-"))
    if shape == "smollm2":
        return smollm2_shaped(build_tiny_model(tmp / "m", texts, vocab_size=2048, **SMOLLM2))
    return build_tiny_model(tmp / "m", texts)


def smollm2_shaped(path: Path, vocab: int = 49152) -> Path:
    """Widen a built model's embedding / lm head to SmolLM2's vocabulary (random weights)."""
    from mlx_lm.models import llama

    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = vocab
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def load(path: str, adapter: str | None = None):
    """A model directory or tracer model name (``smollm2-135m-instruct``), an adapter merged into
    the weights as tracer generates."""
    from tracer.model import load as tracer_load

    model, tok = tracer_load(path, adapter=adapter, fuse=adapter is not None)
    if any(v.dtype != mx.float32 for _, v in tree_flatten(model.parameters())):
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model, tok


def bench_mlx_lm(model, tok, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    from mlx_lm import stream_generate

    n_tok, t0 = 0, time.perf_counter()
    for p in prompts:
        last = None
        for last in stream_generate(model, tok, F.encode_chat(tok, p), max_tokens=max_tokens):
            pass
        n_tok += last.generation_tokens if last is not None else 0
    return n_tok, time.perf_counter() - t0


def bench_tracer(model, tok, prompts: list[str], max_tokens: int, batch_size: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    toks = G.generate_tokens(model, tok, prompts, max_tokens=max_tokens, batch_size=batch_size,
                             stop_after_answer=False)
    return sum(len(t) + 1 for t in toks if len(t) < max_tokens) + sum(
        len(t) for t in toks if len(t) >= max_tokens), time.perf_counter() - t0


def count_tokens(tok, texts: list[str]) -> int:
    """Tokens of completions, counted alike on every side: each text encoded again."""
    return sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)


def bench_mlx_lm_sampled(model, tok, prompts: list[str], k: int, max_tokens: int, temperature: float,
                         top_p: float) -> tuple[int, float]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(0)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    texts, t0 = [], time.perf_counter()
    for p in prompts:
        for _ in range(k):
            texts.append("".join(r.text for r in stream_generate(model, tok, F.encode_chat(tok, p),
                                                                 max_tokens=max_tokens, sampler=sampler)))
    wall = time.perf_counter() - t0
    return count_tokens(tok, texts), wall


def full_vocab_sampler(temperature: float, top_p: float, key):
    """The sampler of 6528212: top-p over the whole vocabulary (sorted), ``mx.logsumexp``."""
    from tracer.sampling import apply_top_p

    state = {"key": key}

    def sample(logits):
        state["key"], sub = mx.random.split(state["key"])
        scaled = logits.astype(mx.float32) / temperature
        if top_p < 1.0:
            scaled = apply_top_p(scaled - mx.logsumexp(scaled, axis=-1, keepdims=True), top_p)
        return mx.random.categorical(scaled, axis=-1, key=sub)

    return sample


def bench_tracer_sampled_here(model, tok, prompts: list[str], k: int, max_tokens: int, temperature: float,
                              top_p: float, batch_size: int, old_sampler: bool) -> tuple[int, float]:
    """Sampled in this process (``tracer.generate``), with this checkout's sampler or the old one."""
    kept = G.make_sampler
    if old_sampler:
        G.make_sampler = full_vocab_sampler
    try:
        t0 = time.perf_counter()
        texts = G.generate(model, tok, [p for p in prompts for _ in range(k)], max_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, seed=0, batch_size=batch_size,
                           stop_after_answer=False)
        wall = time.perf_counter() - t0
    finally:
        G.make_sampler = kept
    return count_tokens(tok, texts), wall


def bench_tracer_sampled(path: str, tok, prompts: list[str], k: int, max_tokens: int, temperature: float,
                         top_p: float, batch_size: int, workers: int, job_size: int,
                         adapter: str | None = None) -> tuple[int, float, int]:
    """Sampled as ``tracer rsft`` does: jobs of ``job_size`` prompts x k on a worker pool. Returns
    tokens, wall seconds and the processes that ran them."""
    from tracer import workers as W

    jobs = [{"prompts": [p for p in prompts[i : i + job_size] for _ in range(k)], "max_tokens": max_tokens,
             "temperature": temperature, "top_p": top_p, "seed": i, "batch_size": batch_size,
             "stop_after_answer": False}
            for i in range(0, len(prompts), job_size)]
    t0 = time.perf_counter()
    with W.Pool({"spec": path, "adapter": adapter, "fuse": True}, W.auto_workers(workers)) as pool:
        texts = [t for job in pool.map(jobs) for t in job]
        used = pool.used
    wall = time.perf_counter() - t0
    return count_tokens(tok, texts), wall, used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_pos", nargs="?", help="model directory (same as --model)")
    ap.add_argument("--model", help="model directory or tracer model name (e.g. smollm2-135m-instruct)")
    ap.add_argument("--adapter", help="LoRA adapter directory, merged into the model on every side")
    ap.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny",
                    help="random model to build when no --model is given")
    ap.add_argument("-n", type=int, default=32, help="prompts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--single-n", type=int, default=None,
                    help="prompts for the single-stream run (default: all)")
    ap.add_argument("--prompts", help="JSONL with a 'prompt' per row (default: built eval-style prompts)")
    ap.add_argument("--sample", type=int, default=0, metavar="K",
                    help="sample K completions per prompt, as RSFT does (default: greedy, one each)")
    ap.add_argument("--temperature", type=float, default=0.8, help="with --sample")
    ap.add_argument("--top-p", type=float, default=0.95, help="with --sample")
    ap.add_argument("--workers", type=int, default=0, help="with --sample: worker processes (0: tracer's choice)")
    ap.add_argument("--job-size", type=int, default=32,
                    help="with --sample: prompts per pool job (tracer rsft: 64; a worker needs a job of its own)")
    args = ap.parse_args()

    path = args.model or args.model_pos or str(build_model(args.shape))
    path = str(Path(path).expanduser())
    model, tok = load(path, args.adapter)
    prompts = ([json.loads(line)["prompt"] for line in open(args.prompts)][: args.n] if args.prompts
               else make_prompts(args.n))
    lens = [len(F.encode_chat(tok, p)) for p in prompts]
    G.generate(model, tok, prompts[:2], max_tokens=4)  # warm-up

    single = prompts[: args.single_n] if args.single_n else prompts
    k, extra = max(1, args.sample), {}
    if args.sample:
        sampling = (args.max_tokens, args.temperature, args.top_p)
        s_tok, s_wall = bench_mlx_lm_sampled(model, tok, single, k, *sampling)
        here = {}
        for name, old in [("tracer_one_process_old_sampler", True), ("tracer_one_process", False)]:
            n_tok, wall = bench_tracer_sampled_here(model, tok, prompts, k, *sampling, args.batch_size, old)
            here[name] = {"tokens": n_tok, "wall_s": round(wall, 2), "tok_s": round(n_tok / wall, 1),
                          "ratio": round(n_tok / wall / (s_tok / s_wall), 2)}
        b_tok, b_wall, used = bench_tracer_sampled(path, tok, prompts, k, *sampling, args.batch_size, args.workers,
                                                   args.job_size, args.adapter)
        extra = {"k": k, "temperature": args.temperature, "top_p": args.top_p, "processes": used, **here}
    else:
        s_tok, s_wall = bench_mlx_lm(model, tok, single, args.max_tokens)
        b_tok, b_wall = bench_tracer(model, tok, prompts, args.max_tokens, args.batch_size)
    s_rate, b_rate = s_tok / s_wall, b_tok / b_wall
    print(json.dumps({
        "model": path, "adapter": args.adapter, "blas": blas_info()["openblas"], "n": args.n,
        "prompt_tokens": {"min": min(lens), "mean": round(sum(lens) / len(lens), 1), "max": max(lens)},
        "max_tokens": args.max_tokens, "batch_size": args.batch_size, **extra,
        "mlx_lm_single": {"completions": len(single) * k, "tokens": s_tok, "wall_s": round(s_wall, 2),
                          "tok_s": round(s_rate, 1)},
        "tracer_pool" if args.sample else "tracer_batched": {
            "completions": len(prompts) * k, "tokens": b_tok, "wall_s": round(b_wall, 2), "tok_s": round(b_rate, 1)},
        "ratio": round(b_rate / s_rate, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
