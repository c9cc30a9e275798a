"""Run directories: layout, atomic JSON writes, meta.json and metrics.json bookkeeping."""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from tracer.errors import TracerError


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def umask() -> int:
    """The process's file mode creation mask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The mode a rewritten file keeps (its own), or a new one gets (0666 less the umask, as
    ``open`` would give it)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~umask()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``. The file
    gets the mode a plain write would give it: its own when it exists, else 0666 less the umask
    (``mkstemp`` alone makes 0600)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode(p))
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    p = Path(path)
    if not p.exists():
        if default is not None:
            return default
        raise TracerError(f"{p}: no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TracerError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise TracerError(f"{p}: not UTF-8 text") from None


def check_name(name: str, what: str) -> str:
    """``name`` when it names one directory entry (as run.name must): not empty, ``.`` or ``..``,
    no path separators; else a TracerError naming ``what`` (``--phase``, say)."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise TracerError(f"{what}: expected a name (not empty, '.' or '..', no path separators), got {name!r}")
    return name


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("tracer", "mlx", "mlx-lm", "transformers", "tokenizers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_run_dir(run_dir: Path, config_toml: str, force: bool, resume: bool) -> str:
    """What :func:`prepare_run` will do: ``"new"``, ``"resume"`` or ``"overwrite"``; raises when it would refuse."""
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return "new"
    if resume:
        if not (run_dir / "meta.json").exists():
            raise TracerError(f"{run_dir}: cannot resume: not a tracer run (no meta.json)")
        stored = run_dir / "config.toml"
        if stored.exists() and stored.read_text() != config_toml:
            raise TracerError(f"{run_dir}: cannot resume: the config differs from the run's config.toml "
                              "(use --force to start over)")
        return "resume"
    if not force:
        raise TracerError(f"{run_dir}: run directory exists; use --force to overwrite or --resume to continue it")
    if not (run_dir / "meta.json").exists():
        raise TracerError(f"{run_dir}: not a tracer run (no meta.json); --force deletes only run directories")
    return "overwrite"


def prepare_run(run_dir: Path, config_toml: str, phases: list[str], seed: int, action: str) -> Path:
    """Create, reopen or overwrite a run directory, as :func:`check_run_dir` decided (``action``)."""
    if action == "resume":
        return run_dir
    if action == "overwrite":
        shutil.rmtree(run_dir)
    return init_run(run_dir, config_toml, phases, seed)


def init_run(run_dir: Path, config_toml: str, phases: list[str], seed: int) -> Path:
    """Write a run's config.toml and a fresh meta.json (no checks: see ``prepare_run``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.toml", config_toml)
    write_json(
        run_dir / "meta.json",
        {
            "run_id": run_dir.name,
            "created_at": now(),
            "platform": f"{platform.system().lower()}-{platform.machine()}",
            "versions": versions(),
            "seed": seed,
            "phases": phases,
            "timings": {},
            "contaminated": False,
        },
    )
    return run_dir


def update_meta(run_dir: Path, **fields: Any) -> dict:
    meta = read_json(run_dir / "meta.json", default={})
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key].update(value)
        else:
            meta[key] = value
    write_json(run_dir / "meta.json", meta)
    return meta


def record_phase(run_dir: Path, phase: str, entry: dict, contaminated: bool = False) -> dict:
    """Add or replace one phase's entry in ``metrics.json``; contamination is sticky."""
    path = run_dir / "metrics.json"
    metrics = read_json(path, default={"run_id": run_dir.name, "contaminated": False, "phases": {}})
    metrics.setdefault("phases", {})[phase] = entry
    metrics["contaminated"] = bool(metrics.get("contaminated")) or contaminated
    write_json(path, metrics)
    return metrics


def recorded_phases(run_dir: Path) -> dict[str, dict]:
    """Phase name → its ``metrics.json`` entry (empty when nothing is recorded yet)."""
    return read_json(run_dir / "metrics.json", default={}).get("phases", {})


def finished_phases(run_dir: Path) -> set[str]:
    return set(recorded_phases(run_dir))


def episodes_path(run_dir: Path, phase: str) -> Path:
    return run_dir / "episodes" / f"{phase}.jsonl"


ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


def has_adapter(path: Path) -> bool:
    """Whether ``path`` holds a complete adapter (mlx-lm format)."""
    return all((path / name).is_file() for name in ADAPTER_FILES)


def model_dir(run_dir: Path, phase: str) -> Path:
    return run_dir / "models" / phase
