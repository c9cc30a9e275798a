"""LoRA fine-tuning on reference traces: SFT from the base model, or continuing an adapter; and
the adapter bookkeeping every training stage shares: the checks before training (the output
directory, an earlier training's checkpoint, the settings a resume must keep), the base-model
check, the contamination mark, the copy."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from tracer import distributed, runs
from tracer.errors import TracerError
from tracer.format import SYSTEM_PROMPT
from tracer.pipeline.data import guard_leakage
from tracer.pipeline.workspace import Workspace

SETTINGS_FILE = runs.TRAINING_SETTINGS  # the settings a training started (or last resumed) under
# what a training writes into its adapter directory: --force deletes these, nothing else
TRAINING_OUTPUTS = tuple(n for n in (*runs.CHECKPOINT_DIRS, *runs.ADAPTER_DIR_FILES) if n != runs.LOCK_FILE)
# settings a resume may change: they decide when checkpoints are written, not what is trained
FREE_SETTINGS = ("save_every",)


def train_adapter(ws: Workspace, section: str, rows: list[dict], out_dir: Path, *, resume: bool = False,
                  force: bool = False, init_adapter: str | None = None, source: str | None = None) -> dict:
    """Train a LoRA adapter into ``out_dir`` on ``rows``' reference traces under the config section
    ``section`` (sft, rsft or consolidate), from ``init_adapter``'s weights when given; returns
    the training stats. ``out_dir`` must be free (see :func:`check_output`) unless ``resume``
    continues its checkpoint (under the same settings: :func:`check_resume_settings`) or ``force``
    starts over; ``source`` names the rows in messages."""
    from tracer import train

    tcfg = getattr(ws.cfg, section)
    check_output(out_dir, resume=resume, force=force)
    untraced = next((r["id"] for r in rows if not isinstance(r["ref"].get("trace"), str)), None)
    if untraced is not None:
        raise TracerError(f"example {untraced}: no reference trace to train on "
                          "(give ref.trace, or path_star.edges or meta.relations to build one)")
    settings = training_settings(ws, section, rows, init_adapter, source)
    with training_in(ws, out_dir, settings, resume=resume) as (lm, tokenizer):
        train_rows, val_rows = _split_val(rows, tcfg.val_size if tcfg.val_every else 0, tcfg.seed)
        stats = train.train(
            lm, tokenizer, _pairs(train_rows), tcfg, ws.cfg.lora, out_dir,
            base_model=ws.base_model_id(), val_pairs=_pairs(val_rows) or None,
            hop_lens=[r["hop_len"] for r in train_rows], resume=resume, progress=ws.progress,
            init_adapter=init_adapter, system=ws.cfg.data.system_prompt, tags=ws.cfg.data.option_tags,
        )
    stats["adapter"] = str(out_dir)
    return stats


# ------------------------------------------------------------------- before a training starts


@contextmanager
def training_in(ws: Workspace, out_dir: Path, settings: dict, *, resume: bool) -> Iterator[tuple]:
    """While a training writes into ``out_dir``: a resume's settings checked against the recorded
    ones, the model checked, the directory locked and the settings recorded; yields the base model
    and its tokenizer."""
    if resume:
        check_resume_settings(out_dir, settings, ws.progress.log)
    ws.check_model()
    with runs.locked(out_dir, "adapter directory"):
        begin_training(out_dir, settings, resume=resume)
        yield ws.load_model()


def checkpoint_step(out_dir: Path) -> int | None:
    """The step of ``out_dir``'s newest readable checkpoint (what a resume starts from), or None."""
    for name in runs.CHECKPOINTS:
        try:
            state = json.loads((out_dir / name / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("step"), int):
            return state["step"]
    return None


def has_checkpoint(out_dir: Path) -> bool:
    return any((out_dir / name).is_dir() for name in runs.CHECKPOINTS)


def check_output(out_dir: str | Path, *, resume: bool, force: bool) -> None:
    """The checks on a training's adapter directory, before any work: writable, not in use by
    another process, and free, unless ``resume`` continues its checkpoint or ``force`` starts over.
    An earlier training's checkpoint or adapter is never discarded silently."""
    out = Path(out_dir)
    if resume and force:
        raise TracerError("--resume and --force exclude each other")
    runs.check_writable(out, "the adapter")
    runs.check_unlocked(out, "adapter directory")
    if resume:
        if not has_checkpoint(out):
            raise TracerError(f"{out}: no checkpoint to resume from; drop --resume to train from the start")
        return
    if force:
        return
    step = checkpoint_step(out)
    if has_checkpoint(out):
        at = f" at step {step}" if step is not None else ""
        raise TracerError(f"{out}: holds an earlier training's checkpoint{at}; use --resume to continue it "
                          "or --force to start over (deleting it)")
    if (out / "adapters.safetensors").exists():
        raise TracerError(f"{out}: holds an adapter already; use --force to train a new one in its place "
                          "or choose another directory")


def begin_training(out_dir: Path, settings: dict, *, resume: bool) -> None:
    """Once every check passed: a fresh training deletes what an earlier one left in ``out_dir``
    (only :data:`TRAINING_OUTPUTS`); both record the settings they run under. Under ``mlx.launch``
    rank 0 alone does (it writes for all ranks)."""
    if runs.is_follower():
        return
    if not resume:
        for name in TRAINING_OUTPUTS:
            p = out_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    runs.write_json(out_dir / SETTINGS_FILE, settings)


def _rows_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def training_settings(ws: Workspace, section: str, rows: list[dict], init_adapter: str | None = None,
                      source: str | None = None) -> dict:
    """What a training's result is a function of: the section's settings, the LoRA settings (or the
    starting adapter's weights), the base model, the system message and the training rows (their
    SHA-256). Recorded in ``train_settings.json`` beside the checkpoint; a resume must match it
    (:func:`check_resume_settings`)."""
    from tracer.blas import blas_info

    out = {"section": section, "settings": getattr(ws.cfg, section).model_dump(mode="json"),
           "base_model": ws.base_model_id(), "rows": len(rows), "rows_sha256": _rows_digest(rows),
           "source": source, "blas_threads_at_start": blas_info()["threads"],
           "system_prompt": ws.cfg.data.system_prompt}
    if init_adapter:
        out["init_adapter"] = str(init_adapter)
        out["init_adapter_sha256"] = _file_digest(Path(init_adapter) / "adapters.safetensors")
    else:
        out["lora"] = ws.cfg.lora.model_dump(mode="json")
    return out


def check_resume_settings(out_dir: Path, settings: dict, log=None) -> None:
    """Refuse to resume ``out_dir``'s checkpoint under other settings than it was trained with,
    naming each one that differs: a run no single config describes. More steps (``iters``, or
    fewer but not below the checkpoint's step) and another ``save_every`` are allowed, and said
    through ``log``. A checkpoint without a record (older tracers) is resumed as it is."""
    record_file = out_dir / SETTINGS_FILE
    step = checkpoint_step(out_dir)
    section = settings["section"]
    iters = settings["settings"]["iters"]
    if step is not None and iters < step:
        raise TracerError(f"{out_dir}: cannot resume: {section}.iters {iters} is below the checkpoint's step {step}; "
                          f"give --iters {step} or more (or --force to start over)")
    if not record_file.is_file():
        if log:
            log(f"{out_dir}: the checkpoint records no training settings (an older tracer); resuming as it is")
        return
    stored = runs.read_json(record_file)
    if not isinstance(stored, dict) or not isinstance(stored.get("settings"), dict):
        raise TracerError(f"{record_file}: not a settings record; use --force to start over")
    changed, noted = [], []
    old, new = stored["settings"], settings["settings"]
    for key in new:
        if key not in old or old[key] == new[key]:
            continue
        text = f"{section}.{key} {old[key]!r} -> {new[key]!r}"
        (noted if key in ("iters", *FREE_SETTINGS) else changed).append(text)
    for key in ("lora",):
        for k, v in (settings.get(key) or {}).items():
            was = (stored.get(key) or {}).get(k, v)
            if was != v:
                changed.append(f"{key}.{k} {was!r} -> {v!r}")
    if stored.get("base_model") not in (None, settings["base_model"]):
        changed.append(f"the base model ({stored['base_model']} -> {settings['base_model']})")
    system_was = stored.get("system_prompt", SYSTEM_PROMPT)  # older records: the default
    if system_was != settings["system_prompt"]:
        changed.append(f"data.system_prompt ({system_was!r} -> {settings['system_prompt']!r})")
    if stored.get("rows_sha256") not in (None, settings["rows_sha256"]):
        was, now = stored.get("source"), settings.get("source")
        where = f"{was} -> {now}" if was != now else f"{now or 'the rows'} changed"
        changed.append(f"the training data ({stored.get('rows')} -> {settings['rows']} rows; {where})")
    if stored.get("init_adapter_sha256") != settings.get("init_adapter_sha256"):
        changed.append(f"the starting adapter ({stored.get('init_adapter')} -> {settings.get('init_adapter')})")
    if changed:
        raise TracerError(f"{out_dir}: cannot resume under other settings than the checkpoint's: {'; '.join(changed)}; "
                          "use the earlier settings, or --force to start over")
    if noted and log:
        log(f"{out_dir}: resuming at step {step} with {', '.join(noted)}")


def check_finished_adapter(ws: Workspace, out_dir: Path, section: str, rows: list[dict], source: str | None = None) -> None:
    """A finished adapter a resumed run keeps instead of training it (one ``tracer sft`` made in the
    run directory, say) must have been trained under this config: its settings record must match
    (:func:`check_resume_settings`) and its steps ``iters``."""
    if not (runs.has_adapter(out_dir) and (out_dir / SETTINGS_FILE).is_file()):
        return
    settings = training_settings(ws, section, rows, None, source)
    check_resume_settings(out_dir, settings)
    step, iters = checkpoint_step(out_dir), settings["settings"]["iters"]
    if step is not None and step != iters:
        raise TracerError(f"{out_dir}: its adapter was trained for {step} steps, but {section}.iters is {iters}; "
                          "use --force to start over")


def _pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["prompt"], r["ref"]["trace"]) for r in rows]


