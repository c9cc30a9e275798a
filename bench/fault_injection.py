"""Fault injection: drive `tracer sft` on the tiny test model through the faults a long run meets,
and count those survived with nothing lost.

    .venv/bin/python bench/fault_injection.py                 # about 3-6 minutes on 2 cores
    .venv/bin/python bench/fault_injection.py --kills 10 --seed 1 --json faults.json

The tiny random llama of the tests (tests/tiny_model.py, on tests/fixtures/tiny.toml and
tiny_kg.json) is built in a scratch directory; each fault runs real `python -m tracer` processes
(this checkout's src/). Every child pins OPENBLAS_NUM_THREADS=1: results are bit-identical only at
the same thread count (docs/guarantees.md), and "nothing lost" is checked bit for bit.

Faults, each counted as survived when nothing was lost:

- kill -9 at a random moment of training (``--kills`` times: before the first checkpoint or
  between two), and once the moment a checkpoint's temporary directory appears (while it is
  written), then ``--resume`` (a fresh start when no checkpoint was saved yet): the adapter is
  bit-identical to an uninterrupted run's and no temporary file is left;
- a truncated checkpoint (the newest one's adapters.safetensors cut in half after a kill -9):
  ``--resume`` says it falls back to the previous checkpoint, and the adapter is bit-identical;
- a full disk: the adapter directory on a tmpfs too small for the third checkpoint (a private
  mount namespace, where ``unshare -m`` may mount; else ENOSPC simulated in mlx's writer): one
  line on stderr, exit 2, no temporary files left, the last good checkpoint intact, and
  ``--resume`` from it (on a disk with room) gives the uninterrupted adapter;
- a read-only output (--adapter-out of sft, --run-dir of eval, --data-dir of data: a read-only
  tmpfs, a mode 0555 directory, or /sys): one line, exit 2, nothing written, before any work;
- a concurrent second process: one into the same adapter directory is refused in one line while
  the first trains on to the uninterrupted adapter; two into separate directories at once both
  end bit-identical to the uninterrupted adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
ITERS, SAVE_EVERY = 24, 4


# ------------------------------------------------------------------------------------ set-up


def build(work: Path) -> Path:
    """The tiny model and its config in ``work``; returns the config file (run from ``work``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "src"))
    from tracer import backend

    backend.setup()
    from tiny_model import build_for_config

    from tracer.config import load_config, override

    (work / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "tiny_kg.json", work / "data" / "tiny_kg.json")
    cfg = override(load_config(FIXTURES / "tiny.toml"), data__kg=str(FIXTURES / "tiny_kg.json"),
                   data__out_dir=str(work / "model_data"))
    model = build_for_config(cfg, work / "model")
    text = (FIXTURES / "tiny.toml").read_text()
    text = text.replace('path = "tiny-model"', f'path = "{model}"\ncache_dir = "{work / "cache"}"')
    text = text.replace("save_every = 6", f"save_every = {SAVE_EVERY}")
    (work / "tiny.toml").write_text(text)
    return work / "tiny.toml"


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("GOTO_NUM_THREADS", "OMP_NUM_THREADS", "TRACER_NO_OPENBLAS")}
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e["OPENBLAS_NUM_THREADS"] = "1"
    return e


