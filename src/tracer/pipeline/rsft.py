"""Rejection-sampling fine-tuning (RSFT): each round samples completions of the pool questions from
the latest adapter, keeps the KG-rewarded winners and fine-tunes on them (plus replayed SFT rows).

A round's samples are drawn in chunks, each appended to a partial file as it finishes, so an
interrupted round resumes where it stopped; with ``resume``, rounds already finished in the run
directory are skipped, and the run ends as an uninterrupted one would.

Under ``mlx.launch`` the ranks sample the chunks one each at a time and every rank gets every
chunk's samples (the same ones one process draws); rank 0 alone writes, and training runs
data-parallel as ``tracer sft`` does.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracer import dataset, distributed, runs
from tracer.config import load_config, to_toml
from tracer.errors import TracerError
from tracer.format import answer_span, with_answer
from tracer.pipeline.data import guard_leakage
from tracer.pipeline.evaluate import check_recording, evaluate, score_rows
from tracer.pipeline.finetune import copy_adapter, mark_contaminated, rl_start, train_adapter
from tracer.pipeline.workspace import Workspace
from tracer.progress import OneBar

SAMPLE_CHUNK = 64  # questions per sampling call: what an interrupted round resumes from


def rsft_phase_name(round_index: int) -> str:
    return "rsft" if round_index == 1 else f"rsft_r{round_index}"


def select_winners(scored: list[dict], keep_top: int, min_reward: float, require_correct: bool = True) -> list[dict]:
    """Per question, the best ``keep_top`` distinct samples with reward >= ``min_reward`` (and correct).

    Ties in reward go to the sample whose hops are more often real KG edges (a detour through a
    non-edge names every gold entity too), then to the earlier sample.
    """
    by_question: dict[str, list[dict]] = {}
    for s in scored:
        by_question.setdefault(s["ex_id"], []).append(s)
    winners = []
    for ex_id in sorted(by_question):
        ok = [s for s in by_question[ex_id]
              if (s["correct"] or not require_correct) and s["parsed"]["valid_format"]
              and s["reward"]["total"] >= min_reward]
        ok.sort(key=lambda s: (-s["reward"]["total"], -s["reward"]["edge_precision"], s["sample"]))
        seen: set[str] = set()
        for s in ok:
            if s["completion"] not in seen and len(seen) < keep_top:
                seen.add(s["completion"])
                winners.append(s)
    return winners


def round_questions(pool: list[dict], n: int, r: int, rotate: bool) -> list[dict]:
    """The pool questions round ``r`` (1-based) samples: all of them when ``n`` is 0 or covers the
    pool; else the first ``n``, or with ``rotate`` the ``n`` after those of round r - 1 (wrapping).
    """
    if not n or n >= len(pool):
        return pool
    if not rotate:
        return pool[:n]
    start = (r - 1) * n % len(pool)
    return (pool[start:] + pool[:start])[:n]


def winner_rows(winners: list[dict], by_id: dict[str, dict]) -> list[dict]:
    """Training rows from winning samples: the question's row with the winner as its reference trace.

    A correct winner gets the row's answer letter, written as the row writes it (and as the tag of a
    trace with one tag, so a tag that disagreed with the answer is not learned): this carries a winner
    sampled under another prompt of the same question (closed-book winners reused for facts
    prompts, whose options are drawn anew) over to the row's options.
    """
    rows = []
    for w in winners:
        row = by_id.get(w["ex_id"])
        if row is None:
            raise TracerError(f"sample {w['ex_id']}: question is not in the RSFT pool")
        drawn_on = (w.get("parsed") or {}).get("path_entities")
        if drawn_on is not None and drawn_on != row["path_star"]["entities"]:
            raise TracerError(f"sample {w['ex_id']}: drawn on another path than the pool's question {w['ex_id']} "
                              "(sampled from another RSFT pool? consolidate --pool names it)")
        trace = answer_span(w["completion"])
        if w["prompt"] != row["prompt"] and not w["correct"]:
            raise TracerError(f"sample {w['ex_id']}: drawn under another prompt and not correct; "
                              "its answer letter cannot be carried over")
        if w["correct"]:  # the row's letter, and a trace's one tag agrees with it
            trace = with_answer(trace, row["answer_star"])
        rows.append(dict(row, ref={"trace": trace}))
    return rows


# ------------------------------------------------------------------------------------ rounds


@dataclass
class _Rounds:
    """What the rounds of one :func:`rsft` call share."""

    ws: Workspace
    pool: list[dict]
    replay_pool: list[dict]  # SFT rows mixed in per winner (rsft.replay)
    contaminated: bool
    resume: bool
    previous: list[dict]  # samples of an earlier call (resume): rounds it finished are skipped
    samples: list[dict] = field(default_factory=list)  # every round's samples so far
    redone: bool = False  # a round recomputed in this call makes every later round's partial samples stale

    @property
    def samples_file(self) -> Path:
        return self.ws.run_dir / "rsft_samples.jsonl"

    def questions(self, r: int) -> list[dict]:
        rc = self.ws.cfg.rsft
        return round_questions(self.pool, rc.max_questions, r, rc.rotate)


def rsft(ws: Workspace, *, adapter: str | None = None, pool: str | None = None, adapter_out: str | Path | None = None,
         allow_eval_overlap: bool = False, evaluate_rounds: bool = True, resume: bool = False) -> dict:
    """Rejection-sampling fine-tuning: sample K per question (or first f, then the rest where those
    f hold fewer than keep_top winners), keep KG-rewarded winners, fine-tune.

    Starts from ``adapter`` (default the run's SFT adapter) on the rsft split (or ``pool``). Round r
    trains into ``models/rsft`` (r = 1) or ``models/rsft_r<r>`` of the run directory; the last
    round's adapter is also copied to ``adapter_out``. With ``resume``, rounds whose samples and
    adapter are already in the run directory are skipped, so an interrupted run, or one given more
    ``rsft.rounds``, continues where it stopped and ends as an uninterrupted run would.
    """
    state, current = _start(ws, adapter=adapter, pool=pool, adapter_out=adapter_out, allow=allow_eval_overlap,
                            resume=resume)
    rounds = []
    for r in range(1, ws.cfg.rsft.rounds + 1):
        stat = _finished_round(state, r) or _new_round(state, r, current)
        current = str(runs.model_dir(ws.run_dir, stat["phase"]))
        if evaluate_rounds:
            recorded = runs.recorded_phases(ws.run_dir).get(stat["phase"]) if stat.get("resumed") else None
            stat["eval"] = recorded or evaluate(ws, adapter=current, phase=stat["phase"],
                                                contaminated=state.contaminated)["entry"]
        rounds.append(stat)
    if adapter_out and Path(adapter_out) != Path(current):
        if not runs.is_follower():
            copy_adapter(Path(current), Path(adapter_out))
        current = str(adapter_out)
    return {"rounds": rounds, "adapter": current, "samples": str(state.samples_file), "contaminated": state.contaminated}


def _start(ws: Workspace, *, adapter: str | None, pool: str | None, adapter_out: str | Path | None, allow: bool,
           resume: bool) -> tuple[_Rounds, str]:
    """The checks before round 1 and what the rounds share; returns it and the starting adapter."""
    rc = ws.cfg.rsft
    check_recording(ws, rsft_phase_name(1))
    if adapter_out:
        runs.check_writable(adapter_out, "the adapter")
    if resume:
        _check_resume(ws)
    adapter, source, pool_rows, contaminated = rl_start(ws, adapter, pool, allow)
    train_file = ws.split_path("train")
    replay_pool = ws.load_split("train") if rc.replay > 0 and train_file.exists() else []
    if replay_pool:
        contaminated |= guard_leakage(ws, replay_pool, str(train_file), allow=allow)
    ws.check_model()
    ws.check_budget(pool_rows, rc.max_tokens, "rsft.max_tokens")
    stored = ws.run_dir / "config.toml"
    if resume and stored.is_file() and not runs.is_follower():  # the run now holds this many rounds
        runs.write_text_atomic(stored, to_toml(ws.cfg))
    samples_file = ws.run_dir / "rsft_samples.jsonl"
    previous = dataset.read_jsonl(samples_file) if resume and samples_file.is_file() else []
    return _Rounds(ws, pool_rows, replay_pool, contaminated, resume, previous), adapter


def _check_resume(ws: Workspace) -> None:
    """A resumed RSFT may add rounds, nothing else: the rest of the config must match the run's
    (the caller rewrites it once its other checks pass)."""
    stored = ws.run_dir / "config.toml"
    if not stored.is_file():
        return
    old = load_config(stored).model_dump()
    new = ws.cfg.model_dump()
    old["rsft"].pop("rounds"), new["rsft"].pop("rounds")
    if old != new:
        raise TracerError(f"{ws.run_dir}: cannot resume RSFT: the config differs from the run's config.toml "
                          "in more than rsft.rounds")


def _finished_round(state: _Rounds, r: int) -> dict | None:
    """Round r's stats when an earlier call finished it (its samples and adapter are there)."""
    done = [s for s in state.previous if s.get("round") == r]
    if not (done and runs.has_adapter(runs.model_dir(state.ws.run_dir, rsft_phase_name(r)))):
        return None
    state.samples.extend(done)
    stat = _round_stat(r, state.questions(r), done, [s for s in done if s.get("kept")])
    stat["resumed"] = True
    state.ws.progress.log(f"RSFT round {r}: finished before, skipped")
    return stat


def _new_round(state: _Rounds, r: int, adapter: str) -> dict:
    """Round r from ``adapter``: sample, keep the winners, train on them (or carry the adapter over)."""
    ws, rc = state.ws, state.ws.cfg.rsft
    lead = not runs.is_follower()  # rank 0 (or the only process) writes
    state.previous = []  # every later round depends on this one: redo them all
    out_dir = runs.model_dir(ws.run_dir, rsft_phase_name(r))
    if lead:
        (out_dir / "adapters.safetensors").unlink(missing_ok=True)  # a stale one would pass for finished
    t0 = time.perf_counter()
    questions = state.questions(r)
    partial = ws.run_dir / f"rsft_r{r}_samples.partial.jsonl"
    scored, reused = sample_round(ws, adapter=adapter, questions=questions, round_index=r, partial=partial,
                                  reuse=state.resume and not state.redone)
    state.redone = True
    winners = select_winners(scored, rc.keep_top, rc.min_reward, rc.require_correct)
    for w in winners:
        w["kept"] = True
    state.samples.extend(scored)
    if lead:
        dataset.write_jsonl(state.samples_file, state.samples)
    stat = _round_stat(r, questions, scored, winners)
    stat["sample_s"] = round(time.perf_counter() - t0, 2)
    _log_round(ws, stat, scored, winners)
    if winners:
        # samples all reused: the same winners, so an interrupted round's training resumes too
        resume_train = reused and (out_dir / "checkpoint").exists()
        rows = _training_rows(state, r, winners)
        # a round trained anew replaces what an interrupted try left in its directory
        stat["train"] = train_adapter(ws, "rsft", rows, out_dir, resume=resume_train, force=not resume_train,
                                      init_adapter=adapter)
        mark_contaminated(out_dir, state.contaminated)
    else:
        ws.progress.log(f"[yellow]RSFT round {r}: no sample qualified; the adapter is carried over unchanged[/yellow]")
        if lead:
            copy_adapter(Path(adapter), out_dir)
        stat["skipped"] = True
    if lead:
        partial.unlink(missing_ok=True)  # kept until the round's adapter is saved
    distributed.barrier()  # the round's adapter is written before any rank reads it
    return stat


def _training_rows(state: _Rounds, r: int, winners: list[dict]) -> list[dict]:
    """The winners as training rows, plus rsft.replay SFT rows per winner (drawn with seed + r)."""
    rc = state.ws.cfg.rsft
    rows = winner_rows(winners, {q["id"]: q for q in state.pool})
    n_replay = min(int(round(rc.replay * len(rows))), len(state.replay_pool))
    return rows + random.Random(rc.seed + r).sample(state.replay_pool, n_replay)


def _round_stat(r: int, questions: list[dict], scored: list[dict], winners: list[dict]) -> dict:
    return {
        "round": r,
        "phase": rsft_phase_name(r),
        "questions": len(questions),
        "samples": len(scored),
        "questions_with_winner": len({w["ex_id"] for w in winners}),
        "mean_sample_reward": sum(s["reward"]["total"] for s in scored) / max(len(scored), 1),
        "sample_accuracy": sum(s["correct"] for s in scored) / max(len(scored), 1),
        "winners": len(winners),
    }


def _log_round(ws: Workspace, stat: dict, scored: list[dict], winners: list[dict]) -> None:
    first = ws.cfg.rsft.first_samples
    staged = ""
    if first:  # the sample means then lean to the questions sampled K times
        stat["resampled_questions"] = len({s["ex_id"] for s in scored if s["sample"] >= first})
        staged = f" ({stat['resampled_questions']} sampled past the first {first})"
    ws.progress.log(
        f"RSFT round {stat['round']}: {stat['questions_with_winner']}/{stat['questions']} questions with a winner, "
        f"{len(scored)} samples{staged}, mean sample reward {stat['mean_sample_reward']:+.2f}, "
        f"{len(winners)} winners kept"
    )


# ---------------------------------------------------------------------------------- sampling


def sample_round(ws: Workspace, *, adapter: str, questions: list[dict], round_index: int, partial: Path,
                 reuse: bool) -> tuple[list[dict], bool]:
    """Round ``round_index``'s scored samples, from ``adapter``, and whether all were reused.

    Each question gets rsft.k_samples samples, or with rsft.first_samples = f > 0, f samples first
    and the other K - f only when those f hold fewer than rsft.keep_top winners: rejection
    sampling stops at acceptance, so questions the adapter already solves cost f samples, not K.
    Questions are sampled :data:`SAMPLE_CHUNK` at a time (chunk c seeded by rsft.seed + r + 1000c,
    in the second stage + 1,000,000) and each chunk's scored samples are appended to ``partial``
    as it finishes. With ``reuse``, chunks already complete there are not sampled again, so an
    interrupted round resumes where it stopped and ends with the samples an uninterrupted one
    would have drawn. Rows come back per question in ``questions`` order, by sample index.
    """
    rc, r = ws.cfg.rsft, round_index
    sampler = _Sampler(ws, adapter, r, partial, _reusable_rows(partial, r, rc.k_samples) if reuse else {})
    if not (reuse or runs.is_follower()):
        partial.unlink(missing_ok=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    first = rc.first_samples or rc.k_samples
    reused = sampler.stage(questions, range(first), rc.seed + r)
    more: set[str] = set()
    if first < rc.k_samples:
        more = {q["id"] for q in questions
                if len(select_winners([sampler.have[q["id"]][i] for i in range(first)], rc.keep_top, rc.min_reward,
                                      rc.require_correct)) < rc.keep_top}
        reused &= sampler.stage([q for q in questions if q["id"] in more], range(first, rc.k_samples),
                                rc.seed + r + 1_000_000)
    return [sampler.have[q["id"]][i] for q in questions for i in range(rc.k_samples if q["id"] in more else first)], reused


def read_partial(path: Path, r: int) -> dict[str, dict[int, dict]]:
    """Round ``r``'s scored samples in ``path``: question id -> sample index -> row. A line cut
    short by a kill is dropped; a chunk sampled again after one overrides its earlier rows."""
    have: dict[str, dict[int, dict]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): see dataset._read_lines
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("round") == r:
                have.setdefault(row["ex_id"], {})[row["sample"]] = row
    return have


def _reusable_rows(partial: Path, r: int, k_samples: int) -> dict[str, dict[int, dict]]:
    """:func:`read_partial`, less the questions with rows past ``k_samples``: those were drawn
    under another K and are sampled anew (``partial`` is rewritten without them)."""
    have = read_partial(partial, r)
    stale = [qid for qid, rows in have.items() if max(rows) >= k_samples]
    if stale:
        for qid in stale:
            del have[qid]
        if not runs.is_follower():
            dataset.write_jsonl(partial, [row for rows in have.values() for row in rows.values()])
    return have


@dataclass
class _Sampler:
    """One round's sampling from one adapter: scored rows go to ``have`` (question id -> sample
    index -> row) and, chunk by chunk, to the end of ``partial``."""

    ws: Workspace
    adapter: str
    round_index: int
    partial: Path
    have: dict[str, dict[int, dict]]

    def stage(self, questions: list[dict], indices: range, seed: int) -> bool:
        """Samples ``indices`` of every question, in chunks (chunk c seeded ``seed + 1000c``);
        chunks whose rows ``have`` holds already are skipped. Returns whether every chunk was."""
        chunks = [questions[i : i + SAMPLE_CHUNK] for i in range(0, len(questions), SAMPLE_CHUNK)]
        todo = [c for c, chunk in enumerate(chunks)
                if not all(i in self.have.get(q["id"], {}) for q in chunk for i in indices)]
        if not questions:
            return True
        progress, k = self.ws.progress, len(indices)
        progress.start("generate", total=len(questions) * k)
        progress.update(sum(len(chunk) for c, chunk in enumerate(chunks) if c not in todo) * k)
        if todo:
            jobs = [self._job(chunks[c], k, seed + 1000 * c) for c in todo]
            with self.ws.generation_pool(self.adapter) as pool:
                map_jobs(pool, jobs, OneBar(progress), lambda j, texts: self._record(chunks[todo[j]], indices, texts))
        progress.stop()
        return not todo

    def _job(self, chunk: list[dict], k: int, seed: int) -> dict:
        rc = self.ws.cfg.rsft
        return {"prompts": [q["prompt"] for q in chunk for _ in range(k)], "max_tokens": rc.max_tokens,
                "temperature": rc.temperature, "top_p": rc.top_p, "seed": seed, "batch_size": self.ws.cfg.eval.batch_size,
                "system": self.ws.cfg.data.system_prompt}

    def _record(self, chunk: list[dict], indices: range, completions: list[str]) -> None:
        """Score a finished chunk's completions (``len(indices)`` per question, in order), keep them
        in ``have`` and append them to ``partial`` (synced: a kill loses at most the chunk in flight)."""
        k, r = len(indices), self.round_index
        rows = []
        for n, q in enumerate(chunk):
            eps = score_rows(self.ws, [q] * k, completions[n * k : (n + 1) * k], rsft_phase_name(r))
            for i, e in zip(indices, eps):
                e["sample"], e["round"] = i, r
                self.have.setdefault(q["id"], {})[i] = e
            rows.extend(eps)
        if runs.is_follower():
            return
        with self.partial.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())


def map_jobs(pool, jobs: list[dict], progress, on_done) -> None:
    """``pool.map(jobs, progress, on_done=on_done)``; under ``mlx.launch``, in waves of one job per
    rank, each wave's completions gathered on every rank and handed to ``on_done(index,
    completions)`` in job order (``progress`` also advances for the other ranks' jobs)."""
    rank, size = distributed.world()
    if size == 1:
        pool.map(jobs, progress, on_done=on_done)
        return
    for start in range(0, len(jobs), size):
        wave = jobs[start : start + size]
        done = [texts for part in distributed.gather(pool.map(wave[rank : rank + 1], progress)) for texts in part]
        for i, texts in enumerate(done):
            if i != rank:
                progress.update(len(texts))
            on_done(start + i, texts)
