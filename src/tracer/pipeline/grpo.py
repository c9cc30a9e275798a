"""GRPO: policy-gradient RL from the SFT adapter on the RSFT pool, the KG as reward, then eval.

Under ``mlx.launch`` the training runs data-parallel (:func:`tracer.grpo.train_grpo`): rank 0 alone
writes the adapter directory, and every rank evaluates the adapter once it is written."""

from __future__ import annotations

from pathlib import Path

from tracer import distributed, runs
from tracer.pipeline.evaluate import check_recording, evaluate
from tracer.pipeline.finetune import (check_distinct, check_output, mark_contaminated, rl_start, training_in,
                                      training_settings)
from tracer.pipeline.workspace import Workspace


def grpo(ws: Workspace, *, adapter: str | None = None, pool: str | None = None, adapter_out: str | Path | None = None,
         resume: bool = False, force: bool = False, allow_eval_overlap: bool = False, evaluate_after: bool = True) -> dict:
    """GRPO from ``adapter`` (default the run's SFT adapter) on the rsft split (or ``pool``) into
    ``adapter_out`` (default ``models/grpo`` of the run directory), then evaluated as phase
    ``grpo``. The step log is ``grpo_log.jsonl`` in the adapter directory."""
    from tracer import grpo as rl

    out_dir = Path(adapter_out) if adapter_out else runs.model_dir(ws.run_dir, "grpo")
    check_output(out_dir, resume=resume, force=force)
    if evaluate_after:
        check_recording(ws, "grpo")
    check_distinct(adapter or runs.model_dir(ws.run_dir, "sft"), out_dir)
    adapter, source, rows, contaminated = rl_start(ws, adapter, pool, allow_eval_overlap)
    ws.check_budget(rows, ws.cfg.grpo.max_tokens, "grpo.max_tokens")
    settings = training_settings(ws, "grpo", rows, adapter, source)
    with training_in(ws, out_dir, settings, resume=resume) as (lm, tokenizer):
        stats = rl.train_grpo(lm, tokenizer, rows, rl.kg_scorer(ws.kg, ws.cfg.reward), ws.cfg.grpo, ws.cfg.lora,
                              out_dir, ws.base_model_id(), resume=resume, progress=ws.progress, init_adapter=adapter,
                              system=ws.cfg.data.system_prompt, tags=ws.cfg.data.option_tags)
    mark_contaminated(out_dir, contaminated)
    distributed.barrier()  # under mlx.launch: rank 0 wrote the adapter before any rank reads it
    out = {"train": stats, "adapter": str(out_dir), "contaminated": contaminated}
    if evaluate_after:
        out["eval"] = evaluate(ws, adapter=str(out_dir), phase="grpo", contaminated=contaminated)["entry"]
    return out
