"""Evaluation: answer the eval questions (greedy), score each answer with the KG reward, and record
the phase (metrics and episodes) in the run directory.

Under ``mlx.launch`` each rank answers its share of the questions (:mod:`tracer.distributed`);
the answers are gathered back in question order, and rank 0 alone records the phase."""

from __future__ import annotations

import time
from pathlib import Path

from tracer import dataset, distributed, runs
from tracer.config import to_toml
from tracer.pipeline.finetune import adapter_contaminated, check_adapter
from tracer.pipeline.workspace import Workspace
from tracer.progress import OneBar


def score_rows(ws: Workspace, rows: list[dict], completions: list[str], phase: str) -> list[dict]:
    """One scored episode per row and its completion."""
    from tracer import reward

    matcher = reward.EntityMatcher(ws.kg.entities)
    return [
        reward.episode(row, text, phase, reward.score(text, row, matcher, ws.kg, ws.cfg.reward))
        for row, text in zip(rows, completions)
    ]


def evaluate(
    ws: Workspace,
    *,
    examples: str | None = None,
    adapter: str | None = None,
    phase: str = "eval",
    shuffled: bool | None = None,
    contaminated: bool = False,
) -> dict:
    """Generate answers for the eval questions (or ``examples``), score them with the KG and record
    the phase in ``ws.run_dir``; ``shuffled`` (default ``eval.shuffled``) also answers the
    option-permuted copies and records how often both answers agree."""
    from tracer import metrics

    cfg = ws.cfg
    check_recording(ws, phase)
    if adapter:
        check_adapter(ws, adapter)
    contaminated = contaminated or adapter_contaminated(adapter)
    rows = _eval_rows(ws, examples)
    ws.check_model()
    ws.check_budget(rows, cfg.eval.max_tokens, "eval.max_tokens")
    pool = ws.generation_pool(adapter)
    t0 = time.perf_counter()
    with pool:
        episodes = score_rows(ws, rows, _answer(ws, pool, rows), phase)
        entry = metrics.aggregate(episodes)
        entry["shuffle_agreement"] = None
        if cfg.eval.shuffled if shuffled is None else shuffled:
            entry["shuffle_agreement"] = _shuffle_agreement(ws, pool, examples, rows, episodes, phase)
    entry["wall_s"] = round(time.perf_counter() - t0, 2)  # model loading included
    entry["workers"] = pool.used
    entry["ranks"] = distributed.world()[1]
    entry["finished_at"] = runs.now()
    entry["model"] = ws.model_spec()
    entry["adapter"] = adapter
    entry["examples"] = str(examples or ws.split_path("eval"))
    if not runs.is_follower():
        _record(ws, phase, entry, episodes, contaminated)
    return {"phase": phase, "entry": entry, "run_dir": str(ws.run_dir), "episodes": str(runs.episodes_path(ws.run_dir, phase))}


def check_recording(ws: Workspace, phase: str) -> None:
    """Before an evaluation: its phase name and run directory (writable, no other process's run)."""
    runs.check_name(phase, "--phase")
    runs.check_writable(ws.run_dir, "the run")
    runs.check_unlocked(ws.run_dir, "run directory")


def _eval_rows(ws: Workspace, examples: str | None) -> list[dict]:
    if examples is None:
        ws.ensure_data(model_first=True)
    rows = ws.load_split("eval", examples)
    return rows[: ws.cfg.eval.max_examples] if ws.cfg.eval.max_examples else rows


def _answer(ws: Workspace, pool, rows: list[dict]) -> list[str]:
    """Greedy completions of ``rows``' prompts, on one progress bar; under ``mlx.launch`` this rank
    answers its shard and every rank gets all the completions back, in ``rows``' order."""
    ec = ws.cfg.eval
    mine = distributed.shard(rows)
    ws.progress.start("generate", total=len(mine))
    texts = pool.generate([r["prompt"] for r in mine], progress=OneBar(ws.progress), max_tokens=ec.max_tokens,
                          batch_size=ec.batch_size, seed=ec.seed, system=ws.cfg.data.system_prompt)
    ws.progress.stop()
    return distributed.gather_shards(texts)


def _shuffle_agreement(ws: Workspace, pool, examples: str | None, rows: list[dict], episodes: list[dict],
                       phase: str) -> float | None:
    """Answers the option-permuted copies of ``rows`` (``eval_shuffled.jsonl`` beside them) and
    returns how often they pick the same entity as ``episodes``."""
    from tracer import metrics

    path = Path(examples).with_name("eval_shuffled.jsonl") if examples else ws.split_path("eval_shuffled")
    wanted = {r["id"] + "-shuf" for r in rows}
    shuf_rows = [r for r in ws.load_split("eval_shuffled", path) if r["id"] in wanted]
    shuf_eps = score_rows(ws, shuf_rows, _answer(ws, pool, shuf_rows), phase + "_shuffled")
    return metrics.shuffle_agreement(episodes, shuf_eps, rows, shuf_rows)


def _record(ws: Workspace, phase: str, entry: dict, episodes: list[dict], contaminated: bool) -> None:
    if not (ws.run_dir / "meta.json").exists():
        runs.init_run(ws.run_dir, to_toml(ws.cfg), [phase], ws.cfg.run.seed)
    dataset.write_jsonl(runs.episodes_path(ws.run_dir, phase), episodes)
    runs.record_phase(ws.run_dir, phase, entry, contaminated=contaminated)
    runs.note_blas(ws.run_dir)
