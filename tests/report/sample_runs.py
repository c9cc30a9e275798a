"""Run directories for the report tests: two configs, phase metrics, episodes; rendering helpers."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console


CONFIG_A = """\
seed = 7

[model]
source = "tiny"

[sft]
iters = 200
lr = 1e-4

[rsft]
rounds = 1
"""

CONFIG_B = """\
seed = 7

[model]
source = "tiny"

[sft]
iters = 400
lr = 1e-4

[rsft]
rounds = 1
temperature = 0.8
"""


def phase_entry(n, correct, lo, hi, cov, reward, fmt, prec, shuf, wall, per_hop):
    return {"n": n, "accuracy": correct / n, "accuracy_ci": [lo, hi], "correct": correct,
            "path_coverage": cov, "reward": reward, "format_rate": fmt, "edge_precision": prec,
            "shuffle_agreement": shuf, "wall_s": wall, "finished_at": "2026-11-24T12:00:00+00:00",
            "per_hop": per_hop}


BASE = phase_entry(300, 75, 0.2041, 0.3009, 0.312, -0.874, 0.82, 0.611, None, 12.4, {
    "2": {"n": 150, "accuracy": 0.32, "path_coverage": 0.41, "reward": -0.5, "format_rate": 0.85, "edge_precision": 0.7},
    "4": {"n": 150, "accuracy": 0.18, "path_coverage": 0.214, "reward": -1.2, "format_rate": 0.79, "edge_precision": 0.52},
})
SFT = phase_entry(300, 183, 0.5538, 0.6636, 0.724, 0.452, 1.0, 0.934, 0.87, 81.2, {
    "2": {"n": 150, "accuracy": 0.7, "path_coverage": 0.8, "reward": 0.6, "format_rate": 1.0, "edge_precision": 0.95},
    "4": {"n": 150, "accuracy": 0.52, "path_coverage": 0.648, "reward": 0.3, "format_rate": 1.0, "edge_precision": 0.918,
          "length_match": 0.367},
})
SFT["hop_recall"] = {"1": {"n": 300, "recall": 0.98, "stopped": 0.0},
                    "2": {"n": 294, "recall": 0.9, "stopped": 0.05}}
SFT_B = phase_entry(300, 201, 0.6148, 0.7198, 0.698, 0.517, 0.99, 0.901, 0.9, 190.0, {
    "2": {"n": 150, "accuracy": 0.74, "path_coverage": 0.77, "reward": 0.7, "format_rate": 1.0, "edge_precision": 0.93},
    "4": {"n": 150, "accuracy": 0.6, "path_coverage": 0.626, "reward": 0.33, "format_rate": 0.98, "edge_precision": 0.87},
})


def episode(ex_id, hop, correct, answer, star, trace, trace_entities, path_entities, hallucinated, valid=True):
    completion = f"TRACE: {trace}\nANSWER: {answer}" if valid else f"TRACE: {trace}\nANSWER: maybe"
    return {"phase": "sft", "ex_id": ex_id, "split": "eval", "hop_len": hop, "prompt": "...",
            "completion": completion, "answer_star": star, "correct": correct,
            "parsed": {"valid_format": valid, "answer": answer if valid else None, "trace_text": trace,
                       "trace_entities": trace_entities, "path_entities": path_entities},
            "reward": {"correctness": 1.0 if correct else -1.0, "path_coverage": 0.5, "path_reward": 0.5,
                       "spam_penalty": 0.0, "total": 1.25 if correct else -0.75, "edge_precision": 1.0},
            "hallucinated_hops": hallucinated}


EPISODES = [
    episode("eval-00000", 2, True, "A", "A", "E0 -caused_by-> E1 -fixed_by-> E2",
            ["E0", "E1", "E2"], ["E0", "E1", "E2"], []),
    episode("eval-00001", 2, False, "B", "C", "E0 -caused_by-> E7 -fixed_by-> E2",
            ["E0", "E7", "E2"], ["E0", "E1", "E2"], [["E0", "E7"]]),
    episode("eval-00002", 4, True, "D", "D", "E3 -caused_by-> E4", ["E3", "E4"], ["E3", "E4", "E5", "E6", "E0"], []),
    episode("eval-00003", 4, False, None, "B", "E3 -caused_by-> E4 -b-> E10", ["E3", "E4", "E10"],
            ["E3", "E4", "E5", "E6", "E1"], [["E4", "E10"]], valid=False),
    episode("eval-00004", 2, False, "A", "D", "E1 -fixed_by-> E2", ["E1", "E2"], ["E1", "E2", "E3"], []),
]


def write_run(root: Path, name: str, config: str, entries: dict, planned=("base", "sft", "rsft"),
              contaminated=False, episodes=True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(config)
    meta = {"run_id": name, "created_at": "2026-11-24T11:00:00+00:00", "platform": "linux-x86_64",
            "versions": {"python": "3.11.7"}, "seed": 7, "phases": list(planned),
            "timings": {k: v["wall_s"] for k, v in entries.items() if "wall_s" in v}, "contaminated": contaminated}
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    (d / "metrics.json").write_text(json.dumps({"run_id": name, "contaminated": contaminated, "phases": entries}))
    if episodes:
        (d / "episodes").mkdir()
        (d / "episodes" / "sft.jsonl").write_text("\n".join(json.dumps(e) for e in EPISODES) + "\n")
    return d


def render(*renderables) -> str:
    console = Console(record=True, width=200, color_system="truecolor")
    for r in renderables:
        console.print(r)
    return console.export_text()


def render_styled(renderable) -> str:
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text(styles=True)
