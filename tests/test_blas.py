"""The BLAS thread count results depend on: recorded in meta.json; a pinned count beside another
tracer process is warned about."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tracer import blas, runs

SRC = str(Path(__file__).parents[1] / "src")


def test_meta_json_records_the_blas_thread_counts(tmp_path):
    run = runs.init_run(tmp_path / "run", "", ["base"], 0)
    record = json.loads((run / "meta.json").read_text())["blas"]
    assert set(record) == {"openblas", "threads_used", "pinned", "cores"}
    assert record["threads_used"] == blas.threads_used() and record["cores"] == blas.cpu_cores()
    if blas.blas_info()["openblas"]:
        assert record["threads_used"] and all(t >= 1 for t in record["threads_used"])
    # counts seen by later processes are added, earlier ones kept
    meta = json.loads((run / "meta.json").read_text())
    meta["blas"]["threads_used"] = [97]
    (run / "meta.json").write_text(json.dumps(meta))
    runs.note_blas(run)
    assert json.loads((run / "meta.json").read_text())["blas"]["threads_used"] == sorted({97, *blas.threads_used()})


def _share_cores_in_a_child(tmp_path, env_threads: str | None) -> subprocess.CompletedProcess:
    """share_cores in a fresh process beside one other live registered 'tracer' process."""
    code = f"""
import os, subprocess, sys, time
from pathlib import Path
from tracer import blas
if blas.preload_openblas() is None:
    print("skip"); sys.exit(0)
reg = Path({str(tmp_path / "reg")!r})
other = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(0.2)
    reg.mkdir()
    (reg / str(other.pid)).write_text(blas._start_time(other.pid))
    print(blas.share_cores(0, reg)); print(blas.share_cores(0, reg))
    print(blas.blas_info()["pinned"])
finally:
    other.kill(); other.wait()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRACER_NO_OPENBLAS", *blas.THREAD_ENV)}
    env["PYTHONPATH"] = SRC
    if env_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = env_threads
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_a_pinned_thread_count_beside_another_process_is_warned_about_once(tmp_path):
    cores = blas.cpu_cores()
    r = _share_cores_in_a_child(tmp_path, str(cores))
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "skip":
        return
    assert r.stdout.split() == ["None", "None", f"OPENBLAS_NUM_THREADS={cores}"]  # the pinned count is kept
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, r.stderr
    assert f"OPENBLAS_NUM_THREADS={cores} is pinned while 2 tracer processes run on {cores} cores" in warnings[0]


def test_no_warning_when_the_cores_are_shared(tmp_path):
    r = _share_cores_in_a_child(tmp_path, None)
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() != "skip":
        assert "warning" not in r.stderr and r.stdout.split()[-1] == "None"
