"""Run directories: layout, atomic JSON writes, meta.json and metrics.json bookkeeping."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
import platform
import shutil
import stat
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

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
    except OSError as e:
        raise TracerError(f"{p}: cannot read: {e.strerror or e}") from None


def check_writable(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output directory ``path`` that cannot be created or written: a
    file in the way, no permission, a read-only file system. Probes with a temporary file in
    ``path`` or its nearest existing ancestor (removed at once); creates nothing. Returns ``path``."""
    p = Path(path)
    probe = p
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == p else f": {probe} is in the way"
        raise TracerError(f"{p}: cannot write {what}: not a directory{where}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".tracer-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = "" if probe == p else f" ({probe})"
        raise TracerError(f"{p}: cannot write {what}{where}: {e.strerror or e}") from None
    return p


LOCK_FILE = ".tracer.lock"
_HELD: dict[str, Any] = {}  # lock file -> its open file, for the directories this process holds


def _lock_holder(directory: Path) -> str | None:
    """The pid (as text, "?" when unknown) of another process holding ``directory``'s lock, or None."""
    import fcntl

    lock = directory / LOCK_FILE
    if str(lock) in _HELD or not lock.is_file():
        return None
    try:
        with open(lock, "r", encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "?"
    except OSError:
        return None
    return None


def _follower() -> bool:
    """A rank other than 0 of an ``mlx.launch`` job: rank 0 holds the locks and writes for all."""
    return os.environ.get("MLX_RANK", "0") != "0"


is_follower = _follower


def check_unlocked(directory: str | Path, what: str = "directory") -> None:
    """Refuse a directory another tracer process is working in (it holds its lock)."""
    if _follower():
        return
    pid = _lock_holder(Path(directory))
    if pid is not None:
        raise TracerError(f"{directory}: {what} in use by another tracer process (pid {pid}); "
                          "wait for it to finish or use another directory")


@contextmanager
def locked(directory: str | Path, what: str = "directory") -> Iterator[Path]:
    """Hold ``directory``'s lock (``.tracer.lock``, an advisory ``flock``) while the block runs:
    a second tracer process refuses the directory meanwhile. The kernel drops the lock when the
    process ends, killed or not, so no stale lock outlives it. Creates the directory."""
    import fcntl

    d = Path(directory)
    lock = d / LOCK_FILE
    if str(lock) in _HELD or _follower():  # this process holds it already (run -> sft), or rank 0 does
        yield d
        return
    check_unlocked(d, what)
    d.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise TracerError(f"{d}: {what} in use by another tracer process (pid {pid}); "
                          "wait for it to finish or use another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[str(lock)] = f
    try:
        yield d
    finally:
        _HELD.pop(str(lock), None)
        f.close()


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


# What tracer writes into a run directory (``run``, ``eval``, ``rsft``, ``consolidate``, ``grpo``)
# and into a training's adapter directory: ``run --force`` deletes these and nothing else.
RUN_FILES = ("config.toml", "meta.json", "metrics.json", "rsft_samples.jsonl", LOCK_FILE)
RUN_FILE_PATTERNS = (r"rsft_r\d+_samples\.partial\.jsonl", r"\..+\.tmp", r"\.tracer-probe-.*")
CHECKPOINTS = ("checkpoint", "checkpoint.prev", "checkpoint.old")  # newest first; .old: older tracers
CHECKPOINT_DIRS = (*CHECKPOINTS, "checkpoint.tmp")
TRAINING_SETTINGS = "train_settings.json"
ADAPTER_DIR_FILES = ("adapters.safetensors", "adapter_config.json", TRAINING_SETTINGS, "grpo_log.jsonl",
                     ".adapters.tmp.safetensors", ".adapter_config.tmp.json", LOCK_FILE)


def _ours(name: str, names: tuple[str, ...]) -> bool:
    import re

    return name in names or any(re.fullmatch(p, name) for p in RUN_FILE_PATTERNS)


def foreign_files(run_dir: Path) -> list[str]:
    """Paths (relative to ``run_dir``) of what tracer did not write there: the user's files."""
    out = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if entry.is_file() and _ours(name, RUN_FILES):
            continue
        if name == "episodes" and entry.is_dir() and not entry.is_symlink():
            out += [f"episodes/{e.name}" for e in sorted(entry.iterdir())
                    if not (e.is_file() and (e.name.endswith(".jsonl") or _ours(e.name, ())))]
            continue
        if name == "models" and entry.is_dir() and not entry.is_symlink():
            for model in sorted(entry.iterdir()):
                if not model.is_dir() or model.is_symlink():
                    out.append(f"models/{model.name}")
                    continue
                for e in sorted(model.iterdir()):
                    ok = (e.is_dir() and e.name in CHECKPOINT_DIRS) or (e.is_file() and _ours(e.name, ADAPTER_DIR_FILES))
                    if not ok:
                        out.append(f"models/{model.name}/{e.name}")
            continue
        out.append(name + ("/" if entry.is_dir() else ""))
    return out


def describe_contents(run_dir: Path) -> str:
    """``run_dir``'s entries as ``--force`` lists them before deleting: files by name, folders with
    how many files they hold."""
    parts = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            n = sum(1 for p in entry.rglob("*") if p.is_file())
            parts.append(f"{entry.name}/ ({n} file{'s' if n != 1 else ''})")
        else:
            parts.append(entry.name)
    return ", ".join(parts) or "nothing"


def _listed(paths: list[str], most: int = 6) -> str:
    more = len(paths) - most
    return ", ".join(paths[:most]) + (f" and {more} more" if more > 0 else "")


def check_run_dir(run_dir: Path, config_toml: str, force: bool, resume: bool) -> str:
    """What :func:`prepare_run` will do: ``"new"``, ``"resume"``, ``"adopt"`` (resume a directory
    another command made, without meta.json) or ``"overwrite"``; raises when it would refuse.

    ``--force`` deletes only what tracer wrote: a directory holding anything else is refused, its
    other files listed. A directory another command (``tracer sft``, say) wrote without meta.json
    is not a dead end: ``--resume`` continues from what it holds, ``--force`` starts over."""
    if not (run_dir.exists() and any(e.name != LOCK_FILE for e in run_dir.iterdir())):
        return "new"
    is_run = (run_dir / "meta.json").exists()
    if resume:
        if not is_run:
            foreign = foreign_files(run_dir)
            if foreign:
                raise TracerError(f"{run_dir}: cannot resume: not a tracer run (no meta.json) and it holds files "
                                  f"tracer did not write: {_listed(foreign)}")
            return "adopt"
        stored = run_dir / "config.toml"
        if stored.exists() and stored.read_text() != config_toml:
            raise TracerError(f"{run_dir}: cannot resume: the config differs from the run's config.toml "
                              "(use --force to start over)")
        return "resume"
    if not force:
        made = "" if is_run else " (written by another tracer command: no meta.json)"
        raise TracerError(f"{run_dir}: run directory exists{made}; use --resume to continue it or --force to "
                          f"start over (deleting {describe_contents(run_dir)})")
    foreign = foreign_files(run_dir)
    if foreign:
        raise TracerError(f"{run_dir}: --force deletes only what tracer wrote, and this directory holds files "
                          f"tracer did not write: {_listed(foreign)}; move them out (or choose another run.name)")
    return "overwrite"


def prepare_run(run_dir: Path, config_toml: str, phases: list[str], seed: int, action: str) -> Path:
    """Create, reopen or overwrite a run directory, as :func:`check_run_dir` decided (``action``):
    ``overwrite`` deletes the directory's contents (all of them tracer's, as checked; the lock a
    running command holds stays), ``adopt`` keeps them and makes the directory a run."""
    if action == "resume":
        return run_dir
    if action == "overwrite":
        for entry in run_dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
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
            "blas": blas_record(),
        },
    )
    return run_dir


def blas_record(earlier: dict | None = None) -> dict:
    """The BLAS settings results depend on, for meta.json: the library, the OpenBLAS thread counts
    this process's matmuls ran with (with ``earlier``'s: every count the run saw), the variable
    that pins them, if any, and the cores. A float sum's order, and so the last bits of every
    matmul, follow the thread count: runs are bit-identical only at the same counts."""
    from tracer.blas import blas_info, cpu_cores

    info = blas_info()
    seen = set((earlier or {}).get("threads_used") or []) | set(info["threads_used"])
    return {"openblas": os.path.basename(info["openblas"]) if info["openblas"] else None,
            "threads_used": sorted(seen), "pinned": info["pinned"], "cores": cpu_cores()}


def note_blas(run_dir: Path) -> None:
    """Add this process's BLAS thread counts to the run's meta.json (when it has one)."""
    meta_file = run_dir / "meta.json"
    if meta_file.is_file():
        meta = read_json(meta_file)
        if isinstance(meta, dict):
            record = blas_record(meta.get("blas") if isinstance(meta.get("blas"), dict) else None)
            if meta.get("blas") != record:
                write_json(meta_file, dict(meta, blas=record))


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
