"""Generation spread over processes, each holding its own copy of the model (MLX).

On a CPU, MLX runs every element-wise op (the ``exp`` in SiLU, softmax and the sampler's noise)
on one thread; only matmuls use the OpenBLAS threads. A decode step spends most of its time
outside the weight matmuls (element-wise ops, the small per-row attention products, per-op
overhead), so one process leaves the other cores idle much of the time. Several processes with a
share of the BLAS threads each keep the cores busy (measured in docs/performance.md,
bench/bench_workers.py). A :class:`Pool` of size 1 generates in this process.

Work is a list of jobs, each one :func:`tracer.generate.generate` call (its own prompts and
seed), handed to whichever worker is free. A job's completions do not depend on which worker
ran it, so results do not depend on the pool's size.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from typing import Any, Callable

from tracer import backend
from tracer.blas import THREAD_ENV, cpu_cores, share_cores, step_aside
from tracer.distributed import launched
from tracer.errors import TracerError
from tracer.progress import NullProgress, Progress

MAX_AUTO_WORKERS = 2  # only 2 cores were measured; more processes may help on bigger CPUs
MIN_PROMPTS = 32  # a worker process is started only for at least this many prompts (a full batch)


def auto_workers(requested: int = 0) -> int:
    """``requested`` if set, else one process per core on a CPU (at most
    :data:`MAX_AUTO_WORKERS`), and one on a GPU (which the processes would only share) or when a
    BLAS thread count is set in the environment (each worker would take that many threads).
    Under ``mlx.launch`` always one: each rank generates its share in its own process, the ranks
    already keep the cores busy."""
    if launched():
        return 1
    if requested:
        return requested
    import mlx.core as mx

    if mx.default_device() != mx.cpu or any(os.environ.get(k) for k in THREAD_ENV):
        return 1
    return max(1, min(cpu_cores(), MAX_AUTO_WORKERS))


class _Ticks:
    """A worker's progress, sent to the parent as ``("tick", worker, advance, tok_s)``."""

    def __init__(self, results, worker: int):
        self.results, self.worker = results, worker

    def start(self, description: str, total: int | None) -> None:
        pass

    def update(self, advance: int = 1, **info: Any) -> None:
        self.results.put(("tick", self.worker, advance, info.get("tok_s")))

    def stop(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass


def _serve(worker: int, parent: int, load_args: dict, tasks, results) -> None:
    """A worker process: load the model once, then run jobs until told to stop (None) or the
    ``parent`` process is gone."""
    backend.setup()  # before this process first imports MLX
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent until now
    if sys.platform.startswith("linux"):  # our parent thread killed outright takes us along (PR_SET_PDEATHSIG)
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    share_cores(0)  # registered from the start, so no sibling's first job counts itself alone
    from tracer import model as models
    from tracer.generate import generate

    try:
        lm, tokenizer = models.load(**load_args)
    except TracerError as e:  # a bad model or adapter: the parent reports it as the user's error
        results.put(("error", worker, "input", str(e)))
        return
    ticks = _Ticks(results, worker)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died before PR_SET_PDEATHSIG took hold
                return
            continue
        if task is None:
            return
        index, job = task
        share_cores(0)  # cores // live processes, counted now that every sibling is registered
        try:
            results.put(("done", worker, index, generate(lm, tokenizer, progress=ticks, **job)))
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
            results.put(("error", worker, "crash", traceback.format_exc(limit=4).strip()))
            return


class Pool:
    """``size`` generation workers for one model + adapter; use as a context manager.

    ``load_args`` are :func:`tracer.model.load`'s keyword arguments. A call whose jobs are worth
    one process only (:meth:`workers_for`: size 1, a single job, or few prompts) runs them here,
    the model loaded on first use; otherwise ``size`` worker processes are started, load the
    model in parallel, and stay up for later calls until :meth:`close`.
    """

    def __init__(self, load_args: dict, size: int = 1):
        self.load_args, self.size = load_args, max(1, size)
        self.used = 1  # processes the last call ran on (1: this one)
        self._local = None
        self._procs: list = []
        self._tasks = self._results = None

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)  # interrupted mid-job: do not wait for the job to end

    def local_model(self):
        """``(model, tokenizer)`` in this process, loaded once."""
        if self._local is None:
            from tracer import model as models

            self._local = models.load(**self.load_args)
        return self._local

    def map(self, jobs: list[dict], progress: Progress | None = None,
            on_done: Callable[[int, list[str]], None] | None = None) -> list[list[str]]:
        """Completions per job (``generate`` keyword arguments besides model, tokenizer and
        progress), in job order. ``progress`` advances once per completion; ``on_done(index,
        completions)`` runs in this process as each job finishes."""
        progress = progress or NullProgress()
        out: list[list[str] | None] = [None] * len(jobs)
        self.used = self.workers_for(sum(len(j["prompts"]) for j in jobs), len(jobs))
        if self.used == 1:
            from tracer.generate import generate

            lm, tokenizer = self.local_model() if jobs else (None, None)
            for i, job in enumerate(jobs):
                out[i] = generate(lm, tokenizer, progress=progress, **job)
                if on_done:
                    on_done(i, out[i])
            return out  # type: ignore[return-value]
        try:
            self._start(self.used)
            step_aside()  # this process only waits: the workers get its share of the cores
            for i, job in enumerate(jobs):
                self._tasks.put((i, job))
            rates: dict[int, float] = {}
            left, check_at = len(jobs), 0.0
            while left:
                if time.monotonic() >= check_at:  # a dead worker's job would never come back
                    self._check_alive()
                    check_at = time.monotonic() + 0.5
                try:
                    kind, worker, index, payload = self._results.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "tick":  # index: rows finished, payload: the worker's tokens/s
                    if payload is not None:
                        rates[worker] = payload
                    progress.update(index, tok_s=round(sum(rates.values()), 1))
                elif kind == "done":
                    out[index] = payload
                    left -= 1
                    if on_done:
                        on_done(index, payload)
                elif index == "input":
                    raise TracerError(payload)
                else:
                    raise RuntimeError(f"generation worker {worker} failed: {payload}")
        except BaseException:
            self.close(wait=False)  # jobs still queued or running must not leak into a later call
            raise
        share_cores(0)
        return out  # type: ignore[return-value]

    def workers_for(self, prompts: int, jobs: int) -> int:
        """How many processes ``jobs`` jobs of ``prompts`` prompts in all are worth: up to the
        pool's size, one per job, :data:`MIN_PROMPTS` prompts each; 1 means this process."""
        return max(1, min(self.size, jobs, prompts // MIN_PROMPTS))

    def generate(self, prompts: list[str], progress: Progress | None = None, **kwargs) -> list[str]:
        """:func:`tracer.generate.generate` over ``prompts`` (in input order), split into one
        shard per worker it is worth (:func:`shards`, by prompt length)."""
        parts = shards([len(p) for p in prompts], self.workers_for(len(prompts), len(prompts)))
        done = self.map([{"prompts": [prompts[i] for i in part], **kwargs} for part in parts], progress)
        out = [""] * len(prompts)
        for part, texts in zip(parts, done):
            for i, text in zip(part, texts):
                out[i] = text
        return out

    def _start(self, n: int) -> None:
        """Have ``n`` workers running (start the missing ones). SIGINT stays blocked while they
        start, so a Ctrl-C reaches only this process, not a child still importing."""
        ctx = mp.get_context("spawn")  # fork would copy MLX's and OpenBLAS's threads' state
        if self._tasks is None:
            self._tasks, self._results = ctx.Queue(), ctx.Queue()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            while len(self._procs) < n:
                p = ctx.Process(target=_serve, args=(len(self._procs), os.getpid(), self.load_args, self._tasks,
                                                     self._results), daemon=True)
                p.start()
                self._procs.append(p)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def _check_alive(self) -> None:
        """Raise if a worker died. One that exited cleanly (code 0) sent its error first."""
        dead = [p.exitcode for p in self._procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"a generation worker exited unexpectedly (exit code {', '.join(map(str, dead))})")

    def close(self, wait: bool = True) -> None:
        """Stop the workers (if any): idle ones end on their own, busy ones (or all, without
        ``wait``) are terminated."""
        procs, self._procs = self._procs, []
        for _ in procs:
            try:
                self._tasks.put(None)
            except (OSError, ValueError):
                break
        deadline = time.monotonic() + (5.0 if wait else 0.0)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.terminate()
                p.join(1.0)
        for q in (self._tasks, self._results):
            if q is not None:
                q.close()
                q.cancel_join_thread()
        self._tasks = self._results = None


def shards(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices of ``lengths`` dealt into ``parts`` shards of similar total work: longest first,
    round-robin, so every shard gets prompts of every length (each keeps ascending order)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [sorted(order[s::parts]) for s in range(min(parts, len(lengths)))]
