"""The workspace the pipeline stages share: built once per command, it holds the config, loads
its KG once, checks its splits once, and names the run directory and the base model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer import dataset, distributed, runs
from tracer.config import Config
from tracer.kg import KG
from tracer.pipeline import data
from tracer.progress import NullProgress, Progress

_UNCHECKED = object()


class _PullProgress:
    """:func:`tracer.model.resolve`'s ``(step, done, total)`` reports on a :class:`Progress`."""

    def __init__(self, progress: Progress):
        self.progress, self.step, self.done = progress, None, 0

    def __call__(self, step: str, done: int, total: int) -> None:
        if step != self.step:
            if self.step is not None:
                self.progress.stop()
            self.progress.start(step, total)
            self.step, self.done = step, 0
        self.progress.update(done - self.done)
        self.done = done


def default_run_dir(cfg: Config) -> Path:
    """``run.runs_dir / run.name``: where a command records unless it is told another directory."""
    return Path(cfg.run.runs_dir) / cfg.run.name


@dataclass
class Workspace:
    """What one command works in: its config, run directory (``run_dir``), the base model that
    overrides ``model.path`` (``model``) and where its stages report (``progress``)."""

    cfg: Config
    run_dir: Path
    model: str | None = None
    progress: Progress = field(default_factory=NullProgress)
    _kg: KG | None = field(default=None, init=False, repr=False)
    _data: Any = field(default=_UNCHECKED, init=False, repr=False)
    _model_dir: Path | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, cfg: Config, *, run_dir: str | Path | None = None, model: str | None = None,
             progress: Progress | None = None) -> Workspace:
        """The workspace of ``cfg``; ``run_dir`` defaults to :func:`default_run_dir`."""
        return cls(cfg, Path(run_dir) if run_dir else default_run_dir(cfg), model, progress or NullProgress())

    # -------------------------------------------------------------------------------- data

    @property
    def kg(self) -> KG:
        """``data.kg`` (with ``data.types``), loaded on first use."""
        if self._kg is None:
            self._kg = data.load_graph(self.cfg)
        return self._kg

    def ensure_data(self, model_first: bool = False) -> dict | None:
        """:func:`tracer.pipeline.data.ensure_data`, once: the first call's result is kept. Before
        it writes splits, it checks that their directory is writable and, with ``model_first``
        (the commands that go on to load the model), that the base model is there: the command
        would fail on it later, with the splits written. Under ``mlx.launch`` rank 0 writes them
        and the other ranks then read them."""
        if self._data is _UNCHECKED:
            self._data = distributed.rank_zero_first(lambda: self._make_data(model_first))
        return self._data

    def _make_data(self, model_first: bool) -> dict | None:
        if data.missing_splits(self.cfg):
            runs.check_writable(self.cfg.data.out_dir, "the splits (data.out_dir)")
            if model_first:
                self.check_model()
        return data.ensure_data(self.cfg, self.kg)

    def split_path(self, split: str) -> Path:
        return data.split_path(self.cfg, split)

    def load_split(self, split: str, path: str | Path | None = None) -> list[dict]:
        """The rows of ``split`` (or of the file ``path`` in its place), checked against the KG and,
        for a file ``tracer data`` wrote, against the row count and hash it recorded."""
        path = path or self.split_path(split)
        data.check_split_file(path)
        return dataset.load_examples(path, kg=self.kg, context=self.cfg.data.context)

    # ------------------------------------------------------------------------------ models

    def model_spec(self) -> str:
        return self.model or self.cfg.model.path

    def check_model(self) -> Path:
        """The base model's local directory, resolved once before any work (an unknown ``--model``
        fails here, not after the splits are written); an offline alias not pulled yet is pulled now."""
        if self._model_dir is None:
            from tracer import model as models

            report = _PullProgress(self.progress)
            self._model_dir = models.resolve(self.model_spec(), self.cfg.model.cache_dir, report)
            if report.step is not None:
                self.progress.stop()
        return self._model_dir

    def load_args(self, adapter: str | None = None) -> dict:
        """:func:`tracer.model.load` arguments for generation: the adapter merged into the weights."""
        return {"spec": self.model_spec(), "cache_dir": self.cfg.model.cache_dir, "adapter": adapter,
                "dtype": self.cfg.model.dtype, "fuse": True}

    def load_model(self):
        """The base model and its tokenizer (what training starts from: no adapter)."""
        from tracer import model as models

        return models.load(**self.load_args())

    def generation_pool(self, adapter: str | None = None):
        """A :class:`tracer.workers.Pool` of ``eval.workers`` processes for this model + adapter."""
        from tracer import workers

        return workers.Pool(self.load_args(adapter), workers.auto_workers(self.cfg.eval.workers))

    def check_budget(self, rows: list[dict], max_tokens: int, knob: str) -> None:
        """Warn (a line above the bars) when some of ``rows``' reference traces are longer than the
        token budget ``knob`` = ``max_tokens`` gives a completion: a model that writes such a trace
        runs out of tokens before its answer (long frontier traces on a dense graph do)."""
        from mlx_lm.utils import load_tokenizer

        traces = [r["ref"]["trace"] for r in rows if isinstance(r.get("ref", {}).get("trace"), str)]
        if not traces:
            return
        tokenizer = load_tokenizer(self.check_model())
        over = [n for n in (len(tokenizer.encode(t, add_special_tokens=False)) for t in traces) if n > max_tokens]
        if over:
            self.progress.log(f"warning: {len(over)} of {len(traces)} reference traces are longer than {knob} "
                              f"({max_tokens} tokens; the longest {max(over)}): raise {knob}")

    def base_model_id(self) -> str:
        """The base model's name as adapters record it (``base_model``)."""
        from tracer import model as models

        return models.model_id(self.model_spec())
