"""A minimal progress protocol: library code reports, the CLI renders (with rich)."""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def start(self, description: str, total: int | None) -> None:
        """Begin a task of ``total`` units (``None`` = unknown)."""

    def update(self, advance: int = 1, **info: Any) -> None:
        """Advance the current task; ``info`` (loss=..., tok_s=...) is shown beside the bar."""

    def stop(self) -> None:
        """End the current task."""

    def log(self, message: str) -> None:
        """Print a line above the bars."""


class NullProgress:
    """Reports nothing: the default for library calls and tests."""

    def start(self, description: str, total: int | None) -> None:
        pass

    def update(self, advance: int = 1, **info: Any) -> None:
        pass

    def stop(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class OneBar:
    """Relays several calls' updates to ``progress``, whose task the caller starts and stops: one
    bar for all of them (each call's own start and stop are dropped)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def start(self, description: str, total: int | None) -> None:
        pass

    def update(self, advance: int = 1, **info: Any) -> None:
        self.progress.update(advance, **info)

    def stop(self) -> None:
        pass

    def log(self, message: str) -> None:
        self.progress.log(message)