def _split_val(rows: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    if size <= 0 or len(rows) <= 2 * size:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = set(order[:size])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def training_rows(ws: Workspace, train: str | Sequence[str]) -> tuple[list[dict], str]:
    """The rows of one training file or several (in order), and their name in messages; an id may
    appear in one file only."""
    files = [train] if isinstance(train, str) else list(train)
    rows, seen = [], {}
    for f in files:
        for r in ws.load_split("train", f):
            if r["id"] in seen:
                raise TracerError(f"{f}: example id {r['id']} is also in {seen[r['id']]}; ids must be unique "
                                  "across training files")
            seen[r["id"]] = f
            rows.append(r)
    return rows, " + ".join(files)


def sft(ws: Workspace, *, train: str | Sequence[str] | None = None, adapter_out: str | Path | None = None,
        resume: bool = False, force: bool = False, allow_eval_overlap: bool = False) -> dict:
    """LoRA SFT on reference traces of the train split (or of the file(s) ``train``) into
    ``adapter_out`` (default ``models/sft`` of the run directory); returns training stats and the
    adapter directory. ``resume`` continues its checkpoint, ``force`` starts over in a directory an
    earlier training used."""
    out_dir = Path(adapter_out) if adapter_out else runs.model_dir(ws.run_dir, "sft")
    check_output(out_dir, resume=resume, force=force)
    if not train:
        ws.ensure_data(model_first=True)
    rows, source = training_rows(ws, train or str(ws.split_path("train")))
    contaminated = guard_leakage(ws, rows, source, allow=allow_eval_overlap)
    stats = train_adapter(ws, "sft", rows, out_dir, resume=resume, force=force, source=source)
    mark_contaminated(out_dir, contaminated)
    distributed.barrier()  # under mlx.launch: rank 0 wrote the adapter before any rank reads it
    stats["contaminated"] = contaminated
    return stats


def continue_(ws: Workspace, *, adapter: str, train: str | Sequence[str], adapter_out: str | Path,
              resume: bool = False, force: bool = False, allow_eval_overlap: bool = False) -> dict:
    """Continue training an existing adapter on new examples, one file or several (under this
    config's system message, which may differ from the adapter's), into ``adapter_out``."""
    check_adapter(ws, adapter, same_system=False)
    check_distinct(adapter, adapter_out)
    check_output(Path(adapter_out), resume=resume, force=force)
    rows, source = training_rows(ws, train)
    contaminated = guard_leakage(ws, rows, source, allow=allow_eval_overlap) or adapter_contaminated(adapter)
    stats = train_adapter(ws, "sft", rows, Path(adapter_out), resume=resume, force=force, init_adapter=adapter,
                          source=source)
    mark_contaminated(adapter_out, contaminated)
    stats["contaminated"] = contaminated
    return stats


# ---------------------------------------------------------------------------------- adapters


def check_adapter_base(ws: Workspace, adapter: str) -> dict:
    """Refuse an adapter trained for another base model; returns its adapter_config.json."""
    cfg_file = Path(adapter) / "adapter_config.json"
    if not cfg_file.is_file():
        raise TracerError(f"{adapter}: not an adapter directory (adapter_config.json missing)")
    acfg = runs.read_json(cfg_file)
    if not isinstance(acfg, dict):
        raise TracerError(f"{cfg_file}: corrupt adapter config (not a JSON object)")
    want = ws.base_model_id()
    have = acfg.get("base_model")
    if have and have != want:
        raise TracerError(f"{adapter}: adapter was trained for base model '{have}', not '{want}'")
    return acfg


def check_adapter(ws: Workspace, adapter: str, *, same_system: bool = True) -> dict:
    """An adapter to read, checked before any work: a complete adapter directory (config and
    weights) trained for this base model and, unless a continuation retrains it under other ones
    (``same_system`` False), under this config's system message and letter tags (``data.option_tags``);
    returns its adapter_config.json."""
    acfg = check_adapter_base(ws, adapter)
    if not (Path(adapter) / "adapters.safetensors").is_file():
        raise TracerError(f"{adapter}: adapter directory has no adapters.safetensors")
    have, want = acfg.get("system_prompt", SYSTEM_PROMPT), ws.cfg.data.system_prompt  # older adapters: the default
    if same_system and have != want:
        raise TracerError(f"{adapter}: adapter was trained under the system message {have!r}, "
                          f"not data.system_prompt {want!r}")
    tags = acfg.get("option_tags", False)  # older adapters: untagged
    if same_system and tags != ws.cfg.data.option_tags:
        raise TracerError(f"{adapter}: adapter was trained {'with' if tags else 'without'} letter tags; "
                          f"set data.option_tags = {str(tags).lower()}")
    return acfg


def check_distinct(adapter: str | Path, adapter_out: str | Path) -> None:
    """Refuse to train into the directory the starting adapter is read from."""
    if Path(adapter).resolve() == Path(adapter_out).resolve():
        raise TracerError(f"{adapter_out}: the adapter to continue is read from there; choose another --adapter-out")


def adapter_contaminated(adapter: str | Path | None) -> bool:
    """Whether an adapter (or one it was continued from) was trained with eval overlap."""
    cfg_file = Path(adapter) / "adapter_config.json" if adapter else None
    if cfg_file is None or not cfg_file.is_file():
        return False
    return bool(runs.read_json(cfg_file).get("contaminated"))


def mark_contaminated(adapter: str | Path, contaminated: bool) -> None:
    """Record in the adapter's config that it was trained with eval overlap (when it was); under
    ``mlx.launch``, rank 0 (which wrote the adapter)."""
    if contaminated and not runs.is_follower():
        cfg_file = Path(adapter) / "adapter_config.json"
        runs.write_json(cfg_file, dict(runs.read_json(cfg_file), contaminated=True))


def copy_adapter(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in runs.ADAPTER_FILES:
        shutil.copy2(src / name, dst / name)


def rl_start(ws: Workspace, adapter: str | None, pool: str | None, allow: bool) -> tuple[str, str, list[dict], bool]:
    """What RSFT and GRPO start from: the adapter (default the run's SFT adapter), checked; the
    question pool (default the rsft split, generated if missing), its source path and rows; and
    whether the pool overlaps the eval split or the adapter is already contaminated."""
    adapter = adapter or str(runs.model_dir(ws.run_dir, "sft"))
    check_adapter(ws, adapter)
    if pool is None:
        ws.ensure_data(model_first=True)
    source = pool or str(ws.split_path("rsft"))
    rows = ws.load_split("rsft", source)
    contaminated = guard_leakage(ws, rows, source, allow=allow) or adapter_contaminated(adapter)
    return adapter, source, rows, contaminated
