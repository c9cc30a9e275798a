"""LoRA fine-tuning on reference traces: SFT from the base model, or continuing an adapter; and
the adapter bookkeeping every training stage shares (base-model check, contamination mark, copy)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from tracer import runs
from tracer.errors import TracerError
from tracer.pipeline.data import guard_leakage
from tracer.pipeline.workspace import Workspace


def train_adapter(ws: Workspace, tcfg, rows: list[dict], out_dir: Path, *, resume: bool = False,
                  init_adapter: str | None = None) -> dict:
    """Train a LoRA adapter into ``out_dir`` on ``rows``' reference traces under ``tcfg`` (a
    :class:`tracer.config.TrainConfig`), from ``init_adapter``'s weights when given; returns the
    training stats."""
    from tracer import train

    untraced = next((r["id"] for r in rows if not isinstance(r["ref"].get("trace"), str)), None)
    if untraced is not None:
        raise TracerError(f"example {untraced}: no reference trace to train on "
                          "(give ref.trace, or path_star.edges or meta.relations to build one)")
    lm, tokenizer = ws.load_model()
    train_rows, val_rows = _split_val(rows, tcfg.val_size if tcfg.val_every else 0, tcfg.seed)
    stats = train.train(
        lm, tokenizer, _pairs(train_rows), tcfg, ws.cfg.lora, out_dir,
        base_model=ws.base_model_id(), val_pairs=_pairs(val_rows) or None,
        hop_lens=[r["hop_len"] for r in train_rows], resume=resume, progress=ws.progress,
        init_adapter=init_adapter,
    )
    stats["adapter"] = str(out_dir)
    return stats


def _pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["prompt"], r["ref"]["trace"]) for r in rows]


def _split_val(rows: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    if size <= 0 or len(rows) <= 2 * size:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = set(order[:size])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def sft(ws: Workspace, *, train: str | None = None, adapter_out: str | Path | None = None, resume: bool = False,
        allow_eval_overlap: bool = False) -> dict:
    """LoRA SFT on reference traces of the train split (or ``train``) into ``adapter_out``
    (default ``models/sft`` of the run directory); returns training stats and the adapter directory."""
    if train is None:
        ws.ensure_data()
    source = train or str(ws.split_path("train"))
    rows = ws.load_split("train", source)
    contaminated = guard_leakage(ws, rows, source, allow=allow_eval_overlap)
    out_dir = Path(adapter_out) if adapter_out else runs.model_dir(ws.run_dir, "sft")
    stats = train_adapter(ws, ws.cfg.sft, rows, out_dir, resume=resume)
    mark_contaminated(out_dir, contaminated)
    stats["contaminated"] = contaminated
    return stats


def continue_(ws: Workspace, *, adapter: str, train: str, adapter_out: str | Path, resume: bool = False,
              allow_eval_overlap: bool = False) -> dict:
    """Continue training an existing adapter on new examples, into ``adapter_out``."""
    check_adapter_base(ws, adapter)
    rows = ws.load_split("train", train)
    contaminated = guard_leakage(ws, rows, train, allow=allow_eval_overlap) or adapter_contaminated(adapter)
    stats = train_adapter(ws, ws.cfg.sft, rows, Path(adapter_out), resume=resume, init_adapter=adapter)
    mark_contaminated(adapter_out, contaminated)
    stats["contaminated"] = contaminated
    return stats


# ---------------------------------------------------------------------------------- adapters


def check_adapter_base(ws: Workspace, adapter: str) -> dict:
    """Refuse an adapter trained for another base model; returns its adapter_config.json."""
    from tracer.train import read_adapter_config

    acfg = read_adapter_config(adapter)
    want = ws.base_model_id()
    have = acfg.get("base_model")
    if have and have != want:
        raise TracerError(f"{adapter}: adapter was trained for base model '{have}', not '{want}'")
    return acfg


def adapter_contaminated(adapter: str | Path | None) -> bool:
    """Whether an adapter (or one it was continued from) was trained with eval overlap."""
    cfg_file = Path(adapter) / "adapter_config.json" if adapter else None
    if cfg_file is None or not cfg_file.is_file():
        return False
    return bool(runs.read_json(cfg_file).get("contaminated"))


def mark_contaminated(adapter: str | Path, contaminated: bool) -> None:
    """Record in the adapter's config that it was trained with eval overlap (when it was)."""
    if contaminated:
        cfg_file = Path(adapter) / "adapter_config.json"
        runs.write_json(cfg_file, dict(runs.read_json(cfg_file), contaminated=True))


def copy_adapter(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in runs.ADAPTER_FILES:
        shutil.copy2(src / name, dst / name)
