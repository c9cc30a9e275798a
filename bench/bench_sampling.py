"""RSFT sampling and greedy eval: this checkout's generation vs an earlier revision's, one run.

    .venv/bin/python bench/bench_sampling.py --adapter data/runs/cpu_consolidate/models/consolidate

The old side is ``src/tracer/generate.py`` as of ``--old-rev`` (``git show``) on the adapter
loaded unmerged (merged too with ``--old-fused``); the new side is this checkout's ``tracer.generate`` on the adapter merged into
the weights (``tracer.model.load(fuse=True)``, what the pipeline does). Same questions, seeds,
batch size and stop rules; both sides run ``--reps`` times, interleaved, and the fastest run counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tracer import backend
from tracer.blas import blas_info

backend.setup()

from tracer import generate as new_generate  # noqa: E402
from tracer import model as tm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def old_generate(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:src/tracer/generate.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="tracer-bench-")) / "old_generate.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--pool", default="data/rsft.jsonl", help="questions (JSONL with 'prompt')")
    ap.add_argument("-n", type=int, default=32, help="questions")
    ap.add_argument("-k", type=int, default=4, help="samples per question")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--old-rev", default="b690824", help="git revision of the old generate.py")
    ap.add_argument("--old-fused", action="store_true", help="merge the adapter on the old side too")
    ap.add_argument("--reps", type=int, default=2, help="runs per side and task; the fastest counts")
    ap.add_argument("--tasks", default="sample,greedy", help="comma-separated: sample, greedy")
    args = ap.parse_args()

    rows = [json.loads(line) for line in open(args.pool)][: args.n]
    prompts = [r["prompt"] for r in rows]
    old = old_generate(args.old_rev)
    new_model, tok = tm.load(args.model, adapter=args.adapter, fuse=True)
    # a model of its own: generation switches a model's layers to its fast ones, and the old side's may differ
    old_model = tm.load(args.model, adapter=args.adapter, fuse=args.old_fused)[0]
    sides = {"old": (old, old_model), "new": (new_generate, new_model)}
    kw = dict(max_tokens=args.max_tokens, batch_size=args.batch_size)

    result = {"blas": blas_info()["openblas"], "old_rev": args.old_rev, "old_fused": args.old_fused,
              "n": args.n, "k": args.k, **kw}
    outputs: dict = {}
    for task in args.tasks.split(","):
        best: dict = {}
        for _ in range(args.reps):
            for name, (G, model) in sides.items():
                if task == "sample":
                    out, wall = timed(lambda: G.sample_k(model, tok, prompts, args.k, seed=0,
                                                         temperature=args.temperature, **kw))
                    flat = [s for group in out for s in group]
                else:
                    out, wall = timed(lambda: G.generate(model, tok, prompts, **kw))
                    flat = out
                ntok = sum(len(tok.encode(s, add_special_tokens=False)) for s in flat)
                if wall < best.get(name, {}).get("wall_s", float("inf")):
                    best[name] = {"wall_s": round(wall, 2), "tokens": ntok, "tok_s": round(ntok / wall, 1)}
                outputs[(task, name)] = flat
                print(f"{task} {name}: {wall:.1f} s, {ntok} tokens", file=sys.stderr, flush=True)
        same = sum(a == b for a, b in zip(outputs[(task, "old")], outputs[(task, "new")]))
        result[task] = {**best, "speedup": round(best["old"]["wall_s"] / best["new"]["wall_s"], 2),
                        "identical_outputs": f"{same}/{len(outputs[(task, 'old')])}"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