def tracer(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracer", *args]


def sft(out: Path | str, *extra: str) -> list[str]:
    return tracer("sft", "-c", "tiny.toml", "--iters", str(ITERS), "--adapter-out", str(out), *extra)


class Work:
    def __init__(self, root: Path):
        self.root = root

    def run(self, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.root, env=env(), capture_output=True, text=True, timeout=timeout)

    def start(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=self.root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


def weights(path: Path) -> bytes:
    return (path / "adapters.safetensors").read_bytes()


def same_adapter(a: Path, b: Path) -> bool:
    return (a / "adapters.safetensors").is_file() and weights(a) == weights(b)


def one_line(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


def leftovers(out: Path) -> list[str]:
    """Temporary files a failed write could leave: checkpoint.tmp, .*.tmp*."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name == "checkpoint.tmp" or ".tmp" in p.name)


def step_of(out: Path, name: str = "checkpoint") -> int | None:
    try:
        return json.loads((out / name / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = Path(tempfile.mkdtemp())
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=64k tmpfs "{probe}"'],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    finally:
        probe.rmdir()


def in_tmpfs(mount: Path, options: str, argv: list[str], save: Path | None = None) -> list[str]:
    """``argv`` in a private mount namespace with a tmpfs (``options``) on ``mount``; what the
    tmpfs holds at the end is copied to ``save`` (it goes with the namespace)."""
    copy = f'cp -a "{mount}"/. "{save}"/ 2>/dev/null; ' if save else ""
    script = f'mount -t tmpfs -o {options} tmpfs "{mount}" || exit 99; "$@"; rc=$?; {copy}exit $rc'
    return ["unshare", "-m", "sh", "-c", script, "sh", *argv]


# ------------------------------------------------------------------------------------ faults


class Faults:
    def __init__(self, w: Work, seed: int, mount: bool = True):
        self.w, self.rng = w, random.Random(seed)
        self.results: list[dict] = []
        self.mount = mount and can_mount()

    def record(self, kind: str, ok: bool, detail: str) -> None:
        self.results.append({"fault": kind, "survived": ok, "detail": detail})
        print(f"  {'ok  ' if ok else 'LOST'} {kind}: {detail}", flush=True)

    def reference(self) -> None:
        """The uninterrupted run every fault is compared with, and when its checkpoints appear."""
        t0 = time.monotonic()
        proc = self.w.start(sft("ref"))
        out = self.w.root / "ref"
        while not (out / "train_settings.json").exists() and proc.poll() is None:
            time.sleep(0.005)
        t1, seen = time.monotonic(), {}
        while proc.poll() is None:
            step = step_of(out)
            if step is not None and step not in seen:
                seen[step] = time.monotonic() - t1
            time.sleep(0.005)
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"the reference run failed:\n{err}")
        self.ref = out
        self.startup_s, self.train_s = t1 - t0, time.monotonic() - t1
        gaps = sorted(b - a for a, b in zip(seen.values(), list(seen.values())[1:])) or [self.train_s / 4]
        self.first_s, self.gap_s = seen.get(SAVE_EVERY, self.train_s / 4), gaps[len(gaps) // 2]
        ckpt = self.ref / "checkpoint"
        self.ckpt_bytes = sum(-(-p.stat().st_size // 4096) * 4096 for p in ckpt.iterdir())
        print(f"reference: {ITERS} steps, startup {self.startup_s:.1f}s, training {self.train_s:.1f}s "
              f"(first checkpoint after {self.first_s:.1f}s, then one every {self.gap_s:.2f}s); "
              f"a checkpoint takes {self.ckpt_bytes // 1024} KiB", flush=True)

    def finish(self, out: Path, tries: int = 4) -> tuple[bool, list[str]]:
        """Resume ``out`` (or start it anew when no checkpoint was saved) until training ends."""
        notes = []
        for _ in range(tries):
            has = any((out / n).is_dir() for n in ("checkpoint", "checkpoint.prev"))
            r = self.w.run(sft(out, "--resume") if has else sft(out))
            notes.append(("resume" if has else "restart") + f" rc={r.returncode}")
            if r.returncode == 0:
                return True, notes + [line for line in (r.stdout + r.stderr).splitlines() if "damaged" in line]
            if not one_line(r.stderr):
                notes.append("traceback or several lines: " + r.stderr.strip()[-300:])
                return False, notes
        return False, notes

    def kill9(self, i: int) -> None:
        """kill -9 at a random step: after the checkpoint before it appears, a random part of the
        time to the next one (a moment that missed the training is drawn again, not counted)."""
        for attempt in range(5):
            out = self.w.root / f"kill{i}_{attempt}"
            target = self.rng.randrange(ITERS - 1)
            before = target // SAVE_EVERY * SAVE_EVERY
            proc = self.w.start(sft(out))
            while proc.poll() is None and not (out / "train_settings.json").exists():
                time.sleep(0.002)
            while proc.poll() is None and before and (step_of(out) or 0) < before:
                time.sleep(0.002)
            delay = self.rng.uniform(0, self.first_s if before == 0 else self.gap_s)
            time.sleep(delay)
            if proc.poll() is None:
                break
            proc.communicate()
        else:
            self.record("kill -9", False, "every moment drawn missed the training")
            return
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        step = step_of(out)
        ok, notes = self.finish(out)
        same = ok and same_adapter(out, self.ref) and not leftovers(out)
        when = f"{delay:.2f}s after the checkpoint of step {before}" if before else \
            f"{delay:.2f}s into training, before the first checkpoint"
        self.record("kill -9", same, f"{when} (newest on disk: {step}); "
                                     f"{', '.join(notes)}; adapter {'bit-identical' if same else 'DIFFERS'}")

    def kill9_mid_write(self) -> None:
        """kill -9 the moment a checkpoint's temporary directory appears (while it is written)."""
        out = self.w.root / "kill_mid_write"
        proc = self.w.start(sft(out))
        tmp, caught = out / "checkpoint.tmp", False
        while proc.poll() is None:
            if tmp.exists() and (out / "checkpoint").exists():  # the second checkpoint or later
                proc.send_signal(signal.SIGKILL)
                caught = True
                break
        proc.communicate()
        left = tmp.exists()
        step = step_of(out)
        ok, notes = self.finish(out)
        same = ok and same_adapter(out, self.ref) and not leftovers(out)
        where = f"checkpoint.tmp {'left half-written' if left else 'gone'}" if caught else "no write caught in flight"
        self.record("kill -9", same and caught, f"while a checkpoint was written ({where}; checkpoint step {step}); "
                                                f"{', '.join(notes)}; adapter {'bit-identical' if same else 'DIFFERS'}")

    def truncated(self) -> None:
        out = self.w.root / "truncated"
        proc = self.w.start(sft(out))
        while step_of(out, "checkpoint.prev") is None and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        newest = out / "checkpoint" / "adapters.safetensors"
        if not newest.is_file() or step_of(out, "checkpoint.prev") is None:
            self.record("truncated checkpoint", False, "no two checkpoints before the kill")
            return
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        r = self.w.run(sft(out, "--resume"))
        said = next((line for line in (r.stdout + r.stderr).splitlines() if "is damaged" in line), "")
        same = r.returncode == 0 and "resuming from checkpoint.prev" in " ".join((r.stdout + r.stderr).split()) \
            and same_adapter(out, self.ref)
        self.record("truncated checkpoint", same, f"newest adapters.safetensors cut in half; resume rc={r.returncode}, "
                                                  f"fallback {'said' if said else 'NOT said'}; adapter "
                                                  f"{'bit-identical' if same else 'DIFFERS'}")

    def full_disk(self) -> None:
        out, save = self.w.root / "full", self.w.root / "full_saved"
        out.mkdir()
        save.mkdir()
        if self.mount:
            size = -(-int(self.ckpt_bytes * 2.5 + 65536) // 4096) * 4096
            how = f"tmpfs of {size // 1024} KiB"
            r = self.w.run(in_tmpfs(out, f"size={size}", sft(out), save))
        else:
            how = "simulated ENOSPC in mlx's writer"
            r = self.w.run([sys.executable, __file__, "--child-enospc", "3", "--", *sft(save)[3:]])
        step = step_of(save)
        clean = not leftovers(save)
        failed_cleanly = r.returncode == 2 and one_line(r.stderr) and "cannot write" in r.stderr
        resumed = self.w.root / "full_resumed"
        shutil.copytree(save, resumed)
        (resumed / ".tracer.lock").unlink(missing_ok=True)
        ok, notes = self.finish(resumed)
        same = ok and same_adapter(resumed, self.ref)
        good = failed_cleanly and clean and step == 2 * SAVE_EVERY and same
        line = next((ln for ln in r.stderr.splitlines() if ln.startswith("error")), r.stderr.strip()[-200:])
        self.record("full disk", good, f"{how}: rc={r.returncode}, {line!r}; temp files left: "
                                       f"{leftovers(save) or 'none'}; last good checkpoint step {step}; "
                                       f"{', '.join(notes)}; adapter {'bit-identical' if same else 'DIFFERS'}")

    def read_only(self) -> None:
        cases = [("sft --adapter-out", lambda ro: sft(ro / "adapter", "--model", "no-such-model")),
                 ("eval --run-dir", lambda ro: tracer("eval", "-c", "tiny.toml", "--run-dir", str(ro / "run"))),
                 ("data --data-dir", lambda ro: tracer("data", "-c", "tiny.toml", "--data-dir", str(ro / "splits")))]
        for name, argv_of in cases:
            fresh = self.w.root / "ro_data"
            cfg = (self.w.root / "tiny.toml").read_text().replace('out_dir = "data/tiny"', f'out_dir = "{fresh}"')
            (self.w.root / "ro.toml").write_text(cfg)
            if self.mount:
                ro = self.w.root / "ro_mount"
                ro.mkdir(exist_ok=True)
                argv = in_tmpfs(ro, "ro,size=64k", [a if a != "tiny.toml" else "ro.toml" for a in argv_of(ro)])
                how = "a read-only tmpfs"
            elif os.geteuid() != 0:
                ro = self.w.root / "ro_dir"
                ro.mkdir(exist_ok=True)
                ro.chmod(0o555)
                argv, how = [a if a != "tiny.toml" else "ro.toml" for a in argv_of(ro)], "a mode 0555 directory"
            else:
                ro, how = Path("/sys"), "/sys (read-only to root too)"
                argv = [a if a != "tiny.toml" else "ro.toml" for a in argv_of(ro)]
            t0 = time.monotonic()
            r = self.w.run(argv)
            took = time.monotonic() - t0
            ok = r.returncode == 2 and one_line(r.stderr) and "cannot write" in r.stderr and not fresh.exists()
            line = next((ln for ln in r.stderr.splitlines() if ln.startswith("error")), r.stderr.strip()[-200:])
            self.record("read-only output", ok, f"{name} on {how}: rc={r.returncode} after {took:.1f}s, {line!r}, "
                                                f"{'nothing written' if not fresh.exists() else 'SPLITS WRITTEN'}")

    def concurrent(self) -> None:
        # a second process into the same adapter directory
        out = self.w.root / "shared"
        first = self.w.start(sft(out))
        while not (out / "train_settings.json").exists() and first.poll() is None:
            time.sleep(0.005)
        second = self.w.run(sft(out))
        first.communicate(timeout=600)
        refused = second.returncode == 2 and one_line(second.stderr) and "in use by another tracer process" in second.stderr
        same = first.returncode == 0 and same_adapter(out, self.ref)
        line = next((ln for ln in second.stderr.splitlines() if ln.startswith("error")), second.stderr.strip()[-200:])
        self.record("concurrent process", refused and same,
                    f"same adapter directory: the second {'refused' if refused else 'NOT refused'} ({line!r}); "
                    f"the first's adapter {'bit-identical' if same else 'DIFFERS'}")
        # two at once into separate directories
        a, b = self.w.root / "twin_a", self.w.root / "twin_b"
        pa, pb = self.w.start(sft(a)), self.w.start(sft(b))
        _, err_a = pa.communicate(timeout=600)
        _, err_b = pb.communicate(timeout=600)
        same = pa.returncode == pb.returncode == 0 and same_adapter(a, self.ref) and same_adapter(b, self.ref)
        warned = "is pinned while" in err_a + err_b
        self.record("concurrent process", same, f"two at once in separate directories: rc {pa.returncode}/{pb.returncode},"
                                                f" both adapters {'bit-identical' if same else 'NOT identical'}"
                                                f"{'; the pinned-threads warning shown' if warned else ''}")


def child_enospc(nth: int, argv: list[str]) -> None:
    """Run the CLI with mlx's safetensors writer failing as a full disk does, from the ``nth``
    checkpoint on (each checkpoint writes two files: adapter, then optimizer state)."""
    sys.path.insert(0, str(ROOT / "src"))
    from tracer import backend

    backend.setup()
    import mlx.core as mx

    real, calls = mx.save_safetensors, {"n": 0}

    def full(path, arrays, *args, **kwargs):
        if "checkpoint.tmp" in str(path):
            calls["n"] += 1
            if calls["n"] > 2 * (nth - 1):
                Path(path).write_bytes(b"\0" * 4096)  # part of it got written
                raise RuntimeError("[write] Unable to write 65536 bytes to file.")
        return real(path, arrays, *args, **kwargs)

    mx.save_safetensors = full
    sys.argv = ["tracer", *argv]
    from tracer.cli import entry

    entry()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=6, help="kill -9 trials (each at a random moment)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed after)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--no-mount", action="store_true", help="simulate the full disk and the read-only output "
                    "even where a tmpfs could be mounted")
    ap.add_argument("--child-enospc", type=int, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_enospc:
        child_enospc(args.child_enospc, [a for a in args.rest if a != "--"])
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="tracer-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        build(work)
        f = Faults(Work(work), args.seed, mount=not args.no_mount)
        print(f"scratch: {work}; mounting a tmpfs: {'yes' if f.mount else 'no'}", flush=True)
        f.reference()
        for i in range(args.kills):
            f.kill9(i)
        f.kill9_mid_write()
        f.truncated()
        f.full_disk()
        f.read_only()
        f.concurrent()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    survived = sum(r["survived"] for r in f.results)
    print(f"\n{survived}/{len(f.results)} faults survived with nothing lost ({time.monotonic() - t0:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({"survived": survived, "faults": len(f.results), "seed": args.seed,
                                         "iters": ITERS, "save_every": SAVE_EVERY, "results": f.results}, indent=2) + "\n")
    sys.exit(0 if survived == len(f.results) else 1)


if __name__ == "__main__":
    main()
