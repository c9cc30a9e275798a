"""User-facing errors."""


class TracerError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class TrainingInterrupted(Exception):
    """Training was stopped (Ctrl-C) after saving a checkpoint at ``step``."""

    def __init__(self, step: int, checkpoint: str = ""):
        super().__init__(f"training interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


class PeerLost(Exception):
    """Under ``mlx.launch`` another rank stopped mid-training: this ``rank`` lost its connection to
    it and stopped at ``step``, rank 0 after saving a checkpoint there."""

    def __init__(self, rank: int, step: int, checkpoint: str = ""):
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "rank 0 keeps the checkpoints"
        super().__init__(f"rank {rank}: lost the connection to another rank, which stopped; "
                         f"training stopped at step {step}, {saved}")
        self.rank = rank
        self.step = step
        self.checkpoint = checkpoint
