"""The question splits: generated from the KG, written with a record of what made them, checked
against the config before any later command reuses them; and the leakage guard, which refuses
training rows that overlap the eval split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tracer import dataset, runs
from tracer.config import Config, DataConfig
from tracer.errors import TracerError
from tracer.kg import KG, load_kg
from tracer.progress import NullProgress, Progress

if TYPE_CHECKING:
    from tracer.pipeline.workspace import Workspace

SPLIT_FILES = {"train": "train.jsonl", "rsft": "rsft.jsonl", "eval": "eval.jsonl", "eval_shuffled": "eval_shuffled.jsonl"}
SETTINGS_FILE = "splits.json"


def split_path(cfg: Config, split: str) -> Path:
    return Path(cfg.data.out_dir) / SPLIT_FILES[split]


def _digest(path: str | None) -> str | None:
    """SHA-256 of a file's content (a JSON file's data, not its formatting); None when absent."""
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return None
    raw = p.read_bytes()
    try:
        raw = json.dumps(json.loads(raw), sort_keys=True).encode()
    except ValueError:
        pass
    return hashlib.sha256(raw).hexdigest()


def file_record(path: str | Path) -> dict:
    """A split file's row count (its non-blank lines) and SHA-256, as ``splits.json`` records them."""
    raw = Path(path).read_bytes()
    return {"rows": sum(1 for line in raw.split(b"\n") if line.strip()), "sha256": hashlib.sha256(raw).hexdigest()}


def check_split_file(path: str | Path) -> None:
    """Refuse a split file (``train.jsonl``, ``eval.jsonl``, ...) that no longer matches the row
    count and SHA-256 its directory's ``splits.json`` recorded when ``tracer data`` wrote it (cut
    short, say). Files without a record (other files, splits older than the record) pass."""
    p = Path(path)
    split = next((s for s, name in SPLIT_FILES.items() if name == p.name), None)
    record_file = p.parent / SETTINGS_FILE
    if split is None or not p.is_file() or not record_file.is_file():
        return
    record = runs.read_json(record_file)
    want = record.get("files", {}).get(split) if isinstance(record, dict) and isinstance(record.get("files"), dict) else None
    if not isinstance(want, dict):
        return
    have = file_record(p)
    if have == {"rows": want.get("rows"), "sha256": want.get("sha256")}:
        return
    if have["rows"] != want.get("rows"):
        what = f"it has {have['rows']} rows, {SETTINGS_FILE} recorded {want.get('rows')}"
    else:
        what = f"its content differs from the SHA-256 {SETTINGS_FILE} recorded"
    raise TracerError(f"{p}: changed since `tracer data` wrote it ({what}); remake the splits with "
                      "`tracer data -c CONFIG`")


def data_settings(cfg: Config) -> dict:
    """What the splits are a function of: the KG's (and types file's) content and every [data]
    knob that shapes them."""
    return {"kg_sha256": _digest(cfg.data.kg), "types_sha256": _digest(cfg.data.types),
            **cfg.data.model_dump(exclude={"kg", "types", "out_dir", "shuffled_eval"})}


def load_graph(cfg: Config) -> KG:
    """``data.kg`` with ``data.types``."""
    return load_kg(cfg.data.kg, cfg.data.types)


class _Stages:
    """Renders question generation's ``(stage, done, total)`` reports on a :class:`Progress`."""

    def __init__(self, progress: Progress):
        self.progress, self.stage, self.done = progress, None, 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.progress.start(stage, total)
            self.stage, self.done = stage, 0
        self.progress.update(done - self.done)
        self.done = done


def sft_budget_warning(cfg: Config, n_train: int) -> str | None:
    """A warning when SFT sees fewer examples than the training split holds (each seen < once)."""
    seen = cfg.sft.iters * cfg.sft.batch_size
    if n_train <= seen:
        return None
    return (f"train has {n_train:,} questions, but SFT trains on {seen:,} examples (sft.iters x sft.batch_size): "
            f"{100 * seen / n_train:.0f}% of a pass; raise sft.iters or lower data.min_edge_coverage / train_per_hop")


def excluded_keys(cfg: Config) -> frozenset:
    """Path keys of the questions in ``data.exclude``'s files: no generated question may take them."""
    return frozenset(dataset.path_key(r) for f in cfg.data.exclude for r in dataset.load_examples(f))


