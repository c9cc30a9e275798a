"""tracer.distributed: shards of a list and their results gathered back, in one process and
under `mlx.launch -n 2 --backend ring`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import distributed

SCRIPT = Path(__file__).resolve().parent / "scripts" / "dist_gather.py"
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")


def test_a_plain_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("MLX_WORLD_SIZE", raising=False)
    monkeypatch.delenv("MLX_RANK", raising=False)
    items = ["a", "b", "c"]
    assert distributed.world() == (0, 1)
    assert distributed.shard(items) == items
    assert distributed.gather(items) == [items]
    assert distributed.gather_shards(["A", "B", "C"]) == ["A", "B", "C"]
    assert distributed.rank_zero_first(lambda: 7) == 7


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_unshard_puts_every_rank_s_shard_back_in_order(monkeypatch, size):
    items = list(range(7))
    parts = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, size))
        parts.append(distributed.shard(items))
    assert sorted(x for p in parts for x in p) == items and all(len(p) <= -(-7 // size) for p in parts)
    assert distributed.unshard(parts) == items


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_two_ranks_gather_their_shards_in_order(tmp_path):
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run([LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, str(SCRIPT),
                          str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and (tmp_path / "result.json").is_file(), out.stdout + out.stderr
    result = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    ITEMS = result["items"]
    assert result["size"] == 2 and len(ITEMS) == 7
    assert [a["item"] for a in result["gathered"]] == ITEMS  # the list's order, not rank order
    assert [a["rank"] for a in result["gathered"]] == [i % 2 for i in range(len(ITEMS))]  # both ranks answered
    assert all(a["text"] == a["item"].upper() * (1 + a["rank"]) for a in result["gathered"])
    assert result["parts"] == [[0], [1, 1]]
    assert result["seen"] == [["written by rank 0"]] * 2  # rank 1 read it after rank 0 wrote it
