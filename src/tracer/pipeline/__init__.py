"""The pipeline: one module per stage, all working in one :class:`~tracer.pipeline.workspace.Workspace`.

- ``workspace``: the config, its KG (loaded once), its splits (checked once), the run directory
  and the base model; a command builds it once and hands it to every stage it runs.
- ``data``: generating the question splits, checking them against their config, the leakage guard.
- ``evaluate``: answering the eval questions and scoring the answers with the KG.
- ``finetune``: LoRA SFT, continued training, and the adapter bookkeeping they share.
- ``rsft``: rejection-sampling rounds, their samples drawn in resumable chunks.
- ``consolidate``: after RSFT, one pass on its winners plus short training questions.
- ``run``: the whole pipeline into one run directory.

Each stage is a function that does the work and returns data; the CLI prints it. MLX and the
modules built on it are imported inside the functions that need them, so ``tracer data`` and
``tracer report`` start fast and never load it.
"""
