"""Run by tests/test_distributed_helpers.py under `mlx.launch -n 2`: each rank answers its shard of
a list and the answers are gathered back; rank 0 writes what it got. Usage: dist_gather.py OUT_DIR."""

import json
import sys
from pathlib import Path

from tracer import backend

backend.setup()

from tracer import distributed  # noqa: E402

ITEMS = [f"q{i}" + "é" * (i % 4) for i in range(7)]  # more than one byte per character, uneven lengths


def main(out: str) -> None:
    rank, size = distributed.world()
    answers = [{"item": item, "rank": rank, "text": item.upper() * (1 + rank)} for item in distributed.shard(ITEMS)]
    gathered = distributed.gather_shards(answers)
    parts = distributed.gather([rank] * (rank + 1))
    marker = Path(out) / "marker.txt"

    def write_then_read() -> str:
        if rank == 0:
            marker.write_text("written by rank 0")
        return marker.read_text()  # the others read it only once rank 0 has written it

    seen = distributed.gather([distributed.rank_zero_first(write_then_read)])
    if rank == 0:
        result = {"items": ITEMS, "size": size, "gathered": gathered, "parts": parts, "seen": seen}
        (Path(out) / "result.json").write_text(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
