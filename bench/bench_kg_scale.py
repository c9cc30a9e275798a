"""Question generation on 20,000-edge graphs: wall time, peak memory, and how the eval questions'
start entities spread over the graph.

    python bench/bench_kg_scale.py            # all graphs, default [data] settings
    python bench/bench_kg_scale.py --only sparse

Each graph runs in its own process so that its peak RSS is its own. Graphs (seeded, synthetic):
- dense-functional: 1,000 entities x 20 relations, every (entity, relation) one target;
- dense-m2m: 1,000 entities, 20,000 random edges over 20 relations (pairs with several targets);
- sparse-m2m: 5,000 entities, 20,000 random edges over 8 relations.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections import Counter

GRAPHS = {
    "dense-functional": (1000, 20, 20_000, True),
    "dense-m2m": (1000, 20, 20_000, False),
    "sparse-m2m": (5000, 8, 20_000, False),
}


def make_kg(n_ent: int, n_rel: int, n_edges: int, functional: bool, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ents = [f"E{i:05d}" for i in range(n_ent)]
    rels = [f"r{j:02d}" for j in range(n_rel)]
    edges: set[tuple[str, str, str]] = set()
    if functional:
        for s in ents:
            for r in rels:
                d = rng.choice(ents)
                while d == s:
                    d = rng.choice(ents)
                edges.add((s, r, d))
    while len(edges) < n_edges:
        s, d = rng.sample(ents, 2)
        edges.add((s, rng.choice(rels), d))
    return {
        "entities": [{"id": e, "label": e, "type": f"t{i % 5}"} for i, e in enumerate(ents)],
        "relations": [{"id": r, "label": r} for r in rels],
        "edges": [{"src": s, "rel": r, "dst": d} for s, r, d in sorted(edges)],
    }


def one(name: str) -> dict:
    from tracer import dataset
    from tracer.config import DataConfig
    from tracer.kg import kg_from_dict

    kg = kg_from_dict(make_kg(*GRAPHS[name]), name)
    cfg = DataConfig()
    t0 = time.perf_counter()
    splits = dataset.generate_splits(kg, cfg)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    starts = Counter(r["path_star"]["entities"][0] for r in splits["eval"])
    return {
        "graph": name, "entities": len(kg.entities), "edges": len(kg.edges), "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak),
        "train": len(splits["train"]), "rsft": len(splits["rsft"]), "eval": len(splits["eval"]),
        "eval_starts": len(starts), "eval_max_per_start": max(starts.values()),
        "sampled": dataset.enumerate_paths(kg, cfg.eval_hops) is None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(GRAPHS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child)))
        return
    print(f"{'graph':18} {'edges':>6} {'wall s':>7} {'peak MB':>8} {'train':>6} {'eval':>5} "
          f"{'starts':>6} {'max/start':>9} sampled")
    for name in [args.only] if args.only else list(GRAPHS):
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['graph']:18} {r['edges']:>6} {r['wall_s']:>7} {r['peak_rss_mb']:>8} {r['train']:>6} "
              f"{r['eval']:>5} {r['eval_starts']:>6} {r['eval_max_per_start']:>9} {r['sampled']}")


if __name__ == "__main__":
    main()
