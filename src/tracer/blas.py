"""Preload OpenBLAS before the first ``import mlx`` (Linux CPU).

The mlx-cpu wheel links a generic reference BLAS (fp32 matmul ~8 GFLOP/s). Loading the
OpenBLAS shipped by the ``cmeel-openblas`` wheel with ``RTLD_GLOBAL`` first makes MLX's
``sgemm`` calls resolve to it (~50x faster). No mlx import here: this must run before it.
Set ``TRACER_NO_OPENBLAS=1`` to skip (for benchmarks).
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

_STATE: dict = {"attempted": False, "path": None, "reason": None, "gfortran": None}


def _candidates() -> list[str]:
    seen: list[str] = []
    for root in [*_site_dirs(), sys.prefix]:
        for pattern in ("cmeel.prefix/lib/libopenblas*.so*", "lib/libopenblas*.so*"):
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


def _load(path: str) -> None:
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        shim = _gfortran_shim() if "libgfortran" in str(e) else None
        if shim is None:
            raise
        _STATE["gfortran"] = shim
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def preload_openblas() -> str | None:
    """Load cmeel-openblas globally before mlx; return the library path or None (idempotent)."""
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
            _load(path)
        except OSError as e:
            errors.append(f"{os.path.basename(path)}: {e}")
            continue
        _STATE["path"] = str(Path(path))
        _STATE["reason"] = "loaded"
        return _STATE["path"]
    _STATE["reason"] = "; ".join(errors) if errors else "libopenblas not found (pip install cmeel-openblas)"
    warnings.warn(
        f"tracer: OpenBLAS not preloaded ({_STATE['reason']}); CPU matmuls will be slow",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def blas_info() -> dict:
    """What :func:`preload_openblas` did: ``{"openblas": path|None, "gfortran_shim": path|None, "status": str}``."""
    return {
        "openblas": _STATE["path"],
        "gfortran_shim": _STATE["gfortran"],
        "status": _STATE["reason"] if _STATE["attempted"] else "not attempted",
    }
