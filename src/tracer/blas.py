"""Preload OpenBLAS before the first ``import mlx`` (Linux CPU).

The mlx-cpu wheel links a generic reference BLAS. Loading an OpenBLAS with ``RTLD_GLOBAL`` first
makes MLX's ``cblas_sgemm`` calls resolve to it (``bench/bench_blas.py``; docs/performance.md). No mlx import here: this must run before it. Set ``TRACER_NO_OPENBLAS=1`` to skip (for
benchmarks).

Candidates, in order: the ``ngsolve-openblas`` wheel (a ``DYNAMIC_ARCH`` build: it picks its
kernels for the CPU it runs on), then ``cmeel-openblas`` and any other ``libopenblas`` beside
Python. cmeel's wheels are built for one CPU each (0.3.29: ZEN, 0.3.31: SKYLAKEX, which needs
AVX-512) and die with SIGILL at the first matmul elsewhere, so a fixed-target build is first
loaded privately, asked for its target, and made global only if this CPU has the instructions.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import os
import platform
import site
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

_STATE: dict = {"attempted": False, "path": None, "reason": None, "gfortran": None, "config": None}
_SHARE: dict = {"file": None, "next": 0.0, "threads": None, "used": set(), "warned": False}
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


_PATTERNS = (
    "ngsolve_openblas/libopenblas*.so*",
    "cmeel.prefix/lib/libopenblas*.so*",
    "lib/libopenblas*.so*",
)

# CPU flags (/proc/cpuinfo) each fixed x86-64 OpenBLAS target needs; a target not listed is refused
# (on x86-64: other architectures are loaded as they come).
_TARGET_FLAGS: dict[str, tuple[str, ...]] = {
    "SAPPHIRERAPIDS": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile"),
    "COOPERLAKE": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"),
    "SKYLAKEX": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"),
    "ZEN": ("avx2", "fma"),
    "HASWELL": ("avx2", "fma"),
    "SANDYBRIDGE": ("avx",),
    "NEHALEM": ("sse4_2",),
    "PRESCOTT": ("sse3",),
}


def cpu_flags() -> set[str]:
    """The instruction-set flags of the first CPU in ``/proc/cpuinfo`` (empty if unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def missing_instructions(config: str, flags: set[str]) -> list[str]:
    """CPU flags an OpenBLAS build (its ``openblas_get_config()`` string) needs and ``flags`` lacks.

    A ``DYNAMIC_ARCH`` build needs nothing; a fixed target not in the table is refused (``["?"]``).
    """
    words = config.upper().split()
    if "DYNAMIC_ARCH" in words:
        return []
    target = next((w for w in words if w in _TARGET_FLAGS), None)
    if target is None:
        return ["?"]
    return [f for f in _TARGET_FLAGS[target] if f not in flags]


def _config_of(lib: ctypes.CDLL) -> str:
    fn = getattr(lib, "openblas_get_config", None)
    if fn is None:
        return ""
    fn.restype = ctypes.c_char_p
    return (fn() or b"").decode(errors="replace")


def _candidates() -> list[str]:
    seen: list[str] = []
    for root in [*_site_dirs(), sys.prefix]:
        for pattern in _PATTERNS:
            for path in sorted(glob.glob(os.path.join(root, pattern)), key=len):
                if path not in seen:
                    seen.append(path)
    return seen


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # pragma: no cover
        pass
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return [d for d in dict.fromkeys(dirs) if d]


def _gfortran_shim() -> str | None:
    """Make ``libgfortran.so.5`` resolvable when the system lacks it.

    cmeel's libopenblas needs ``libgfortran.so.5`` (system package libgfortran5). Wheels such as
    mlx-cpu and numpy bundle a copy under a mangled soname; we copy one into the user cache with
    its soname rewritten to ``libgfortran.so.5`` (shorter, so it fits in place) and load it, so
    the dynamic loader finds it by soname when libopenblas asks.
    """
    for root in _site_dirs():
        for src in sorted(glob.glob(os.path.join(root, "*.libs", "libgfortran*.so*"))):
            name = os.path.basename(src).encode()
            data = Path(src).read_bytes()
            needle = b"\0" + name + b"\0"
            if data.count(needle) != 1 or len(name) < len(b"libgfortran.so.5"):
                continue
            patched = data.replace(needle, b"\0" + b"libgfortran.so.5".ljust(len(name), b"\0") + b"\0")
            cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tracer" / "lib"
            for folder in (cache, Path(tempfile.gettempdir()) / f"tracer-lib-{os.getuid()}"):
                dst = folder / f"{name.decode()}-as-libgfortran.so.5"
                try:
                    for dep in glob.glob(os.path.join(os.path.dirname(src), "libquadmath*.so*")):
                        ctypes.CDLL(dep)  # the copy's RPATH $ORIGIN no longer points at its deps
                    if not dst.is_file() or dst.read_bytes() != patched:
                        folder.mkdir(parents=True, exist_ok=True)
                        tmp = folder / f"{dst.name}.tmp{os.getpid()}"
                        tmp.write_bytes(patched)
                        os.replace(tmp, dst)
                    ctypes.CDLL(str(dst))
                except OSError:
                    continue
                return str(dst)
    return None


def _open(path: str, mode: int) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(path, mode=mode)
    except OSError as e:
        shim = _gfortran_shim() if "libgfortran" in str(e) else None
        if shim is None:
            raise
        _STATE["gfortran"] = shim
        return ctypes.CDLL(path, mode=mode)


def _load(path: str) -> str:
    """Load ``path`` privately, check its target against this CPU, then make it global.

    Returns the build's config string; raises OSError when it cannot load or would not run here.
    """
    config = _config_of(_open(path, ctypes.RTLD_LOCAL))
    missing = missing_instructions(config, cpu_flags()) if platform.machine() == "x86_64" else []
    if missing == ["?"]:
        raise OSError(f"built for a CPU target tracer does not know ({config or 'no config string'})")
    if missing:
        raise OSError(f"built for {config}, this CPU lacks {', '.join(missing)}")
    _open(path, ctypes.RTLD_GLOBAL)
    return config


def preload_openblas() -> str | None:
    """Load an OpenBLAS that runs on this CPU globally before mlx; return the library path or None (idempotent)."""
    if _STATE["attempted"]:
        return _STATE["path"]
    _STATE["attempted"] = True
    if os.environ.get("TRACER_NO_OPENBLAS", "") not in ("", "0"):
        _STATE["reason"] = "disabled by TRACER_NO_OPENBLAS"
        return None
    if not sys.platform.startswith("linux"):
        _STATE["reason"] = f"not needed on {sys.platform}"
        return None
    if "mlx" in sys.modules or "mlx.core" in sys.modules:
        _STATE["reason"] = "mlx was imported before preload_openblas()"
        warnings.warn(
            "tracer: mlx was imported before OpenBLAS could be preloaded; CPU matmuls use the slow "
            "reference BLAS (call tracer.blas.preload_openblas() before importing mlx)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    errors: list[str] = []
    for path in _candidates():
        try:
            _STATE["config"] = _load(path)
        except OSError as e:
            errors.append(f"{os.path.basename(path)}: {e}")
            continue
        _STATE["path"] = str(Path(path))
        _STATE["reason"] = "loaded"
        _SHARE["used"].add(_get_threads())  # what the first matmuls run with
        return _STATE["path"]
    _STATE["reason"] = "; ".join(errors) if errors else "libopenblas not found (pip install ngsolve-openblas)"
    warnings.warn(
        f"tracer: OpenBLAS not preloaded ({_STATE['reason']}); CPU matmuls will be slow",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def _proc(pid: int) -> tuple[str, str] | None:
    """A process's state and start time (``/proc/<pid>/stat`` fields 3 and 22; None when it is
    gone). The start time, with the pid, names the process uniquely."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _start_time(pid: int) -> str | None:
    proc = _proc(pid)
    return proc[1] if proc else None


def _registry() -> Path:
    return Path(tempfile.gettempdir()) / f"tracer-procs-{os.getuid()}"


def _unregister() -> None:
    if _SHARE["file"] is not None:
        Path(_SHARE["file"]).unlink(missing_ok=True)
        _SHARE["file"] = None


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def step_aside() -> None:
    """Leave the count of :func:`share_cores` while this process only waits (on its generation
    workers, say); its next ``share_cores`` call counts it again."""
    _unregister()
    _SHARE["next"] = 0.0


def live_processes(registry: Path | None = None) -> int:
    """Register this process (once) and count the registered tracer processes still running (not
    stopped)."""
    folder = registry or _registry()
    if _SHARE["file"] is None:
        folder.mkdir(parents=True, exist_ok=True)
        me = folder / str(os.getpid())
        me.write_text(_start_time(os.getpid()) or "")
        _SHARE["file"] = str(me)
        atexit.register(_unregister)
    n = 0
    for entry in folder.iterdir():
        proc = _proc(int(entry.name)) if entry.name.isdigit() else None
        try:
            alive = proc is not None and proc[1] == entry.read_text()
        except OSError:
            alive = False
        if not alive:
            entry.unlink(missing_ok=True)  # a process that died without cleaning up
        elif proc[0] not in ("T", "t"):  # a stopped process (SIGSTOP, Ctrl-Z) leaves its cores free
            n += 1
    return max(n, 1)


def _get_threads() -> int | None:
    if _STATE["path"] is None:
        return None
    return int(ctypes.CDLL(_STATE["path"]).openblas_get_num_threads())


def pinned_threads() -> tuple[str, int] | None:
    """The thread-count variable set in the environment (:data:`THREAD_ENV`) and its value, or None."""
    for key in THREAD_ENV:
        value = os.environ.get(key)
        if value:
            try:
                return key, int(value)
            except ValueError:
                return key, 0
    return None


def threads_used() -> list[int]:
    """Every OpenBLAS thread count this process's matmuls ran with so far (empty without OpenBLAS).
    Results depend on it in the last bits (a float sum's order), so runs record it."""
    return sorted(t for t in _SHARE["used"] if t)


def _warn_pinned(key: str, threads: int, processes: int, cores: int) -> None:
    """Once per process: a pinned thread count beside other tracer processes oversubscribes the cores."""
    if _SHARE["warned"]:
        return
    _SHARE["warned"] = True
    sys.stderr.write(
        f"warning: {key}={threads} is pinned while {processes} tracer processes run on {cores} cores: their "
        f"BLAS threads spin against each other (training fell from 13,600 to 520 tok/s when measured); unset "
        f"{key} to let tracer split the cores, or run one process at a time\n")
    sys.stderr.flush()


def share_cores(interval: float = 2.0, registry: Path | None = None) -> int | None:
    """Split this machine's cores evenly between the running tracer processes' OpenBLAS threads.

    Two processes that each run a thread per core spin-wait against each other
    (``bench/bench_contention.py`` measures it; docs/performance.md). Every ``interval`` seconds at
    most, this counts the live processes registered in a per-user temp folder and sets this one's
    thread count to cores // n (at least 1). Call it between computations only (nothing in
    flight). Does nothing when no OpenBLAS is loaded. A thread count set in the environment
    (:data:`THREAD_ENV`) is kept (and the process still counted, so the others make room); when
    the processes' threads then outnumber the cores, a warning says so, once. Returns the thread
    count in effect, or None when it is not tracer's to set.
    """
    if _STATE["path"] is None or not sys.platform.startswith("linux"):
        return None
    now = time.monotonic()
    if now < _SHARE["next"]:
        return _SHARE["threads"]
    _SHARE["next"] = now + interval
    cores = cpu_cores()
    try:
        n = live_processes(registry)
    except OSError:  # no writable temp folder: this process alone, as before
        n = 1
    pinned = pinned_threads()
    if pinned is not None:
        if n > 1 and pinned[1] * n > cores:
            _warn_pinned(pinned[0], pinned[1], n, cores)
        return None
    threads = max(1, cores // n)
    if threads != _SHARE["threads"]:
        ctypes.CDLL(_STATE["path"]).openblas_set_num_threads(threads)
        _SHARE["threads"] = threads
        _SHARE["used"].add(threads)
    return threads


def blas_info() -> dict:
    """What :func:`preload_openblas` did: ``{"openblas", "config", "threads", "threads_used",
    "pinned", "gfortran_shim", "status"}`` (``threads``: OpenBLAS's thread count now, None without
    OpenBLAS; ``threads_used``: :func:`threads_used`; ``pinned``: ``"VAR=n"`` when the environment
    sets the count)."""
    pinned = pinned_threads()
    return {
        "openblas": _STATE["path"],
        "config": _STATE["config"],
        "threads": _get_threads(),
        "threads_used": threads_used(),
        "pinned": f"{pinned[0]}={pinned[1]}" if pinned else None,
        "gfortran_shim": _STATE["gfortran"],
        "status": _STATE["reason"] if _STATE["attempted"] else "not attempted",
    }
