"""Reading run directories: ``meta.json``, ``metrics.json``, ``config.toml``, episodes and the GRPO
step log, each error naming the file (pure Python)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

from tracer.errors import TracerError
from tracer.runs import read_json


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Load a run directory → {"dir", "name", "meta", "metrics", "config"}.

    A run with ``meta.json`` but no ``metrics.json`` is valid (every planned phase pending).
    Raises ``TracerError`` for a missing directory, a directory with neither file, or bad JSON/TOML.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise TracerError(f"{d}: no such run directory")
    meta_p, metrics_p, config_p = d / "meta.json", d / "metrics.json", d / "config.toml"
    if not meta_p.exists() and not metrics_p.exists():
        raise TracerError(f"{d}: not a tracer run (no meta.json or metrics.json)")
    meta = read_json(meta_p) if meta_p.exists() else {}
    metrics = read_json(metrics_p) if metrics_p.exists() else {}
    if not isinstance(meta, dict):
        raise TracerError(f"{d}/meta.json: invalid run metadata: expected a JSON object")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("phases", {}), dict):
        raise TracerError(f"{d}/metrics.json: invalid metrics: expected an object with a 'phases' object")
    metrics.setdefault("phases", {})
    config: dict[str, Any] = {}
    if config_p.exists():
        try:
            config = tomllib.loads(config_p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise TracerError(f"{d}/config.toml: invalid TOML: {e}") from None
    name = d.name or d.resolve().name
    return {"dir": str(d), "name": name, "meta": meta, "metrics": metrics, "config": config}


def load_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``load_run`` for each directory; names made unique (``parent/name``) when basenames clash."""
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    for r in runs:
        if names.count(r["name"]) > 1:
            p = Path(r["dir"]).resolve()
            r["name"] = f"{p.parent.name}/{p.name}"
    return runs


def as_run(run: dict[str, Any] | str | Path) -> dict[str, Any]:
    return run if isinstance(run, dict) else load_run(run)


def read_episodes(run: dict[str, Any], phase: str) -> list[dict[str, Any]]:
    """Rows of ``episodes/<phase>.jsonl``; TracerError naming the file if missing or malformed."""
    path = Path(run["dir"]) / "episodes" / f"{phase}.jsonl"
    if not path.is_file():
        avail = sorted(p.stem for p in (Path(run["dir"]) / "episodes").glob("*.jsonl"))
        hint = f" (available: {', '.join(avail)})" if avail else ""
        raise TracerError(f"{path}: no episodes for phase '{phase}'{hint}")
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TracerError(f"{path}:{i}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TracerError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    return rows


def grpo_log(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The GRPO step log of a run (``models/grpo/grpo_log.jsonl``), [] when it has none."""
    path = Path(run["dir"]) / "models" / "grpo" / "grpo_log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TracerError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    return rows
