"""tracer.workers: generation jobs spread over processes give the completions of one process."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from tracer import workers
from tracer.errors import TracerError

from tiny_model import build_tiny_model  # tests/tiny_model.py

PROMPTS = [f"Question: What fixes E{i}?\nA) E{i + 1}\nB) E{i + 2}\nC) E{i + 3}\nD) E{i + 4}" * (1 + i % 3)
           for i in range(12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model with large random weights, so completions depend on prompt and seed."""
    path = build_tiny_model(tmp_path_factory.mktemp("workers") / "m", PROMPTS)
    weights = mx.load(str(path / "model.safetensors"))
    mx.random.seed(5)
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: mx.ones(v.shape) if "norm" in k else mx.random.normal(v.shape) * 0.3
                         for k, v in tree_flatten(weights)})
    return path


class Count:
    def __init__(self):
        self.n = 0

    def start(self, description, total):
        pass

    def update(self, advance=1, **info):
        self.n += advance

    def stop(self):
        pass

    def log(self, message):
        pass


def test_jobs_on_two_workers_match_one_process(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "MIN_PROMPTS", 1)
    load = {"spec": str(model_dir), "cache_dir": str(tmp_path), "fuse": True}
    jobs = [{"prompts": PROMPTS[i : i + 4], "max_tokens": 16, "temperature": 0.9, "seed": 10 + i, "batch_size": 3}
            for i in range(0, 12, 4)]
    with workers.Pool(load, 1) as one:
        want = one.map(jobs)
        greedy = one.generate(PROMPTS, max_tokens=16, batch_size=4)
    finished, progress = [], Count()
    with workers.Pool(load, 2) as two:
        got = two.map(jobs, progress, on_done=lambda i, texts: finished.append(i))
        procs = list(two._procs)
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
        assert two.generate(PROMPTS, max_tokens=16, batch_size=4) == greedy  # same workers, sharded prompts
        assert two._procs == procs
    assert got == want
    assert len({t for texts in want for t in texts}) > 6  # the completions differ: the check can fail
    assert sorted(finished) == [0, 1, 2] and progress.n == 12
    assert all(not p.is_alive() for p in procs)  # closed with the pool


def test_one_job_or_few_prompts_stay_in_this_process(model_dir, tmp_path):
    pool = workers.Pool({"spec": str(model_dir), "cache_dir": str(tmp_path), "fuse": True}, 2)
    assert pool.workers_for(prompts=20, jobs=3) == 1  # under MIN_PROMPTS: not worth a process
    assert pool.workers_for(prompts=200, jobs=1) == 1
    assert pool.workers_for(prompts=200, jobs=5) == 2
    pool.map([{"prompts": PROMPTS[:2], "max_tokens": 4}])
    assert pool._procs == [] and pool._local is not None


def test_a_worker_that_cannot_load_the_model_is_a_clean_error(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "MIN_PROMPTS", 1)
    load = {"spec": str(model_dir), "cache_dir": str(tmp_path), "adapter": str(tmp_path / "missing"), "fuse": True}
    with workers.Pool(load, 2) as pool, pytest.raises(TracerError, match="missing"):
        pool.map([{"prompts": PROMPTS[:2], "max_tokens": 4}, {"prompts": PROMPTS[2:4], "max_tokens": 4}])
    assert pool._procs == []


def _jobs(n: int = 2, max_tokens: int = 24) -> list[dict]:
    return [{"prompts": PROMPTS[i * 4 : i * 4 + 4], "max_tokens": max_tokens, "temperature": 0.9, "seed": i,
             "batch_size": 2} for i in range(n)]


def test_a_failing_call_stops_its_workers_and_the_pool_still_works(model_dir, tmp_path, monkeypatch):
    """An exception in the caller's callback, a Ctrl-C while waiting, or a worker killed mid-job:
    every worker is gone at once (no queued job leaks into the next call), and a later call
    starts fresh ones and gets the right completions."""
    import os
    import signal
    import time

    monkeypatch.setattr(workers, "MIN_PROMPTS", 1)
    load = {"spec": str(model_dir), "cache_dir": str(tmp_path), "fuse": True}
    with workers.Pool(load, 1) as one:
        want = one.map(_jobs())
    with workers.Pool(load, 2) as pool:
        def boom(i, texts):
            raise ValueError("callback failed")

        with pytest.raises(ValueError, match="callback failed"):
            pool.map(_jobs(4), on_done=boom)
        assert pool._procs == []

        class Interrupt(Count):
            def update(self, advance=1, **info):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pool.map(_jobs(4, max_tokens=200), Interrupt())
        assert pool._procs == []

        class KillOne(Count):
            def update(self, advance=1, **info):
                if self.n == 0:
                    os.kill(pool._procs[0].pid, signal.SIGKILL)
                self.n += 1

        t = time.monotonic()
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            pool.map(_jobs(4, max_tokens=400), KillOne())
        assert pool._procs == [] and time.monotonic() - t < 20
        assert pool.map(_jobs()) == want and pool.used == 2


def test_shards_cover_every_prompt_once_with_balanced_lengths():
    lengths = [5, 90, 7, 60, 60, 3, 88, 12, 41]
    parts = workers.shards(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(9)) and all(p == sorted(p) for p in parts)
    totals = [sum(lengths[i] for i in p) for p in parts]
    assert abs(totals[0] - totals[1]) <= max(lengths)
    assert workers.shards(lengths, 1) == [list(range(9))] and workers.shards([], 2) == []
    assert len(workers.shards([1, 2], 4)) == 2


def test_each_rank_under_mlx_launch_generates_in_its_own_process(monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    assert workers.auto_workers(2) == 2
    monkeypatch.setenv("MLX_RANK", "1")  # what mlx.launch sets: the ranks are the processes
    assert workers.auto_workers(2) == 1 and workers.auto_workers(0) == 1
