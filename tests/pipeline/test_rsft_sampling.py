"""RSFT sampling in stages (rsft.first_samples): a scripted generation pool stands in for the model,
so which question wins at which sample is known in advance."""

import json
from contextlib import contextmanager

import pytest

from tracer.config import config_from_dict, load_config
from tracer.pipeline import rsft
from tracer.pipeline.workspace import Workspace


def _script(questions: dict[str, dict], solves: dict[str, set[int]], calls: list[dict]):
    """A generation_pool whose completions are the gold trace where ``solves[qid]`` holds the
    sample's seed-stage (0 = first stage, 1 = second), a wrong answer elsewhere."""
    by_prompt = {q["prompt"]: q for q in questions.values()}

    class Pool:
        def map(self, jobs, progress=None, on_done=None):
            out = []
            for j, job in enumerate(jobs):
                calls.append({"seed": job["seed"], "prompts": len(job["prompts"])})
                stage = int(job["seed"] >= 1_000_000)
                done = []
                for p in job["prompts"]:
                    q = by_prompt[p]
                    wrong = next(k for k in "ABCD" if k != q["answer_star"])
                    done.append(q["ref"]["trace"] if stage in solves[q["id"]]
                                else q["ref"]["trace"].rsplit("\n", 1)[0] + f"\nANSWER: {wrong}")
                if on_done:
                    on_done(j, done)
                out.append(done)
            return out

    @contextmanager
    def pool(*args, **kwargs):
        yield Pool()

    return pool


@pytest.fixture
def pool_questions(tiny_work):
    ws = Workspace.open(load_config(tiny_work / "tiny.toml"))
    ws.ensure_data()
    return ws.cfg, ws.load_split("rsft")[:6]


def _sample(cfg, questions, r, partial, pool, *, reuse):
    """rsft.sample_round of round ``r`` in a workspace of ``cfg`` whose generation pool is ``pool``."""
    ws = Workspace.open(cfg)
    ws.generation_pool = pool
    return rsft.sample_round(ws, adapter="adapter", questions=questions, round_index=r, partial=partial, reuse=reuse)


def _cfg(cfg, **rsft):
    data = json.loads(cfg.model_dump_json())
    data["rsft"].update(rsft)
    return config_from_dict(data)


def test_first_samples_resample_only_questions_without_a_winner(pool_questions, tmp_path, monkeypatch):
    cfg, questions = pool_questions
    ids = [q["id"] for q in questions]
    # q0-q2 win at once; q3 only in the second stage; q4, q5 never
    solves = {i: ({0, 1} if n < 3 else {1} if n == 3 else set()) for n, i in enumerate(ids)}
    calls: list[dict] = []
    pool = _script({q["id"]: q for q in questions}, solves, calls)
    monkeypatch.setattr(rsft, "SAMPLE_CHUNK", 4)
    staged = _cfg(cfg, k_samples=4, first_samples=1, min_reward=1.5)
    scored, reused = _sample(staged, questions, 2, tmp_path / "partial.jsonl", pool, reuse=False)
    assert not reused
    # per question in pool order, by sample index
    assert [(s["ex_id"], s["sample"]) for s in scored] == [
        (i, k) for n, i in enumerate(ids) for k in ([0] if n < 3 else [0, 1, 2, 3])]
    # stage 1: 6 questions x 1 in chunks of 4; stage 2: the 3 without a winner x 3, one chunk
    assert calls == [{"seed": cfg.rsft.seed + 2, "prompts": 4}, {"seed": cfg.rsft.seed + 2 + 1000, "prompts": 2},
                     {"seed": cfg.rsft.seed + 2 + 1_000_000, "prompts": 9}]
    winners = rsft.select_winners(scored, 1, 1.5)
    assert sorted(w["ex_id"] for w in winners) == sorted(ids[:4])
    assert [w["sample"] for w in winners if w["ex_id"] == ids[3]] == [1]  # the first second-stage sample

    # all at once (first_samples = 0): every question K samples, in one stage, as before
    calls.clear()
    scored, _ = _sample(_cfg(cfg, k_samples=4, min_reward=1.5), questions, 2, tmp_path / "all.jsonl", pool, reuse=False)
    assert [(s["ex_id"], s["sample"]) for s in scored] == [(i, k) for i in ids for k in range(4)]
    assert calls == [{"seed": cfg.rsft.seed + 2, "prompts": 16}, {"seed": cfg.rsft.seed + 2 + 1000, "prompts": 8}]


