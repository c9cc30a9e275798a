"""LoRA fine-tuning: completion-only loss, length-grouped batches, AdamW schedule, checkpoints.

The batch sequence and the dropout randomness of step ``s`` are pure functions of (seed, s), and
the optimizer state is checkpointed with the adapter, so ``resume`` reproduces an uninterrupted run.
Adapters are saved in mlx-lm's format (``adapters.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.base import create_causal_mask

from tracer import __version__, cpu_ops
from tracer.blas import share_cores
from tracer.config import LoraConfig, TrainConfig
from tracer.errors import TracerError, TrainingInterrupted  # noqa: F401  (re-exported)
from tracer.format import answer_text, encode_chat, shared_prefix_len
from tracer.progress import NullProgress, Progress
from tracer.runs import read_json

Example = tuple[list[int], int]  # token ids, index where the completion starts


# ------------------------------------------------------------------------------------- data


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_seq_len: int) -> list[Example]:
    """Chat-formatted prompt + completion + end-of-turn; over-long prompts lose their start."""
    eos = tokenizer.eos_token_id
    out = []
    for prompt, completion in pairs:
        p = encode_chat(tokenizer, prompt)
        c = tokenizer.encode(completion, add_special_tokens=False) + [eos]
        c = c[: max_seq_len - 1]
        p = p[max(0, len(p) - (max_seq_len - len(c))):]
        out.append((p + c, len(p)))
    return out


def answer_indices(tokenizer, pairs: list[tuple[str, str]], examples: list[Example]) -> list[int]:
    """Index in each example's ids of the answer's first token (the completion after its last
    ``ANSWER:``, :func:`tracer.format.answer_text`), or -1 where the completion has none or
    truncation cut it off."""
    out = []
    for (_, completion), (ids, start) in zip(pairs, examples):
        text = answer_text(completion)
        tail = tokenizer.encode(text, add_special_tokens=False) if text is not None else []
        at = len(ids) - 1 - len(tail)  # the answer's tokens come right before the end-of-turn token
        out.append(at if tail and at >= start and ids[at:-1] == tail else -1)
    return out


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  hop_lens: list[int] | None = None, curriculum: bool = False) -> list[list[int]]:
    """One epoch of length-grouped batches (indices), deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if curriculum and hop_lens is not None:
        order.sort(key=lambda i: hop_lens[i])  # stable: shuffled within each hop length
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int, curriculum: bool = False,
            hop_lens: list[int] | None = None) -> list[list[int]]:
    """One epoch of batches of example indices: length-grouped (or 1-hop first with ``curriculum``)."""
    return epoch_batches([len(ids) for ids, _ in examples], batch_size, seed, epoch, hop_lens, curriculum)


def batch_for_step(step: int, lengths: list[int], batch_size: int, seed: int,
                   hop_lens: list[int] | None, curriculum: bool) -> list[int]:
    per_epoch = math.ceil(len(lengths) / batch_size)
    epoch, index = divmod(step, per_epoch)
    return epoch_batches(lengths, batch_size, seed, epoch, hop_lens, curriculum)[index]


class Batch(NamedTuple):
    """One training batch: the rows after their shared prefix, right-padded."""
    inputs: mx.array  # (B, T) token ids after the prefix
    positions: mx.array  # flat indices into (B, T) whose next token is a loss target
    targets: mx.array  # the target token at each of ``positions``
    tokens: int  # real tokens in the batch, prefix counted once per row
    prefix: mx.array | None  # (1, P) token ids every row starts with, or None
    weights: mx.array | None = None  # per loss position: 0 padding, 1 (answer_weight at the answer); None: all 1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(examples: list[Example], share_prefix: bool = True, pad: tuple[int, int] | None = None,
            answers: list[int] | None = None, answer_weight: float = 1.0) -> Batch:
    """Right-padded rows and flat loss positions; the rows' common prompt prefix goes in ``prefix``.

    The prefix (system message, instructions, ...) is the same for every row, so the model runs
    it once with batch 1 and every row attends to its keys/values (see :func:`loss_fn`).
    ``pad = (w, p)`` rounds the row width up to a multiple of w and the loss positions up to a
    multiple of p (padding positions weigh 0), so a compiled step sees few distinct shapes.
    ``answers`` (see :func:`answer_indices`): the target at each row's index weighs ``answer_weight``.
    """
    P = 0
    if share_prefix and len(examples) > 1:
        P = min(shared_prefix_len([ids for ids, _ in examples]), min(start for _, start in examples) - 1)
        P = P if P >= 8 else 0  # a short prefix saves less than its extra pass costs
    width = max(len(ids) for ids, _ in examples) - 1 - P
    if pad:
        width = round_up(width, pad[0])
    inputs = np.zeros((len(examples), width), dtype=np.int32)
    positions, targets, w = [], [], []
    weigh = answers is not None and answer_weight != 1.0
    for row, (ids, start) in enumerate(examples):
        inputs[row, : len(ids) - 1 - P] = ids[P:-1]
        for t in range(start - 1, len(ids) - 1):  # position t predicts token t + 1
            positions.append(row * width + t - P)
            targets.append(ids[t + 1])
            w.append(answer_weight if weigh and t + 1 == answers[row] else 1.0)
    tokens = sum(len(ids) for ids, _ in examples)
    prefix = mx.array([examples[0][0][:P]], dtype=mx.int32) if P else None
    weights = None
    if pad or weigh:
        extra = round_up(len(positions), pad[1]) - len(positions) if pad else 0
        positions, targets = positions + [0] * extra, targets + [0] * extra
        weights = mx.array(w + [0.0] * extra)
    return Batch(mx.array(inputs), mx.array(positions, dtype=mx.int32), mx.array(targets, dtype=mx.int32),
                 tokens, prefix, weights)


# ------------------------------------------------------------------------------------ model


def add_lora(model: nn.Module, lora: LoraConfig | dict) -> None:
    """Freeze the model and put LoRA adapters on the configured projections.

    ``lora`` is our :class:`LoraConfig` or an mlx-lm adapter config dict (``num_layers`` +
    ``lora_parameters``, as read from an ``adapter_config.json``).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    cfg = lora_config(lora, model) if isinstance(lora, LoraConfig) else lora
    model.freeze()
    num_layers = len(model.layers) if cfg["num_layers"] < 0 else min(cfg["num_layers"], len(model.layers))
    linear_to_lora_layers(model, num_layers, cfg["lora_parameters"])


def lora_config(lora: LoraConfig, model: nn.Module) -> dict:
    """mlx-lm's adapter_config fields for our LoRA settings."""
    return {
        "fine_tune_type": "lora",
        "num_layers": len(model.layers) if lora.num_layers < 0 else lora.num_layers,
        "lora_parameters": {"rank": lora.rank, "scale": lora.alpha / lora.rank, "dropout": lora.dropout,
                            "keys": list(lora.keys)},
    }


def read_adapter_config(path: str | Path) -> dict:
    p = Path(path) / "adapter_config.json"
    if not p.is_file():
        raise TracerError(f"{path}: not an adapter directory (adapter_config.json missing)")
    return read_json(p)


def _logits(model: nn.Module, h: mx.array) -> mx.array:
    if getattr(model.args, "tie_word_embeddings", True):
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


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
        if not self.offset:
            return "causal" if N > 1 else None
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
        return nn.losses.cross_entropy(_logits(model, h), targets, reduction="mean")
    return (cpu_ops.cross_entropy(_logits(model, h), targets) * weights).sum() / weights.sum()


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


# ------------------------------------------------------------------------------ checkpoints


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def _write_adapter(model: nn.Module, out: Path, config: dict, base_model: str) -> None:
    tmp = out / ".adapters.tmp.safetensors"
    mx.save_safetensors(str(tmp), adapter_weights(model))
    os.replace(tmp, out / "adapters.safetensors")
    meta = dict(config, base_model=base_model, tracer_version=__version__)
    tmp_cfg = out / ".adapter_config.tmp.json"
    tmp_cfg.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_cfg, out / "adapter_config.json")


def _cannot_write(where: Path, exc: Exception, kept: str) -> TracerError:
    reason = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return TracerError(f"cannot write {where}: {reason}; {kept}")


def save_adapter(model: nn.Module, out_dir: str | Path, config: LoraConfig | dict, base_model: str) -> Path:
    """Write adapters.safetensors (trainable LoRA weights only) + adapter_config.json (mlx-lm format).
    A failed write (a full disk) removes its temporary files and raises TracerError."""
    if isinstance(config, LoraConfig):
        config = lora_config(config, model)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_adapter(model, out, config, base_model)
    except (OSError, RuntimeError) as exc:  # MLX reports a failed write as RuntimeError
        for name in (".adapters.tmp.safetensors", ".adapter_config.tmp.json"):
            (out / name).unlink(missing_ok=True)
        raise _cannot_write(out, exc, "files already there are unchanged") from None
    return out


CHECKPOINTS = ("checkpoint", "checkpoint.prev", "checkpoint.old")  # newest first; .old: older tracers


def save_checkpoint(model: nn.Module, optimizer, out_dir: Path, config: dict, base_model: str,
                    state: dict) -> Path:
    """``out_dir/checkpoint``: adapter, optimizer state and progress, swapped in atomically; the one
    it replaces stays as ``checkpoint.prev``, to resume from if the newer one is damaged. A failed
    write (a full disk) removes the partial checkpoint and raises TracerError."""
    final, prev, tmp = (out_dir / n for n in ("checkpoint", "checkpoint.prev", "checkpoint.tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_adapter(model, tmp, config, base_model)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(final, exc, "the last good checkpoint is intact") from None
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        final.rename(prev)
    tmp.rename(final)
    shutil.rmtree(out_dir / "checkpoint.old", ignore_errors=True)
    return final


def _read_checkpoint(ckpt: Path) -> tuple[dict, dict, dict]:
    """(adapter weights, optimizer arrays, state) of a checkpoint, all read and checked."""
    state = json.loads((ckpt / "state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json has no step")
    adapter, opt = mx.load(str(ckpt / "adapters.safetensors")), mx.load(str(ckpt / "optimizer.safetensors"))
    mx.eval(list(adapter.values()), list(opt.values()))
    return adapter, opt, state


def load_checkpoint(model: nn.Module, optimizer, out_dir: Path, log=None) -> dict:
    """Load the newest readable checkpoint of ``out_dir`` into ``model`` and ``optimizer``; returns
    its state. A damaged newest one (a truncated file) falls back to the previous one, said through
    ``log``; none readable raises TracerError naming why."""
    damaged = []
    for name in CHECKPOINTS:
        ckpt = out_dir / name
        if not ckpt.is_dir():
            continue
        try:
            adapter, opt, state = _read_checkpoint(ckpt)
        except (OSError, ValueError, RuntimeError) as exc:  # json's errors are ValueErrors
            damaged.append(f"{ckpt} is damaged ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")
            continue
        model.load_weights(list(adapter.items()), strict=False)
        optimizer.state = tree_unflatten(list(opt.items()))
        if damaged and log:
            log(f"{damaged[0]}; resuming from {ckpt.name} at step {state['step']}")
        return state
    if damaged:
        raise TracerError(f"{'; '.join(damaged)}; no checkpoint to resume from")
    raise TracerError(f"{out_dir}: no checkpoint to resume from")


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


class TrainStep:
    """``step(batch) -> loss``: loss, gradients, clipping and the AdamW update. ``compiled``: the
    whole step as one ``mx.compile`` graph (traced again per batch shape) over the model with
    :mod:`tracer.cpu_ops`' layers; batches then come padded (``collate(pad=COMPILED_PAD)``)."""

    def __init__(self, model: nn.Module, optimizer, grad_clip: float, compiled: bool):
        self.compiled = compiled
        loss_and_grad = nn.value_and_grad(model, loss_fn)

        def step(*arrays):
            loss, grads = loss_and_grad(model, *arrays)
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

    def __call__(self, b: Batch) -> mx.array:
        arrays = [b.inputs, b.positions, b.targets]
        if b.prefix is not None or b.weights is not None:
            arrays.append(b.prefix if b.prefix is not None else mx.zeros((1, 0), dtype=mx.int32))
        if b.weights is not None:
            arrays.append(b.weights)
        return self._step(*arrays)


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
) -> dict:
    """LoRA-train ``model`` on (prompt, completion) pairs; writes the adapter to ``out_dir``."""
    if not train_pairs:
        raise TracerError("no training examples")
    progress = progress or NullProgress()
    out = Path(out_dir)
    mx.random.seed(cfg.seed)
    if init_adapter:
        adapter_cfg = {k: v for k, v in read_adapter_config(init_adapter).items()
                       if k in ("fine_tune_type", "num_layers", "lora_parameters")}
        add_lora(model, adapter_cfg)
        model.load_weights(str(Path(init_adapter) / "adapters.safetensors"), strict=False)
    else:
        adapter_cfg = lora_config(lora, model)
        add_lora(model, adapter_cfg)
    model.train()

    examples = encode_pairs(tokenizer, train_pairs, cfg.max_seq_len)
    val_examples = encode_pairs(tokenizer, val_pairs, cfg.max_seq_len) if val_pairs else []
    answers = answer_indices(tokenizer, train_pairs, examples) if cfg.answer_weight != 1.0 else None
    lengths = [len(ids) for ids, _ in examples]
    optimizer = optim.AdamW(learning_rate=schedule(cfg), weight_decay=cfg.weight_decay)
    start, losses, val_losses, tokens, earlier_s = 0, [], [], 0, 0.0
    if resume:
        state = load_checkpoint(model, optimizer, out, progress.log)
        start, losses, val_losses, tokens = state["step"], state["losses"], state["val_losses"], state["tokens"]
        earlier_s = state.get("wall_s", 0.0)  # training time before the interruption(s)

    def checkpoint(step: int) -> Path:
        wall_s = round(earlier_s + time.perf_counter() - t0, 2)
        return save_checkpoint(model, optimizer, out, adapter_cfg, base_model,
                               {"step": step, "losses": losses, "val_losses": val_losses, "tokens": tokens,
                                "wall_s": wall_s})

    progress.start("train", total=cfg.iters)
    progress.update(start)
    step_fn = TrainStep(model, optimizer, cfg.grad_clip, compiled=cfg.compile and cpu_ops.available(model))
    pad = COMPILED_PAD if step_fn.compiled else None
    t0, run_tokens = time.perf_counter(), 0
    # every weight (a Ctrl-C while mx.compile traces leaves placeholders in frozen ones too),
    # optimizer and random state before the running step, for a clean Ctrl-C
    snapshot = None
    try:
        for step in range(start, cfg.iters):
            idx = batch_for_step(step, lengths, cfg.batch_size, cfg.seed, hop_lens, cfg.curriculum)
            batch = collate([examples[i] for i in idx], cfg.share_prefix, pad,
                            None if answers is None else [answers[i] for i in idx], cfg.answer_weight)
            step_seed = cfg.seed * 1_000_003 + step  # dropout noise is a function of the step
            snapshot = (model.parameters(), tree_map(lambda x: x, optimizer.state), step_seed)
            mx.random.seed(step_seed)
            loss = step_fn(batch)
            mx.eval(loss, model.trainable_parameters(), optimizer.state)
            share_cores()  # nothing in flight here
            losses.append(loss.item())
            snapshot = None
            tokens += batch.tokens
            run_tokens += batch.tokens
            done = step + 1
            tok_s = run_tokens / (time.perf_counter() - t0)
            progress.update(1, loss=round(losses[-1], 4), tok_s=round(tok_s), lr=float(optimizer.learning_rate.item()))
            if val_examples and cfg.val_every and done % cfg.val_every == 0:
                model.eval()
                val_losses.append([done, evaluate_loss(model, val_examples, cfg.batch_size)])
                model.train()
                progress.log(f"step {done}: train loss {losses[-1]:.4f}, val loss {val_losses[-1][1]:.4f}")
            if done % cfg.save_every == 0 and done < cfg.iters:
                checkpoint(done)
    except KeyboardInterrupt:
        if snapshot is not None:  # stopped inside a step: roll back to the last finished one
            model.update(snapshot[0])
            optimizer.state = snapshot[1]
            mx.random.seed(snapshot[2])
        done = len(losses)
        path = checkpoint(done)
        progress.stop()
        raise TrainingInterrupted(done, str(path)) from None
    finally:
        cpu_ops.use_cpu_ops(model, False)
    progress.stop()
    checkpoint(cfg.iters)
    model.eval()
    save_adapter(model, out, adapter_cfg, base_model)
    wall = time.perf_counter() - t0
    return {
        "steps": cfg.iters,
        "final_loss": losses[-1] if losses else float("nan"),
        "losses": losses,
        "val_losses": val_losses,
        "tokens": tokens,
        "wall_s": round(earlier_s + wall, 2),  # across interruptions
        "tok_s": run_tokens / wall if wall > 0 else 0.0,
    }
