"""tracer.backend: the backend is set up by the entry points, never as a side effect of an import;
the package's modules import each other without cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _fresh(code: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_importing_the_mlx_modules_sets_nothing_up():
    out = _fresh("from tracer import generate, model, train, workers, doctor\n"
                 "from tracer.blas import blas_info\nfrom tracer.heap import heap_info\n"
                 "print(blas_info()['status'], '|', heap_info())")
    assert out == "not attempted | not attempted"


def test_setup_before_mlx_loads_openblas_and_retains_the_heap():
    out = _fresh("from tracer import backend\ninfo = backend.setup()\nassert backend.setup() == info\n"
                 "import mlx.core as mx\na = mx.ones((64, 64))\nassert (a @ a)[0, 0].item() == 64\n"
                 "print(info['blas']['status'], '|', info['malloc'])")
    status, malloc = out.split(" | ")
    if sys.platform.startswith("linux"):
        assert status == "loaded" or "TRACER_NO_OPENBLAS" in status
    if __import__("platform").libc_ver()[0] == "glibc":
        assert malloc == "retained"


def _imports(path: Path) -> set[str]:
    """The tracer modules ``path`` imports at run time (in functions too; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles():
    modules = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (SRC / "tracer").rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m and i != "tracer"} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(stack[stack.index(n):] + [n])
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