def test_a_round_killed_in_its_second_stage_resumes_with_the_same_samples(pool_questions, tmp_path, monkeypatch):
    cfg, questions = pool_questions
    ids = [q["id"] for q in questions]
    solves = {i: ({0} if n % 2 else {1}) for n, i in enumerate(ids)}
    monkeypatch.setattr(rsft, "SAMPLE_CHUNK", 2)
    staged = _cfg(cfg, k_samples=3, first_samples=1, min_reward=1.5)
    calls: list[dict] = []
    pool = _script({q["id"]: q for q in questions}, solves, calls)
    want, _ = _sample(staged, questions, 1, tmp_path / "full.jsonl", pool, reuse=False)

    class Killed(Exception):
        pass

    real_script = _script({q["id"]: q for q in questions}, solves, calls)

    def dies_at(seed: int):
        @contextmanager
        def pool_that_dies(*args, **kwargs):
            with real_script() as pool:
                class Pool:
                    def map(self, jobs, progress=None, on_done=None):
                        for j, job in enumerate(jobs):
                            if job["seed"] == seed:
                                raise Killed
                            pool.map([job], progress, lambda _, done: on_done(j, done))
                yield Pool()
        return pool_that_dies

    # killed in the first stage (its third chunk): the second stage has not started
    partial = tmp_path / "partial.jsonl"
    pool = dies_at(cfg.rsft.seed + 1 + 2000)
    with pytest.raises(Killed):
        _sample(staged, questions, 1, partial, pool, reuse=False)
    assert len(partial.read_text().splitlines()) == 4
    calls.clear()
    pool = real_script
    got, reused = _sample(staged, questions, 1, partial, pool, reuse=True)
    assert got == want and not reused
    assert [c["seed"] for c in calls] == [cfg.rsft.seed + 1 + 2000, cfg.rsft.seed + 1 + 1_000_000,
                                          cfg.rsft.seed + 1 + 1_000_000 + 1000]
    # killed in the second stage (its second chunk)
    partial.unlink()
    pool = dies_at(cfg.rsft.seed + 1 + 1_000_000 + 1000)
    with pytest.raises(Killed):
        _sample(staged, questions, 1, partial, pool, reuse=False)
    # stage 1 (6 x 1) and the second stage's first chunk (2 questions x 2) are on disk
    assert len(partial.read_text().splitlines()) == 6 + 4
    calls.clear()
    pool = real_script
    got, reused = _sample(staged, questions, 1, partial, pool, reuse=True)
    assert not reused and calls == [{"seed": cfg.rsft.seed + 1 + 1_000_000 + 1000, "prompts": 2}]
    assert got == want
    calls.clear()
    again, reused = _sample(staged, questions, 1, partial, pool, reuse=True)
    assert reused and calls == [] and again == want
    # a row past k_samples (a partial file drawn under a larger K): the chunks of its question, in
    # both stages, are drawn again
    with partial.open("a") as f:
        f.write(json.dumps(dict(want[0], sample=3)) + "\n")
    calls.clear()
    got, reused = _sample(staged, questions, 1, partial, pool, reuse=True)
    assert not reused and got == want and [c["seed"] for c in calls] == [cfg.rsft.seed + 1, cfg.rsft.seed + 1_000_001]
    # ... once: the stale row is gone from the file, so the next resume reuses everything
    assert all(json.loads(line)["sample"] < 3 for line in partial.read_text().splitlines())
    calls.clear()
    again, reused = _sample(staged, questions, 1, partial, pool, reuse=True)
    assert reused and calls == [] and again == want


def test_first_samples_must_be_below_k_samples(tiny_work):
    cfg = load_config(tiny_work / "tiny.toml")
    with pytest.raises(Exception, match="first_samples: must be below k_samples"):
        _cfg(cfg, k_samples=4, first_samples=4)
    assert _cfg(cfg, k_samples=4, first_samples=0).rsft.first_samples == 0
