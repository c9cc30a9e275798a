"""Write data/demo_kg.json: the small synthetic graph `make demo` trains on.

Short names keep prompts short, so the demo runs in minutes on two CPU cores. The entities and
their types read like software troubleshooting, but the edges are drawn at random (seeded): the
demo shows the model following facts it is given, not knowledge about real systems.

    python data/make_demo_kg.py        # rewrites data/demo_kg.json (byte-identical for the seed)
"""

import json
import random
from pathlib import Path

SEED = 7
TYPES = {
    "symptom": "OOM Crash Hang Lag Leak Spike Drop Stall Panic Reset Timeout Flap Churn Deadlock "
               "Backlog Errors Thrash Freeze Outage Jitter".split(),
    "cause": "Bug Race Lock Loop Swap Cert DNS Disk Quota Load Cache Config Token Clock Port".split(),
    "fix": "Patch Restart Rollback Scale Evict Rotate Flush Bump Pin Drain Throttle Retune".split(),
    "tool": "top grep ping dig strace perf curl lsof dmesg iostat".split(),
}
# relation: (head type, tail type); every head gets exactly one tail per relation
RELATIONS = {
    "leads_to": ("symptom", "symptom"),
    "caused_by": ("symptom", "cause"),
    "checked_with": ("symptom", "tool"),
    "triggers": ("cause", "symptom"),
    "fixed_by": ("cause", "fix"),
    "needs": ("fix", "tool"),
    "related_to": ("cause", "cause"),
    "prevents": ("fix", "symptom"),
}


def build(seed: int = SEED) -> dict:
    rng = random.Random(seed)
    edges = []
    for rel, (head_type, tail_type) in RELATIONS.items():
        for head in TYPES[head_type]:
            tail = rng.choice([t for t in TYPES[tail_type] if t != head])
            edges.append({"src": head, "rel": rel, "dst": tail})
    entities = [{"id": e, "label": e, "type": t} for t, names in TYPES.items() for e in names]
    relations = [{"id": r, "label": r.replace("_", " ")} for r in RELATIONS]
    return {"version": "1.0", "domain": "software_troubleshooting", "entities": entities,
            "relations": relations, "edges": edges}


if __name__ == "__main__":
    out = Path(__file__).with_name("demo_kg.json")
    out.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {out}")
