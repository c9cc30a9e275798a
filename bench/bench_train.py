"""SFT step time: tracer's loop vs stock mlx-lm LoRA training, same model, data, batch and LoRA.

    .venv/bin/tracer data                                    # realistic data/train.jsonl
    .venv/bin/python bench/bench_train.py --data data/train.jsonl

Variants, each in its own subprocess:
  (a) stock mlx-lm (``mlx_lm.tuner.trainer.train`` + ChatDataset(mask_prompt=True)), reference BLAS
      (``TRACER_NO_OPENBLAS=1``; the process never loads OpenBLAS, tracer.blas is not imported)
  (b) the same with ``tracer.blas.preload_openblas()`` called before mlx is imported
  (c) tracer's loop: ``tracer.train.train`` (completion-only logits, length-grouped batches, the
      batch's shared prompt prefix run once)
  (d) the same with ``share_prefix = false`` (every row runs its whole prompt)
  (e) (c) with ``compile = false``: no compiled step, mlx-lm's layers (what (c) was before 2026-12-02)
All: SmolLM2-135M-Instruct fp32, LoRA rank 16 (scale 20) on all 30 layers × 7 projections,
batch 16, AdamW lr 3e-4. Step times are wall-clock between consecutive steps, after warm-up.
MFU of (c)/(d): 6·N_nonemb·computed tokens + 6·hidden·vocab·loss_positions FLOPs per step over the step time,
relative to the fp32 1024² GEMM GFLOP/s measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gemm_gflops

MODEL_DIR = Path("~/.cache/tracer/models/smollm2-135m-instruct").expanduser()
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def read_pairs(path: str, limit: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(r["prompt"], r["ref"]["trace"]) for r in rows][:limit]


def flops_per_step(model, tokens: int, loss_positions: int) -> float:
    from mlx.utils import tree_flatten

    n = sum(v.size for k, v in tree_flatten(model.parameters()) if "lora" not in k)
    emb = model.model.embed_tokens.weight.size
    hidden = model.model.embed_tokens.weight.shape[1]
    vocab = model.model.embed_tokens.weight.shape[0]
    return 6 * (n - emb) * tokens + 2 * 3 * hidden * vocab * loss_positions


def stamp_steps(stamps: list[float], warmup: int) -> list[float]:
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return d[warmup:]


def worker_stock(args) -> dict:
    if args.openblas:
        from tracer.blas import blas_info, preload_openblas  # before mlx

        preload_openblas()
        blas = blas_info()
    else:
        blas = {"status": "reference (mlx-cpu wheel)", "openblas": None}
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer as T
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, load_tokenizer

    from tracer.format import SYSTEM_PROMPT  # pure Python, no mlx / blas

    assert ("tracer.blas" in sys.modules) == args.openblas
    gflops = gemm_gflops(mx)
    model, config = load_model(MODEL_DIR)
    model.set_dtype(mx.float32)
    tok = load_tokenizer(MODEL_DIR, eos_token_ids=config.get("eos_token_id"))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 16, "scale": 20.0, "dropout": 0.0, "keys": KEYS})
    pairs = read_pairs(args.data, args.limit)
    data = [{"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p},
                          {"role": "assistant", "content": c}]} for p, c in pairs]
    ds = CacheDataset(ChatDataset(data, tok._tokenizer if hasattr(tok, "_tokenizer") else tok, mask_prompt=True))

    batches: list[dict] = []

    def counting_batches(**kw):
        for batch, lengths in T.iterate_batches(**kw):
            ln = lengths.tolist()
            batches.append({"tokens": sum(l for _, l in ln), "padded": batch.size,
                            "loss_pos": sum(l - o for o, l in ln)})
            yield batch, lengths

    stamps: list[float] = []

    class CB(TrainingCallback):
        def on_train_loss_report(self, info):
            stamps.append(time.perf_counter())
            losses.append(info["train_loss"])

    losses: list[float] = []
    iters = args.warmup + args.steps
    opt = optim.AdamW(learning_rate=3e-4, weight_decay=0.0)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    targs = T.TrainingArgs(batch_size=16, iters=iters, steps_per_report=1, steps_per_eval=10**9,
                           steps_per_save=10**9, max_seq_length=512,
                           adapter_file=str(Path(tmp) / "adapters.safetensors"))
    stamps.append(time.perf_counter())
    T.train(model, opt, ds, None, args=targs, iterate_batches=counting_batches, training_callback=CB())
    # step i's batch is batches[i]; the generator is one batch ahead at most
    return _summary("stock", stamps, batches[:iters], losses, args.warmup, gflops, model, blas)


def worker_tracer(args) -> dict:
    from tracer import backend
    from tracer.blas import blas_info

    backend.setup()
    import mlx.core as mx

    from tracer import model as M
    from tracer import train as TR
    from tracer.config import LoraConfig, TrainConfig

    gflops = gemm_gflops(mx)
    model, tok = M.load("smollm2-135m-instruct")
    pairs = read_pairs(args.data, args.limit)
    cfg = TrainConfig(iters=args.warmup + args.steps, batch_size=16, val_every=0, save_every=10**6,
                      share_prefix=not args.no_share, compile=not args.no_compile)
    # replay the loop's batch sequence to count tokens / loss positions per step
    examples = TR.encode_pairs(tok, pairs, cfg.max_seq_len)
    lengths = [len(ids) for ids, _ in examples]
    batches = []
    for s in range(cfg.iters):
        idx = TR.batch_for_step(s, lengths, cfg.batch_size, cfg.seed, None, cfg.curriculum)
        ex = [examples[i] for i in idx]
        b = TR.collate(ex, cfg.share_prefix)  # unpadded: real tokens and loss positions
        shared = 0 if b.prefix is None else (len(ex) - 1) * b.prefix.shape[1]  # prefix rows not computed
        batches.append({"tokens": b.tokens, "computed": b.tokens - shared,
                        "padded": b.inputs.size + (0 if b.prefix is None else b.prefix.size),
                        "loss_pos": b.positions.size})

    stamps: list[float] = []
    losses: list[float] = []

    class P:
        def start(self, *a, **k): pass
        def stop(self): pass
        def log(self, m): pass

        def update(self, advance=1, **info):
            stamps.append(time.perf_counter())
            if "loss" in info:
                losses.append(info["loss"])

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    TR.train(model, tok, pairs, cfg, LoraConfig(), tmp, "smollm2-135m-instruct", progress=P())
    return _summary("tracer", stamps, batches, losses, args.warmup, gflops, model, blas_info())


def _summary(name, stamps, batches, losses, warmup, gflops, model, blas) -> dict:
    steps = stamp_steps(stamps, warmup)
    meas = batches[warmup: warmup + len(steps)]
    t = sum(steps)
    tok = sum(b["tokens"] for b in meas)
    lp = sum(b["loss_pos"] for b in meas)
    flops = sum(flops_per_step(model, b.get("computed", b["tokens"]), b["loss_pos"]) for b in meas)
    return {
        "name": name, "blas": blas, "gemm_gflops_1024": gflops,
        "step_times": steps, "s_per_step": t / max(len(steps), 1),
        "tokens_per_step": tok / max(len(meas), 1), "padded_per_step": sum(b["padded"] for b in meas) / max(len(meas), 1),
        "loss_pos_per_step": lp / max(len(meas), 1),
        "tok_s": tok / t if t else 0.0, "model_gflops": flops / t / 1e9 if t else 0.0,
        "mfu_pct": 100 * flops / t / 1e9 / gflops if t else 0.0,
        "warmup_times": [b - a for a, b in zip(stamps, stamps[1:])][:warmup], "losses": losses,
    }


def run_variant(kind: str, openblas: bool, steps: int, warmup: int, args, share: bool = True,
                compile_: bool = True) -> dict | None:
    env = dict(os.environ)
    if openblas:
        env.pop("TRACER_NO_OPENBLAS", None)
    else:
        env["TRACER_NO_OPENBLAS"] = "1"
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(steps), "--warmup", str(warmup),
           "--data", args.data, "--limit", str(args.limit)] + (["--openblas"] if openblas else []) \
        + ([] if share else ["--no-share"]) + ([] if compile_ else ["--no-compile"])
    print(f"running {kind} openblas={openblas} warmup={warmup} steps={steps} ...", file=sys.stderr, flush=True)
    try:
        res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {kind} openblas={openblas}: timed out after {args.timeout}s", file=sys.stderr)
        return None
    if res.returncode != 0:
        print(f"  {kind} openblas={openblas}: failed (rc {res.returncode})", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["stock", "tracer"], help=argparse.SUPPRESS)
    p.add_argument("--openblas", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-share", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--only", default="", help="comma-separated variant letters to run, e.g. c,e (default: all)")
    p.add_argument("--data", default="data/train.jsonl")
    p.add_argument("--limit", type=int, default=10**9, help="use the first N training pairs")
    p.add_argument("--steps", type=int, default=4, help="measured steps of (b) and (c)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ref-steps", type=int, default=1, help="measured steps of (a) (reference BLAS)")
    p.add_argument("--ref-warmup", type=int, default=0)
    p.add_argument("--skip-ref", action="store_true")
    p.add_argument("--timeout", type=int, default=300)
    args = p.parse_args()
    if args.worker:
        fn = worker_stock if args.worker == "stock" else worker_tracer
        print(json.dumps(fn(args)))
        return

    only = set(filter(None, args.only.split(",")))
    want = lambda letter: not only or letter in only  # noqa: E731
    res = {
        "a_stock_ref": None if args.skip_ref or not want("a") else run_variant("stock", False, args.ref_steps, args.ref_warmup, args),
        "b_stock_openblas": run_variant("stock", True, args.steps, args.warmup, args) if want("b") else None,
        "c_tracer": run_variant("tracer", True, args.steps, args.warmup, args) if want("c") else None,
        "d_tracer_no_share": run_variant("tracer", True, args.steps, args.warmup, args, share=False) if want("d") else None,
        "e_tracer_no_compile": run_variant("tracer", True, args.steps, args.warmup, args, compile_=False) if want("e") else None,
    }
    print(f"{'variant':24s}{'s/step':>9s}{'tok/s':>9s}{'tok/step':>10s}{'padded':>9s}{'loss pos':>9s}"
          f"{'GEMM GF/s':>10s}{'model GF/s':>11s}{'MFU%':>7s}")
    for k, r in res.items():
        if r is None:
            print(f"{k:24s}  (not run / failed)")
            continue
        print(f"{k:24s}{r['s_per_step']:9.2f}{r['tok_s']:9.1f}{r['tokens_per_step']:10.0f}{r['padded_per_step']:9.0f}"
              f"{r['loss_pos_per_step']:9.0f}{r['gemm_gflops_1024']:10.1f}{r['model_gflops']:11.1f}{r['mfu_pct']:7.1f}")
        print(f"{'':24s}step times {[round(x, 2) for x in r['step_times']]}, warm-up {[round(x, 2) for x in r['warmup_times']]}")
    c = res["c_tracer"]
    for k in ("a_stock_ref", "b_stock_openblas", "d_tracer_no_share", "e_tracer_no_compile"):
        r = res[k]
        if r and c:
            print(f"tracer speedup vs {k}: {r['s_per_step'] / c['s_per_step']:.2f}x per step, "
                  f"{c['tok_s'] / r['tok_s']:.2f}x tokens/s")
    if c:
        print(f"MFU (c): {c['mfu_pct']:.1f}% of the {c['gemm_gflops_1024']:.1f} GFLOP/s fp32 1024² GEMM "
              f"(6·N_nonemb·tok + 6·h·V·loss_pos = {c['model_gflops']:.1f} GFLOP/s)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
