"""Consolidation after RSFT: one SFT pass, continuing the last round's adapter, on that round's
winners plus the short (and renamed) training questions.

RSFT keeps chains long but wears down the recall of single facts; one pass over both restores
the facts without shortening the chains.

Under ``mlx.launch`` the pass trains data-parallel and the evaluation is sharded
(:mod:`tracer.distributed`); rank 0 alone writes the adapter and records the phase.
"""

from __future__ import annotations

from pathlib import Path

from tracer import dataset, distributed, runs
from tracer.errors import TracerError
from tracer.pipeline.data import guard_leakage
from tracer.pipeline.evaluate import check_recording, evaluate
from tracer.pipeline.finetune import adapter_contaminated, check_adapter, check_distinct, check_output, mark_contaminated, train_adapter
from tracer.pipeline.rsft import rsft_phase_name, winner_rows
from tracer.pipeline.workspace import Workspace


def consolidation_rows(samples: list[dict], pool: list[dict], train_rows: list[dict], hops: list[int]) -> dict:
    """The last RSFT round's winners (as training rows) plus the training questions of ``hops`` hops
    and every renamed (counterfactual) training question.

    Renamed questions can only be answered by reading the prompt's facts.
    """
    kept = [s for s in samples if s.get("kept")]
    last = max((s["round"] for s in kept), default=None)
    winners = [s for s in kept if s["round"] == last]
    facts = [r for r in train_rows if r["hop_len"] in hops or r["meta"].get("counterfactual")]
    return {"round": last, "winners": winner_rows(winners, {q["id"]: q for q in pool}), "facts": facts}


def consolidate(ws: Workspace, *, adapter: str | None = None, samples: str | None = None, pool: str | None = None,
                adapter_out: str | Path | None = None, allow_eval_overlap: bool = False, resume: bool = False,
                force: bool = False, evaluate_after: bool = True) -> dict:
    """After RSFT: one SFT pass continuing the last round's adapter on its winners plus short questions.

    Reads ``rsft_samples.jsonl`` of the run directory (or ``samples``, drawn from the rsft split or
    ``pool``), continues the last round's adapter (or ``adapter``) into ``models/consolidate`` (or
    ``adapter_out``), then evaluates it as the phase ``consolidate``. When no round kept a winner,
    it trains on the short questions alone.
    """
    samples_file = Path(samples) if samples else ws.run_dir / "rsft_samples.jsonl"
    if not samples_file.is_file():
        raise TracerError(f"{samples_file}: no RSFT samples to consolidate; run `tracer rsft` first")
    out_dir = Path(adapter_out) if adapter_out else runs.model_dir(ws.run_dir, "consolidate")
    check_output(out_dir, resume=resume, force=force)
    if evaluate_after:
        check_recording(ws, "consolidate")
    ws.ensure_data(model_first=True)
    train_source = str(ws.split_path("train"))
    scored = dataset.read_jsonl(samples_file)
    parts = consolidation_rows(scored, ws.load_split("rsft", pool), ws.load_split("train"), ws.cfg.consolidate.hops)
    last = parts["round"] if parts["round"] is not None else _facts_only_round(ws, samples_file, scored, parts)
    adapter = adapter or str(runs.model_dir(ws.run_dir, rsft_phase_name(last)))
    check_adapter(ws, adapter)
    check_distinct(adapter, out_dir)
    rows = parts["winners"] + parts["facts"]
    contaminated = guard_leakage(ws, rows, f"{samples_file} + {train_source}", allow=allow_eval_overlap)
    contaminated |= adapter_contaminated(adapter)
    renamed = sum(bool(r["meta"].get("counterfactual")) for r in parts["facts"])
    ws.progress.log(f"consolidate: {len(parts['winners'])} winners of RSFT round {last} + "
                    f"{len(parts['facts']) - renamed} training questions of {ws.cfg.consolidate.hops} hops + "
                    f"{renamed} renamed ones")
    stats = train_adapter(ws, "consolidate", rows, out_dir, resume=resume, force=force, init_adapter=adapter,
                          source=f"{samples_file} + {train_source}")
    mark_contaminated(out_dir, contaminated)
    distributed.barrier()  # under mlx.launch: rank 0 wrote the adapter before any rank reads it
    out = {"train": stats, "adapter": str(out_dir), "winners": len(parts["winners"]), "facts": len(parts["facts"]),
           "round": parts["round"], "contaminated": contaminated, "run_dir": str(ws.run_dir)}
    if evaluate_after:
        out["eval"] = evaluate(ws, adapter=str(out_dir), phase="consolidate", contaminated=contaminated)["entry"]
    return out


def _facts_only_round(ws: Workspace, samples_file: Path, scored: list[dict], parts: dict) -> int:
    """No round kept a winner (each carried its adapter over unchanged): the facts are rehearsed
    alone, from the last round's adapter; returns that round."""
    if not scored:
        raise TracerError(f"{samples_file}: no RSFT samples in it; nothing to consolidate")
    if not parts["facts"]:
        raise TracerError(f"{samples_file}: no RSFT round kept a winner and there are no training "
                          f"questions of {ws.cfg.consolidate.hops} hops; nothing to consolidate")
    last = max(int(s.get("round", 1)) for s in scored)
    ws.progress.log(f"[yellow]consolidate: no RSFT round kept a winner; training on the facts alone, "
                    f"from round {last}'s adapter[/yellow]")
    return last
