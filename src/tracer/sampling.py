"""What the decode loop does with each step's logits and tokens: pick the next token (greedy, or
temperature + top-p sampling from a seeded key) and decide when a row stops (an end-of-turn token,
the newline that ends the ANSWER line the reward reads, or ``max_tokens``); then finish its text.
"""

from __future__ import annotations

import weakref
from typing import Callable

import mlx.core as mx

from tracer import cpu_ops
from tracer.format import answer_end, cut_after_answer

# per tokenizer object (weakly: a new tokenizer that reuses a freed one's id gets its own entry)
_NEWLINE_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_token_ids(tokenizer) -> set[int]:
    """End-of-turn / eos ids: ``tokenizer.eos_token_ids`` (mlx-lm wrapper) plus ``<|im_end|>``."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for special in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        if special in vocab:
            ids.add(int(vocab[special]))
    return ids


def newline_tokens(tokenizer) -> frozenset[int]:
    """Ids whose text holds a newline: only after one of these can the ANSWER line newly end."""
    ids = _NEWLINE_TOKENS.get(tokenizer)
    if ids is None:
        # byte-level BPE writes the newline byte as "Ċ" in its token strings
        ids = _NEWLINE_TOKENS[tokenizer] = frozenset(i for t, i in tokenizer.get_vocab().items()
                                                     if "\n" in t or "Ċ" in t)
    return ids


def finish_text(tokenizer, tokens: list[int], stop_after_answer: bool = True) -> str:
    """Decode a completion (stop token already excluded), cut at the end of the ANSWER line read."""
    text = tokenizer.decode(tokens)
    return cut_after_answer(text) if stop_after_answer else text


class RowStopper:
    """Per-row stop decisions from Python-side token ids."""

    def __init__(self, tokenizer, max_tokens: int, stop_after_answer: bool):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop_ids = stop_token_ids(tokenizer)
        self.line_ends = newline_tokens(tokenizer) if stop_after_answer else frozenset()

    def push(self, out: list[int], tok: int) -> bool:
        """Record ``tok`` into ``out`` unless it is a stop token; True when the row is done."""
        if tok in self.stop_ids:
            return True
        out.append(tok)
        if tok in self.line_ends and answer_end(self.tokenizer.decode(out)) is not None:
            return True
        return len(out) >= self.max_tokens


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p`` (per row)."""
    sorted_lp = mx.sort(logprobs, axis=-1)
    sorted_p = mx.exp(sorted_lp)
    mass_above = mx.cumsum(sorted_p, axis=-1, reverse=True, inclusive=False)
    n_dropped = (mass_above >= top_p).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_lp, n_dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


NUCLEUS_CANDIDATES = 256  # tokens per row among which top-p sampling first looks for the nucleus


def sample_top_p(logprobs: mx.array, top_p: float, key: mx.array, k: int = NUCLEUS_CANDIDATES) -> mx.array:
    """Tokens ``(B,)`` drawn from each row's top-p nucleus. A row whose ``k`` most likely tokens,
    all but the least likely of them, already hold ``top_p`` of the mass has its nucleus inside
    them and draws among them: the same distribution as :func:`apply_top_p` over the whole
    vocabulary (but for tokens outside the candidates tied exactly with the nucleus' least likely
    one), found by an O(V) partition instead of a sort (docs/performance.md). The other
    rows (a flat distribution) draw over the whole vocabulary. Which rows those are is read back
    here, so the step's logits are computed before the decode loop goes on."""
    if k >= logprobs.shape[-1]:
        return mx.random.categorical(apply_top_p(logprobs, top_p), axis=-1, key=key)
    near_key, full_key = mx.random.split(key)
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    top = mx.take_along_axis(logprobs, idx, axis=-1)
    choice = mx.random.categorical(apply_top_p(top, top_p), axis=-1, key=near_key)
    tokens = mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    p = mx.exp(top)
    wide = [i for i, inside in enumerate((p.sum(axis=-1) - p.min(axis=-1) >= top_p).tolist()) if not inside]
    if wide:
        rows = mx.array(wide, dtype=mx.int32)
        tokens[rows] = mx.random.categorical(apply_top_p(logprobs[rows], top_p), axis=-1, key=full_key).astype(tokens.dtype)
    return tokens


def make_sampler(temperature: float, top_p: float, key: mx.array) -> Callable[[mx.array], mx.array]:
    """``logits (B, V) -> tokens (B,)``: argmax when temperature == 0, else seeded sampling.

    The sampler owns ``key`` and splits it once per call, so a fixed seed and the same
    batches give the same tokens.
    """
    if temperature <= 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    state = {"key": key}
    # on a CPU, cpu_ops' polynomial exp: a few times faster than mx.logsumexp over a whole vocabulary
    logsumexp = cpu_ops.logsumexp if cpu_ops.available() else lambda x: mx.logsumexp(x, axis=-1)

    def sample(logits: mx.array) -> mx.array:
        state["key"], sub = mx.random.split(state["key"])
        scaled = logits.astype(mx.float32) / temperature
        if top_p < 1.0:  # categorical takes unnormalised logits; only top-p needs log-probs
            return sample_top_p(scaled - logsumexp(scaled)[..., None], top_p, sub)
        return mx.random.categorical(scaled, axis=-1, key=sub)

    return sample
