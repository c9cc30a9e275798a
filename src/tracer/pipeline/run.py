"""The whole pipeline into one run directory: data → base eval → SFT → eval → RSFT rounds (each
evaluated) → GRPO → eval → consolidation → eval, the phases ``run.phases`` names; ``resume`` skips
finished ones.

Under ``mlx.launch`` every phase runs data-parallel (training, GRPO) or sharded (evaluation,
RSFT sampling) on every rank, in step; rank 0 alone prepares, locks and writes the run directory,
and the others wait for it (:func:`tracer.distributed.barrier`) where they read what it wrote."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from tracer import distributed, runs
from tracer.config import Config, load_config, to_toml
from tracer.errors import TracerError
from tracer.pipeline.consolidate import consolidate
from tracer.pipeline.data import guard_leakage
from tracer.pipeline.evaluate import evaluate
from tracer.pipeline.finetune import check_finished_adapter, has_checkpoint, sft
from tracer.pipeline.grpo import grpo
from tracer.pipeline.rsft import rsft, rsft_phase_name
from tracer.pipeline.workspace import Workspace


def planned_phases(cfg: Config) -> list[str]:
    """The phases a run records, RSFT's rounds each under its own name."""
    phases = []
    for p in cfg.run.phases:
        if p == "rsft":
            phases += [rsft_phase_name(r) for r in range(1, cfg.rsft.rounds + 1)]
        else:
            phases.append(p)
    return phases


@dataclass
class _Run:
    """One :func:`run` call, once its directory is prepared."""

    ws: Workspace
    contaminated: bool
    done: set[str]  # phases finished before (resume)

    def wanted(self, phase: str) -> bool:
        return phase in self.ws.cfg.run.phases and phase not in self.done

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        _meta(self.ws.run_dir, timings={name: round(time.perf_counter() - t0, 2)})
        return out

    def evaluate(self, phase: str, adapter: str | None = None) -> dict:
        return self.timed(phase, lambda: evaluate(self.ws, adapter=adapter, phase=phase, contaminated=self.contaminated))


def run(ws: Workspace, *, force: bool = False, resume: bool = False, allow_eval_overlap: bool = False) -> dict:
    """The whole pipeline into ``ws.run_dir``; ``resume`` skips finished phases, ``force``
    overwrites an existing run (only what tracer wrote there: see :func:`tracer.runs.check_run_dir`).
    The run directory is locked meanwhile: a second process refuses it."""
    action = _check(ws, force=force, resume=resume)
    data_summary, contaminated = _validate(ws, resume=resume, allow_eval_overlap=allow_eval_overlap)
    with runs.locked(ws.run_dir, "run directory"):
        r = _prepare(ws, action, contaminated, resume=resume)
        return _phases(ws, r, data_summary, resume=resume, allow_eval_overlap=allow_eval_overlap)


def _meta(run_dir, **fields: Any) -> None:
    """Rank 0 (or the only process) updates the run's meta.json and notes its BLAS threads."""
    if not runs.is_follower():
        runs.update_meta(run_dir, **fields)
        runs.note_blas(run_dir)


def _trained(ws: Workspace, phase: str, wall_s: float) -> None:
    """After a phase's training (whose stage waited for rank 0's adapter): its time, across
    interruptions."""
    _meta(ws.run_dir, timings={f"{phase}_train": wall_s})


def _train_into(model_dir, resume: bool) -> dict:
    """How a phase trains into its directory of the run: resuming its checkpoint (``resume``), or
    from the start, replacing what an interrupted try left (the run owns the directory)."""
    again = resume and has_checkpoint(model_dir)
    return {"resume": again, "force": not again}


