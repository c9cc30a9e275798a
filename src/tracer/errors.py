"""User-facing errors."""


class TracerError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class TrainingInterrupted(Exception):
    """Training was stopped (Ctrl-C) after saving a checkpoint at ``step``."""

    def __init__(self, step: int, checkpoint: str = ""):
        super().__init__(f"training interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint
