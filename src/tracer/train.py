"""LoRA fine-tuning: the completion-only loss (a shared prompt prefix run once), the AdamW
schedule, the training step (compiled on the CPU) and the loop with checkpoints and resume.

The batch sequence and the dropout randomness of step ``s`` are pure functions of (seed, s), and
the optimizer state is checkpointed with the adapter, so ``resume`` reproduces an uninterrupted run.
Examples and batches are :mod:`tracer.batching`'s; adapters and checkpoints :mod:`tracer.adapters`'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask

from tracer import cpu_ops
from tracer.adapters import attach_lora, load_checkpoint, save_adapter, save_checkpoint
from tracer.batching import Batch, Example, answer_indices, batch_for_step, collate, encode_pairs
from tracer.blas import share_cores
from tracer.config import LoraConfig, TrainConfig
from tracer.distributed import peer_lost, world
from tracer.errors import PeerLost, TracerError, TrainingInterrupted  # noqa: F401  (re-exported)
from tracer.format import SYSTEM_PROMPT
from tracer.heap import release_freed_pages
from tracer.model import head
from tracer.progress import NullProgress, Progress


# ------------------------------------------------------------------------------------- loss


def output_logits(model: nn.Module, h: mx.array) -> mx.array:
    """Logits of final hidden states ``h`` through the model's own head (:func:`tracer.model.head`:
    tied or not, Gemma 2's soft-cap included)."""
    return head(model)(h)


class PrefixKV:
    """A differentiable per-layer cache for training: the first call stores the shared prefix's
    keys/values (batch 1); later calls prepend them, broadcast, to every row's own."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values, self.offset = keys, values, keys.shape[2]
            return keys, values
        B = keys.shape[0]
        k = mx.broadcast_to(self.keys, (B, *self.keys.shape[1:]))
        v = mx.broadcast_to(self.values, (B, *self.values.shape[1:]))
        return mx.concatenate([k, keys], axis=2), mx.concatenate([v, values], axis=2)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if not self.offset:  # an array when asked for one (Gemma 2's attention takes no "causal")
            if N == 1:
                return None
            return create_causal_mask(N, window_size=window_size) if return_array else "causal"
        return create_causal_mask(N, self.offset, window_size=window_size)


def hidden(model: nn.Module, inputs: mx.array, prefix: mx.array | None = None) -> mx.array:
    """Final hidden states of ``inputs``; with ``prefix``, each row continues the shared prefix."""
    if prefix is None or prefix.shape[-1] == 0:  # (1, 0): none, in a compiled step's arguments
        return model.model(inputs)
    cache = [PrefixKV() for _ in model.layers]
    model.model(prefix, cache=cache)
    return model.model(inputs, cache=cache)


def loss_fn(model: nn.Module, inputs: mx.array, positions: mx.array, targets: mx.array,
            prefix: mx.array | None = None, weights: mx.array | None = None) -> mx.array:
    """Mean cross-entropy over completion tokens; the vocabulary projection runs only there.
    With ``weights`` (0 for padding positions), the weighted mean, via :func:`cpu_ops.cross_entropy`
    (the compiled CPU step's)."""
    h = hidden(model, inputs, prefix)
    h = h.reshape(-1, h.shape[-1])[positions]
    if weights is None:
        return nn.losses.cross_entropy(output_logits(model, h), targets, reduction="mean")
    return (cpu_ops.cross_entropy(output_logits(model, h), targets) * weights).sum() / weights.sum()


def full_loss(model: nn.Module, inputs: mx.array, positions: mx.array, targets: mx.array) -> mx.array:
    """Reference: the same loss via full logits (tests compare the two)."""
    logits = model(inputs)
    logits = logits.reshape(-1, logits.shape[-1])[positions]
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def schedule(cfg: TrainConfig):
    """Learning rate by step (0-based): linear warmup to the peak at step ``warmup``, then decay
    reaching ``min_lr_ratio`` x peak at the last step (``iters - 1``)."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(cfg.iters - cfg.warmup - 1, 1)
    if cfg.schedule == "cosine":
        main = optim.cosine_decay(peak, decay_steps, end)
    elif cfg.schedule == "linear":
        main = optim.linear_schedule(peak, end, decay_steps)
    else:
        main = lambda step: mx.array(peak, dtype=mx.float32)  # noqa: E731
    if cfg.warmup == 0:
        return main
    return optim.join_schedules([optim.linear_schedule(peak / cfg.warmup, peak, cfg.warmup), main], [cfg.warmup])

# ------------------------------------------------------------------------------------- loop


def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int) -> float:
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        b = collate([examples[i] for i in order[start: start + batch_size]])
        loss = loss_fn(model, b.inputs, b.positions, b.targets, b.prefix)
        total += loss.item() * b.positions.size
        count += b.positions.size
    return total / max(count, 1)


COMPILED_PAD = (8, 32)  # few distinct shapes to trace, for a few padding tokens (docs/performance.md)


def loss_weight(examples: list[Example], answers: list[int] | None, answer_weight: float) -> float:
    """The total weight of the examples' loss positions (what the batch's weighted mean divides by):
    one per completion token, ``answer_weight`` for the answer's."""
    total = float(sum(len(ids) - start for ids, start in examples))
    if answers is not None and answer_weight != 1.0:
        total += (answer_weight - 1.0) * sum(1 for a in answers if a >= 0)
    return total


class TrainStep:
    """``step(batch, share) -> loss``: loss, gradients, clipping and the AdamW update. ``compiled``:
    the whole step as one ``mx.compile`` graph (traced again per batch shape) over the model with
    :mod:`tracer.cpu_ops`' layers; batches then come padded (``collate(pad=COMPILED_PAD)``).

    Data-parallel (``size`` ranks): each rank's batch is its shard of the global batch, ``share``
    that shard's part of the global loss weight; its loss is scaled by ``share``, the gradients are
    summed over ranks before clipping and the returned loss is the global batch's, so N ranks follow
    one process's run on the whole batch (up to float rounding)."""

    def __init__(self, model: nn.Module, optimizer, grad_clip: float, compiled: bool, size: int = 1):
        self.compiled = compiled
        loss_and_grad = nn.value_and_grad(model, lambda m, share, *a: loss_fn(m, *a) * share * size)

        def step(share, *arrays):
            loss, grads = loss_and_grad(model, share, *arrays)
            if size > 1:
                grads = nn.average_gradients(grads)
                loss = mx.distributed.all_sum(loss) / size
            if grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, grad_clip)
            optimizer.update(model, grads)
            return loss

        # mlx-lm's layers for the plain step, also on a model that generation left on cpu_ops' ones
        # (they are slower uncompiled under mx.grad)
        cpu_ops.use_cpu_ops(model, compiled)
        if compiled:
            state = [model.state, optimizer.state, mx.random.state]
            step = mx.compile(step, inputs=state, outputs=state)
        self._step = step

    def __call__(self, b: Batch, share: float = 1.0) -> mx.array:
        arrays = [b.inputs, b.positions, b.targets]
        if b.prefix is not None or b.weights is not None:
            arrays.append(b.prefix if b.prefix is not None else mx.zeros((1, 0), dtype=mx.int32))
        if b.weights is not None:
            arrays.append(b.weights)
        return self._step(mx.array(share, dtype=mx.float32), *arrays)


@dataclass
class _Record:
    """What a training run has done: a checkpoint saves it, and a resume reads it back."""

    start: int = 0  # the step the run (re)started at
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    tokens: int = 0
    earlier_s: float = 0.0  # training time before the interruption(s)
    run_tokens: int = 0  # tokens since this (re)start
    t0: float = 0.0
    # every weight (a Ctrl-C while mx.compile traces leaves placeholders in frozen ones too),
    # optimizer and random state before the running step, for a clean Ctrl-C
    snapshot: tuple | None = None

    @classmethod
    def resumed(cls, state: dict) -> "_Record":
        return cls(state["step"], state["losses"], state["val_losses"], state["tokens"], state.get("wall_s", 0.0))

    def roll_back(self, model: nn.Module, optimizer) -> None:
        """After a Ctrl-C inside a step: back to the weights, optimizer and random state it started from."""
        if self.snapshot is not None:
            model.update(self.snapshot[0])
            optimizer.state = self.snapshot[1]
            mx.random.seed(self.snapshot[2])

    def state(self, step: int) -> dict:
        """A checkpoint's ``state.json``."""
        return {"step": step, "losses": self.losses, "val_losses": self.val_losses, "tokens": self.tokens,
                "wall_s": round(self.earlier_s + time.perf_counter() - self.t0, 2)}


def train(
    model: nn.Module,
    tokenizer,
    train_pairs: list[tuple[str, str]],
    cfg: TrainConfig,
    lora: LoraConfig,
    out_dir: str | Path,
    base_model: str,
    val_pairs: list[tuple[str, str]] | None = None,
    hop_lens: list[int] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    init_adapter: str | None = None,
    system: str = SYSTEM_PROMPT,
    tags: bool = False,
) -> dict:
    """LoRA-train ``model`` on (prompt, completion) pairs, chats under the ``system`` message (which
    the adapter records, with ``tags``: whether the prompts carry letter tags); writes the adapter
    to ``out_dir``.

    Under ``mlx.launch`` each rank trains on its share of every batch (:class:`TrainStep`); rank 0
    alone writes checkpoints and the adapter and reports progress. A Ctrl-C, or under ``mlx.launch``
    a rank that stops, ends the training with a checkpoint of the last finished step (:func:`stopped`)."""
    if not train_pairs:
        raise TracerError("no training examples")
    rank, size = world()
    progress = progress if progress is not None and rank == 0 else NullProgress()
    out = Path(out_dir)
    adapter_cfg = dict(attach_lora(model, lora, cfg.seed, init_adapter), system_prompt=system, option_tags=tags)
    model.train()
    examples, val_examples, answers, lengths = _encoded(tokenizer, train_pairs, val_pairs, cfg, system)
    full = sum(n >= cfg.max_seq_len for n in lengths)
    if full:
        progress.log(f"warning: {full} of {len(examples)} training examples reach max_seq_len ({cfg.max_seq_len} "
                     "tokens); longer ones lose the start of their prompt or the end of their trace")
    optimizer = optim.AdamW(learning_rate=schedule(cfg), weight_decay=cfg.weight_decay)
    rec = _Record.resumed(load_checkpoint(model, optimizer, out, progress.log)) if resume else _Record()

    def checkpoint(step: int) -> Path:
        if rank:
            return out / "checkpoint"
        return save_checkpoint(model, optimizer, out, adapter_cfg, base_model, rec.state(step))

    progress.start("train", total=cfg.iters)
    progress.update(rec.start)
    step_fn = TrainStep(model, optimizer, cfg.grad_clip, cfg.compile and cpu_ops.available(model), size)
    pad = COMPILED_PAD if step_fn.compiled else None
    rec.t0 = time.perf_counter()
    try:
        for step in range(rec.start, cfg.iters):
            batch, share = _batch(examples, lengths, answers, step, cfg, hop_lens, pad, rank, size)
            _train_step(model, optimizer, step_fn, batch, share, step, cfg.seed, rec)
            _after_step(model, optimizer, rec, batch.tokens, step + 1, cfg, val_examples, progress)
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.iters:
                checkpoint(step + 1)
    except (KeyboardInterrupt, RuntimeError) as exc:
        if not stops_training(exc):
            raise
        rec.roll_back(model, optimizer)
        path = checkpoint(len(rec.losses))
        progress.stop()
        raise stopped(exc, rank, len(rec.losses), path) from None
    finally:
        cpu_ops.use_cpu_ops(model, False)
    progress.stop()
    checkpoint(cfg.iters)
    model.eval()
    if rank == 0:
        save_adapter(model, out, adapter_cfg, base_model)
    return _summary(rec, cfg.iters, time.perf_counter() - rec.t0)


def stops_training(exc: BaseException) -> bool:
    """Whether ``exc`` ends a training with a checkpoint (:func:`stopped`): a Ctrl-C / SIGTERM, or
    under ``mlx.launch`` a rank that stopped (other errors propagate as they are)."""
    return isinstance(exc, KeyboardInterrupt) or peer_lost(exc)


def stopped(exc: BaseException, rank: int, step: int, path: Path) -> Exception:
    """What a training stopped by ``exc`` after ``step`` steps raises: :class:`PeerLost` when another
    rank stopped (rank 0 saved the checkpoint ``path``), else :class:`TrainingInterrupted`."""
    if peer_lost(exc):
        return PeerLost(rank, step, str(path) if rank == 0 else "")
    return TrainingInterrupted(step, str(path))


def _encoded(tokenizer, train_pairs: list[tuple[str, str]], val_pairs: list[tuple[str, str]] | None,
             cfg: TrainConfig, system: str) -> tuple[list[Example], list[Example], list[int] | None, list[int]]:
    """The training and validation examples, the answers' token indices (when ``answer_weight``
    weighs them) and the examples' lengths."""
    examples = encode_pairs(tokenizer, train_pairs, cfg.max_seq_len, system)
    val_examples = encode_pairs(tokenizer, val_pairs, cfg.max_seq_len, system) if val_pairs else []
    answers = answer_indices(tokenizer, train_pairs, examples) if cfg.answer_weight != 1.0 else None
    return examples, val_examples, answers, [len(ids) for ids, _ in examples]


def _batch(examples: list[Example], lengths: list[int], answers: list[int] | None, step: int, cfg: TrainConfig,
           hop_lens: list[int] | None, pad: tuple[int, int] | None, rank: int = 0, size: int = 1) -> tuple[Batch, float]:
    """Step ``step``'s batch (:func:`tracer.batching.batch_for_step`), this rank's shard of it
    collated, and the shard's share of the batch's loss weight."""
    idx = batch_for_step(step, lengths, cfg.batch_size, cfg.seed, hop_lens, cfg.curriculum)
    mine = idx[rank::size]
    if not mine:
        raise TracerError(f"sft.batch_size={cfg.batch_size} leaves rank {rank} of {size} without examples")
    pick = (lambda ids: None) if answers is None else (lambda ids: [answers[i] for i in ids])
    share = 1.0 if size == 1 else (loss_weight([examples[i] for i in mine], pick(mine), cfg.answer_weight)
                                   / loss_weight([examples[i] for i in idx], pick(idx), cfg.answer_weight))
    return collate([examples[i] for i in mine], cfg.share_prefix, pad, pick(mine), cfg.answer_weight), share


def _train_step(model: nn.Module, optimizer, step_fn: TrainStep, batch: Batch, share: float, step: int, seed: int,
                rec: _Record) -> None:
    """One optimizer step on ``batch``, its loss recorded; ``rec.snapshot`` holds what it started from."""
    step_seed = seed * 1_000_003 + step  # dropout noise is a function of the step
    rec.snapshot = (model.parameters(), tree_map(lambda x: x, optimizer.state), step_seed)
    mx.random.seed(step_seed)
    loss = step_fn(batch, share)
    mx.eval(loss, model.trainable_parameters(), optimizer.state)
    share_cores()  # nothing in flight here
    release_freed_pages()
    rec.losses.append(loss.item())
    rec.snapshot = None


def _after_step(model: nn.Module, optimizer, rec: _Record, tokens: int, done: int, cfg: TrainConfig,
                val_examples: list[Example], progress: Progress) -> None:
    """Count the step's tokens, report it, and every ``val_every`` steps the validation loss."""
    rec.tokens += tokens
    rec.run_tokens += tokens
    tok_s = rec.run_tokens / (time.perf_counter() - rec.t0)
    progress.update(1, loss=round(rec.losses[-1], 4), tok_s=round(tok_s), lr=float(optimizer.learning_rate.item()))
    if val_examples and cfg.val_every and done % cfg.val_every == 0:
        model.eval()
        rec.val_losses.append([done, evaluate_loss(model, val_examples, cfg.batch_size)])
        model.train()
        progress.log(f"step {done}: train loss {rec.losses[-1]:.4f}, val loss {rec.val_losses[-1][1]:.4f}")


def _summary(rec: _Record, steps: int, wall: float) -> dict:
    return {
        "steps": steps,
        "final_loss": rec.losses[-1] if rec.losses else float("nan"),
        "losses": rec.losses,
        "val_losses": rec.val_losses,
        "tokens": rec.tokens,
        "wall_s": round(rec.earlier_s + wall, 2),  # across interruptions
        "tok_s": rec.run_tokens / wall if wall > 0 else 0.0,
    }
