"""Training examples and batches: (prompt, completion) pairs encoded in the chat format, the
answer's token, length-grouped batches that are a function of (seed, step), and collated rows
whose common prompt prefix is cut off to run once.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from tracer.format import SYSTEM_PROMPT, answer_text, encode_chat, shared_prefix_len

Example = tuple[list[int], int]  # token ids, index where the completion starts


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_seq_len: int,
                 system: str = SYSTEM_PROMPT) -> list[Example]:
    """Chat-formatted (``system`` message) prompt + completion + end-of-turn; over-long prompts lose
    their start."""
    eos = tokenizer.eos_token_id
    out = []
    for prompt, completion in pairs:
        p = encode_chat(tokenizer, prompt, system)
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