def _phases(ws: Workspace, r: _Run, data_summary: dict | None, *, resume: bool, allow_eval_overlap: bool) -> dict:
    results: dict[str, Any] = {"run_dir": str(ws.run_dir), "data": data_summary, "phases": {}}
    if r.wanted("base"):
        results["phases"]["base"] = r.evaluate("base")
    sft_dir = runs.model_dir(ws.run_dir, "sft")
    if r.wanted("sft"):
        if not runs.has_adapter(sft_dir):
            stats = sft(ws, adapter_out=sft_dir, allow_eval_overlap=allow_eval_overlap, **_train_into(sft_dir, resume))
            _trained(ws, "sft", stats["wall_s"])
        results["phases"]["sft"] = r.evaluate("sft", str(sft_dir))
    rsft_phases = [p for p in planned_phases(ws.cfg) if p.startswith("rsft")]
    if "rsft" in ws.cfg.run.phases and not set(rsft_phases) <= r.done:
        results["rsft"] = r.timed("rsft", lambda: rsft(ws, adapter=str(sft_dir), allow_eval_overlap=allow_eval_overlap,
                                                       resume=resume))
    grpo_dir = runs.model_dir(ws.run_dir, "grpo")
    if r.wanted("grpo"):
        if not runs.has_adapter(grpo_dir):
            out = grpo(ws, adapter=str(sft_dir), adapter_out=grpo_dir, allow_eval_overlap=allow_eval_overlap,
                       evaluate_after=False, **_train_into(grpo_dir, resume))
            _trained(ws, "grpo", out["train"]["wall_s"])
        results["phases"]["grpo"] = r.evaluate("grpo", str(grpo_dir))
    cons_dir = runs.model_dir(ws.run_dir, "consolidate")
    if r.wanted("consolidate"):
        if not runs.has_adapter(cons_dir):
            out = consolidate(ws, adapter_out=cons_dir, allow_eval_overlap=allow_eval_overlap, evaluate_after=False,
                              **_train_into(cons_dir, resume))
            _trained(ws, "consolidate", out["train"]["wall_s"])
        results["phases"]["consolidate"] = r.evaluate("consolidate", str(cons_dir))
    if not runs.is_follower():
        runs.update_meta(ws.run_dir, finished_at=runs.now())
    distributed.barrier()  # rank 0 recorded every phase before any rank reads metrics.json
    results["metrics"] = runs.read_json(ws.run_dir / "metrics.json", default={})
    return results


def _check(ws: Workspace, *, force: bool, resume: bool) -> str:
    """The run directory's checks, before anything is written: writable, not another process's,
    and what :func:`tracer.runs.check_run_dir` will do with it."""
    cfg, run_dir = ws.cfg, ws.run_dir
    if force and resume:
        raise TracerError("--force and --resume exclude each other")
    runs.check_writable(run_dir, "the run")
    runs.check_unlocked(run_dir, "run directory")
    stored, config_toml = run_dir / "config.toml", to_toml(cfg)
    if resume and stored.is_file() and load_config(stored) == cfg and stored.read_text() != config_toml:
        # the same settings, written by a tracer that had fewer knobs: not a config change
        if runs.is_follower():  # under mlx.launch rank 0 rewrites it
            config_toml = stored.read_text()
        else:
            runs.write_text_atomic(stored, config_toml)
    return runs.check_run_dir(run_dir, config_toml, force=force, resume=resume)


def _validate(ws: Workspace, *, resume: bool, allow_eval_overlap: bool) -> tuple[dict | None, bool]:
    """Check the data, the leakage guard, the base model and (when resuming) the SFT adapter kept;
    returns the data summary (when the splits were made now) and whether the run is contaminated."""
    cfg, run_dir = ws.cfg, ws.run_dir
    data_summary = ws.ensure_data(model_first=True)  # bad data or a refused overlap stop the run before its directory is written
    contaminated = False
    for split in ["train"] + (["rsft"] if {"rsft", "grpo"} & set(cfg.run.phases) else []):
        contaminated |= guard_leakage(ws, ws.load_split(split), str(ws.split_path(split)), allow=allow_eval_overlap)
    if resume and "sft" in cfg.run.phases:  # a kept SFT adapter (one `tracer sft` made, say) must be this config's
        check_finished_adapter(ws, runs.model_dir(run_dir, "sft"), "sft", ws.load_split("train"),
                               str(ws.split_path("train")))
    ws.check_model()
    return data_summary, contaminated


def _prepare(ws: Workspace, action: str, contaminated: bool, *, resume: bool) -> _Run:
    """Prepare the run directory as :func:`tracer.runs.check_run_dir` decided (``action``)."""
    cfg, run_dir = ws.cfg, ws.run_dir
    if action == "overwrite":
        ws.progress.log(f"--force: deleting the contents of {run_dir}: {runs.describe_contents(run_dir)}")
    elif action == "adopt":
        ws.progress.log(f"{run_dir}: no meta.json (another tracer command wrote it); continuing from what it holds: "
                        f"{runs.describe_contents(run_dir)}")
    if not runs.is_follower():  # under mlx.launch rank 0 deletes (--force), creates and writes the run
        runs.prepare_run(run_dir, to_toml(cfg), planned_phases(cfg), cfg.run.seed, action)
        if contaminated:
            runs.update_meta(run_dir, contaminated=True)
    distributed.barrier()  # the others read it once it is prepared
    done = runs.finished_phases(run_dir) if resume else set()
    return _Run(ws, contaminated, done)
