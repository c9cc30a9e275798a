"""The workspace the pipeline stages share: built once per command, it holds the config, loads
its KG once, checks its splits once, and names the run directory and the base model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer import dataset
from tracer.config import Config
from tracer.kg import KG
from tracer.pipeline import data
from tracer.progress import NullProgress, Progress

_UNCHECKED = object()


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

    def ensure_data(self) -> dict | None:
        """:func:`tracer.pipeline.data.ensure_data`, once: the first call's result is kept."""
        if self._data is _UNCHECKED:
            self._data = data.ensure_data(self.cfg, self.kg)
        return self._data

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

    def base_model_id(self) -> str:
        """The base model's name as adapters record it (``base_model``)."""
        from tracer import model as models

        return models.model_id(self.model_spec())
