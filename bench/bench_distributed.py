"""Data-parallel SFT on one machine: 1 process vs `mlx.launch -n 2 --backend ring`, side by side.

    python bench/bench_distributed.py                 # SmolLM2-135M (tracer model pull first), 6 steps x 16
    python bench/bench_distributed.py --steps 10 --batch 32

Both runs train the same LoRA steps on the same global batches of the shipped KG's training
questions (closed-book prompts); the report is seconds per step after the first (which compiles)
and the ratio. Each rank is a full process with its own BLAS threads, so on a machine with few
cores two ranks share them: expect no gain there. More ranks pay when each has cores (or a GPU) of
its own: several machines over the ring backend, or a many-core machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One rank's (or the single process's) training; rank 0 prints the step times as JSON."""
    from tracer import backend

    backend.setup()
    from tracer import dataset, distributed, train
    from tracer import model as models
    from tracer.config import Config, LoraConfig, TrainConfig
    from tracer.kg import load_kg
    from tracer.progress import NullProgress

    cfg = Config()
    rows = dataset.generate_splits(load_kg(cfg.data.kg), cfg.data)["train"]
    pairs = [(r["prompt"], r["ref"]["trace"]) for r in rows]
    times: list[float] = []

    class Clock(NullProgress):
        def update(self, advance=1, **info):
            times.append(time.perf_counter())

    model, tok = models.load(cfg.model.path, cfg.model.cache_dir)
    tcfg = TrainConfig(iters=args.steps, batch_size=args.batch, warmup=1, val_every=0, save_every=10_000)
    train.train(model, tok, pairs, tcfg, LoraConfig(), args.out, models.model_id(cfg.model.path), progress=Clock())
    rank, size = distributed.world()
    if rank == 0:
        steps = [b - a for a, b in zip(times[1:], times[2:])]  # times[0]: the start; times[1]: step 1 (compiles)
        print(json.dumps({"size": size, "s_per_step": sum(steps) / len(steps)}))


def run(argv: list[str]) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    launch = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    with tempfile.TemporaryDirectory() as tmp:
        me = [__file__, "--child", "--steps", str(args.steps), "--batch", str(args.batch)]
        one = run([sys.executable, *me, "--out", f"{tmp}/one"])
        two = run([launch, "-n", "2", "--backend", "ring", "--python", sys.executable, *me, "--out", f"{tmp}/two"])
    print(f"SFT step, global batch {args.batch}, {args.steps} steps (the first, compiling, not counted)")
    print(f"  1 process      : {one['s_per_step']:.2f} s/step")
    print(f"  2 ranks (ring) : {two['s_per_step']:.2f} s/step  ({one['s_per_step'] / two['s_per_step']:.2f}x)")


if __name__ == "__main__":
    main()