def make_data(cfg: Config, kg: KG | None = None, progress: Progress | None = None) -> dict:
    """Generate the question splits from the KG (``kg``, or ``data.kg`` loaded) and write them;
    returns paths and the summary (its warnings include :func:`sft_budget_warning`).

    ``splits.json`` beside them records :func:`data_settings`, so later commands can tell
    whether the files still match their config, and each file's row count and SHA-256
    (:func:`file_record`), so they can tell whether a file changed since (:func:`check_split_file`).
    """
    runs.check_writable(cfg.data.out_dir, "the splits")
    kg = kg or load_graph(cfg)
    progress = progress or NullProgress()
    splits = dataset.generate_splits(kg, cfg.data, excluded_keys(cfg), progress=_Stages(progress))
    progress.stop()
    paths = dataset.write_splits(splits, cfg.data.out_dir)
    files = {split: file_record(path) for split, path in paths.items()}
    runs.write_json(Path(cfg.data.out_dir) / SETTINGS_FILE, dict(data_settings(cfg), files=files))
    summary = dataset.summarize(splits, kg, cfg.data)
    budget = sft_budget_warning(cfg, len(splits["train"]))
    if budget:
        summary["warnings"].append(budget)
    return {"paths": {k: str(v) for k, v in paths.items()}, "summary": summary}


def missing_splits(cfg: Config) -> list[str]:
    """The splits the config needs that are not on disk (what :func:`ensure_data` would make)."""
    needed = ["train", "rsft", "eval"] + (["eval_shuffled"] if cfg.data.shuffled_eval else [])
    return [s for s in needed if not split_path(cfg, s).exists()]


def ensure_data(cfg: Config, kg: KG | None = None) -> dict | None:
    """Generate the splits if any of them is missing; returns the summary when it generated.

    Splits made under other [data] settings (or another KG) are refused, not silently reused.
    Splits without ``splits.json`` (written before it existed) are taken as they are.
    """
    if missing_splits(cfg):
        return make_data(cfg, kg)
    stored_file = Path(cfg.data.out_dir) / SETTINGS_FILE
    if stored_file.is_file():
        stored, now = runs.read_json(stored_file), data_settings(cfg)
        if not isinstance(stored, dict):
            raise TracerError(f"{stored_file}: expected a JSON object; remake the splits with `tracer data -c CONFIG`")
        default = DataConfig().model_dump()  # a knob newer than the record: its default was in force
        changed = [k for k in now if stored.get(k, default.get(k)) != now[k]]
        if changed:
            what = ", ".join("the KG" if k == "kg_sha256" else f"data.{k}" for k in changed)
            raise TracerError(f"{cfg.data.out_dir}: the splits there were made under other settings ({what} differ); "
                              "remake them with `tracer data -c CONFIG` or set data.out_dir to a new directory")
    return None


# ------------------------------------------------------------------------------ leakage guard


def eval_overlap(train_rows: list[dict], eval_rows: list[dict]) -> list[str]:
    """Ids of training rows whose id or path (start, relation chain, answer) is in the eval split,
    or that ask what an eval question asks (the same start and chain, another answer: on a
    many-to-many graph its frontier trace is the eval question's), or pass through it (a longer
    chain that starts with the eval question's: its trace reaches the eval answer on the way).

    A row that names no relations is matched by its entity chain instead.
    """
    eval_ids = {r["id"] for r in eval_rows}
    eval_keys = {dataset.path_key(r) for r in eval_rows}
    eval_asked = {dataset.asked(k) for k in eval_keys if k[1]}
    eval_chains = {tuple(r["path_star"]["entities"]) for r in eval_rows}

    def leaks(r: dict) -> bool:
        key = dataset.path_key(r)
        near = dataset.passes_through(key, eval_asked) if key[1] else tuple(r["path_star"]["entities"]) in eval_chains
        return r["id"] in eval_ids or key in eval_keys or near

    return [r["id"] for r in train_rows if leaks(r)]


def guard_leakage(ws: Workspace, rows: list[dict], source: str, *, allow: bool) -> bool:
    """Refuse training rows that overlap the eval split; returns True when the run is contaminated.

    With no eval split on disk yet, the one the config would make (and a later ``tracer eval``
    would evaluate on) is generated in memory to compare against; where the config can make none,
    there is nothing to leak into.
    """
    eval_file, where = ws.split_path("eval"), ""
    if eval_file.exists():
        eval_rows = ws.load_split("eval")
    else:
        exclude = excluded_keys(ws.cfg)
        try:
            eval_rows, where = dataset.generate_splits(ws.kg, ws.cfg.data, exclude)["eval"], " (not made yet)"
        except TracerError:
            return False
    overlap = eval_overlap(rows, eval_rows)
    if not overlap:
        return False
    if not allow:
        raise TracerError(
            f"{source}: {len(overlap)} training examples overlap the eval split {eval_file}{where} "
            f"(first: {overlap[0]}: its id, its path, or its start and relation chain); refusing to train "
            "on eval questions (--allow-eval-overlap overrides)"
        )
    return True
