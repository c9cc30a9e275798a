"""Batched greedy / sampled generation with a KV cache and stop rules (MLX).

Prompts are raw user messages; :func:`tracer.format.encode_chat` wraps them in the tokenizer's chat
template (the same function training uses). Prompts are sorted by token length, left-padded, prefilled
with a causal + padding mask (mlx-lm's ``BatchKVCache``: per-row RoPE offsets, so every row sees
exactly the positions it would see alone) and decoded step by step. The token prefix every prompt
shares (system prompt) is prefilled once per call, and a prompt repeated within a prefill (K
samples of one question) once. A row stops at an end-of-turn / eos token, at the newline that ends
the ANSWER line the reward reads (when ``stop_after_answer``; the verdict is then the same as had
it run on) or at ``max_tokens`` (:mod:`tracer.sampling`); finished rows are dropped from the batch and cache, and waiting prompts take their places (continuous batching).
Each step is dispatched with ``mx.async_eval`` before the previous step's tokens are read back,
so Python bookkeeping overlaps the model's compute (not under top-p sampling, whose sampler reads
back which rows draw over the whole vocabulary: :func:`tracer.sampling.sample_top_p`).
"""

from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx
from mlx_lm.models import gemma2, llama

from tracer import cpu_ops
from tracer.blas import share_cores
from tracer.format import SYSTEM_PROMPT, encode_chat, shared_prefix_len
from tracer.model import head
from tracer.progress import NullProgress, Progress
from tracer.sampling import RowStopper, finish_text, make_sampler


# ---------------------------------------------------------------------------------------------
# Model steps
# ---------------------------------------------------------------------------------------------


def make_cache(model, left_padding: list[int], prefix_kv: list | None = None) -> list:
    """One mlx-lm ``BatchKVCache`` per layer for a left-padded batch.

    With ``prefix_kv`` (from :func:`prefix_cache`), every row's first ``P`` columns (its padding,
    then the shared prefix) are filled from the prefix keys/values, computed once.
    """
    from mlx_lm.models.cache import BatchKVCache

    caches = [BatchKVCache(left_padding) for _ in model.layers]
    if not prefix_kv:
        return caches
    P = prefix_kv[0][0].shape[2]
    pad = mx.array(left_padding, dtype=mx.int32)
    # row i, column c holds prefix token c - pad_i (c < pad_i is padding, masked anyway)
    idx = mx.maximum(mx.arange(P, dtype=mx.int32)[None, :] - pad[:, None], 0)
    for c, (k, v) in zip(caches, prefix_kv):
        keys = k[0][:, idx].transpose(1, 0, 2, 3)
        values = v[0][:, idx].transpose(1, 0, 2, 3)
        c.state = (keys, values, c.offset + P, c.left_padding, P)
    return caches


def prefix_cache(model, prefix: list[int]) -> list[tuple[mx.array, mx.array]]:
    """Per-layer ``(keys, values)`` of shape ``(1, H, P, D)`` for the shared ``prefix``."""
    from mlx_lm.models.cache import KVCache

    cache = [KVCache() for _ in model.layers]
    body = model.model if head(model) is not None else model
    body(mx.array([prefix], dtype=mx.int32), cache=cache)
    kv = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]
    mx.eval(kv)
    return kv


def last_logits(model, inputs: mx.array, cache: list) -> mx.array:
    """Logits ``(B, V)`` of the last position; skips the lm head on the other positions."""
    proj = head(model)
    if proj is None:
        return model(inputs, cache=cache)[:, -1, :]
    hidden = model.model(inputs, cache=cache)
    return proj(hidden[:, -1:, :])[:, -1, :]


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """Attention of one new token per row, ``q (B, H, 1, D)`` over ``k, v (B, Hk, T, D)``: the
    same result as ``mx.fast.scaled_dot_product_attention`` (MLX's own precise softmax), with
    :func:`cpu_ops.attention`'s one ``(H / Hk, D) @ (D, T)`` product per KV head instead of the
    CPU fallback's copies of each KV head. ``mask``: None, boolean or additive, broadcastable to
    ``(B, H, 1, T)``."""
    return cpu_ops.attention(q, k, v, scale, mask, softmax_fn=lambda s: mx.softmax(s, axis=-1, precise=True))


class GroupedDecodeAttention(llama.Attention):
    """mlx-lm's llama attention with :func:`decode_attention` for one-token steps over a cache."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        if L != 1 or cache is None or hasattr(cache, "bits"):  # prefill, no cache, quantized cache
            return super().__call__(x, mask, cache)
        q = self.q_proj(x).reshape(B, 1, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, 1, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, 1, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = decode_attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, 1, -1))


class Gemma2BatchAttention(gemma2.Attention):
    """mlx-lm's Gemma 2 attention taking a batched mask. With grouped KV heads it computes scores
    ``(B, Hk, H / Hk, L, S)``, which a ``BatchKVCache``'s ``(B, 1, L, S)`` padding mask does not
    broadcast against (batch against KV heads); here that mask gets the group axis."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if isinstance(mask, mx.array) and mask.ndim == 4 and self.repeats > 1:
            if mask.shape[1] == 1:
                mask = mask[:, :, None]
            else:  # per query head
                mask = mask.reshape(mask.shape[0], self.n_kv_heads, self.repeats, *mask.shape[2:])
        return super().__call__(x, mask, cache)


def fit_batch_masks(model) -> int:
    """Switch the model's layers that cannot take a batched padding mask to ones that can
    (:class:`Gemma2BatchAttention`); returns how many were switched."""
    n = 0
    for layer in getattr(model, "layers", []):
        if type(getattr(layer, "self_attn", None)) is gemma2.Attention:
            layer.self_attn.__class__ = Gemma2BatchAttention
            n += 1
    return n


def use_fast_layers(model) -> str:
    """On CPU, switch the model's llama layers to faster ones with the same outputs up to float
    rounding: :mod:`cpu_ops`' layers (its polynomial exp in SiLU and the attention softmax, KV heads
    not copied) where :func:`cpu_ops.available`, else :class:`GroupedDecodeAttention`. GPUs keep
    mlx-lm's fused kernels. Other families keep their own layers (:func:`cpu_ops.use_cpu_ops` swaps
    llama's only), on every device fitted to a batched padding mask (:func:`fit_batch_masks`).
    Returns which llama layers the model now has: "cpu_ops", "grouped" or "mlx-lm"."""
    fit_batch_masks(model)
    if mx.default_device().type != mx.DeviceType.cpu:
        return "mlx-lm"
    if cpu_ops.available(model):
        cpu_ops.use_cpu_ops(model)
        return "cpu_ops"
    for layer in getattr(model, "layers", []):
        if type(getattr(layer, "self_attn", None)) is llama.Attention:
            layer.self_attn.__class__ = GroupedDecodeAttention
    return "grouped"


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[mx.array, list[int]]:
    """``(B, maxlen)`` left-padded token array and each row's padding."""
    n = max(len(p) for p in prompts)
    padding = [n - len(p) for p in prompts]
    rows = [[pad_id] * k + list(p) for p, k in zip(prompts, padding)]
    return mx.array(rows, dtype=mx.int32), padding


def filter_cache(cache: list, keep: list[int]) -> None:
    idx = mx.array(keep, dtype=mx.int32)
    for c in cache:
        c.filter(idx)


# ---------------------------------------------------------------------------------------------
# The decode loop (token choice and stop rules: :mod:`tracer.sampling`)
# ---------------------------------------------------------------------------------------------


def prefill(model, prompts: list[list[int]], prefix_kv: list | None = None) -> tuple[list, mx.array]:
    """Caches and last-position logits ``(B, V)`` for a left-padded batch of ``prompts``.

    A prompt repeated in the batch (K samples of one question) is prefilled once, then its cache
    rows and logits are copied.
    """
    unique: dict[tuple[int, ...], int] = {}
    copy_of = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    inputs, padding = left_pad([list(p) for p in unique])
    cache = make_cache(model, padding, prefix_kv)
    P = prefix_kv[0][0].shape[2] if prefix_kv else 0
    logits = last_logits(model, inputs[:, P:], cache)
    if len(unique) < len(prompts):
        filter_cache(cache, copy_of)
        logits = logits[mx.array(copy_of, dtype=mx.int32)]
    return cache, logits


def decode_batch(
    model,
    prompts: list[list[int]],
    stopper: RowStopper,
    sampler: Callable[[mx.array], mx.array],
    on_done: Callable[[int, list[int]], None] | None = None,
    prefix_kv: list | None = None,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Generate for ``prompts`` with at most ``batch_size`` rows decoding at once (default: all).

    Continuous batching: prompts are admitted in order; once a quarter of the rows have finished,
    the cache drops them and the next prompts are prefilled and appended to the running batch, so
    it stays near full instead of draining to a few stragglers. Returns each prompt's tokens
    (stop token excluded). ``prefix_kv``: the cached keys/values of a token prefix that every
    prompt starts with.
    """
    size = max(1, batch_size or len(prompts))
    outs: list[list[int]] = [[] for _ in prompts]
    if not prompts:
        return outs
    queue = _Queue(model, prompts, sampler, prefix_kv)
    cache, y, rows = queue.admit(size)  # rows: batch position -> prompt index, None once finished
    mx.async_eval(y)
    while True:
        live = [r for r in rows if r is not None]
        # dispatch the next step before reading this one back (pipelining), unless every row
        # reaches max_tokens with this one and no prompt is waiting
        y_next = None
        if queue.waiting or any(len(outs[r]) + 1 < stopper.max_tokens for r in live):
            y_next = sampler(last_logits(model, y[:, None], cache))
            mx.async_eval(y_next)
        for j, tok in enumerate(y.tolist()):
            r = rows[j]
            if r is not None and stopper.push(outs[r], tok):
                rows[j] = None
                if on_done is not None:
                    on_done(r, outs[r])
        keep = [j for j, r in enumerate(rows) if r is not None]
        if (not keep and not queue.waiting) or y_next is None:  # None: every row hit max_tokens
            break
        # finished rows keep their slots (their tokens are ignored) until a quarter of the batch
        # has finished: then the cache is compacted once (a copy of every layer's keys/values)
        # and waiting prompts are prefilled into the free slots
        if len(rows) - len(keep) >= max(1, len(rows) // 4):
            cache, y_next, rows = _refill(queue, cache, y_next, rows, keep, size)
        y = y_next
    return outs


class _Queue:
    """The prompts of a :func:`decode_batch` call, admitted in order and prefilled a batch at a time."""

    def __init__(self, model, prompts: list[list[int]], sampler: Callable[[mx.array], mx.array],
                 prefix_kv: list | None):
        self.model, self.prompts, self.sampler, self.prefix_kv = model, prompts, sampler, prefix_kv
        self.admitted = 0

    @property
    def waiting(self) -> bool:
        return self.admitted < len(self.prompts)

    def admit(self, n: int) -> tuple[list, mx.array, list[int | None]]:
        """The next ``n`` prompts prefilled: their caches, first tokens and prompt indices."""
        new_rows = list(range(self.admitted, min(self.admitted + n, len(self.prompts))))
        self.admitted += len(new_rows)
        cache, logits = prefill(self.model, [self.prompts[i] for i in new_rows], self.prefix_kv)
        return cache, self.sampler(logits), new_rows


def _refill(queue: _Queue, cache: list, y_next: mx.array, rows: list[int | None], keep: list[int],
            size: int) -> tuple[list, mx.array, list[int | None]]:
    """The batch without its finished rows (``keep``: the positions still decoding), and waiting
    prompts prefilled into the free slots: the cache, the next tokens and the rows."""
    rows = [rows[j] for j in keep]
    if rows:
        filter_cache(cache, keep)
        y_next = y_next[mx.array(keep, dtype=mx.int32)]
    if queue.waiting:
        new_cache, y_new, new_rows = queue.admit(size - len(rows))
        if rows:
            for c, n in zip(cache, new_cache):
                c.extend(n)
            y_next = mx.concatenate([y_next, y_new])
        else:
            cache, y_next = new_cache, y_new
        rows = rows + new_rows
        mx.async_eval(y_next)
    return cache, y_next, rows


def generate_tokens(
    model,
    tokenizer,
    prompts: list[str],
    max_tokens: int = 160,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
    stop_after_answer: bool = True,
    system: str = SYSTEM_PROMPT,
) -> list[list[int]]:
    """Completion token ids per prompt (original order); see :func:`generate`."""
    progress = progress or NullProgress()
    progress.start("generate", total=len(prompts))
    if not prompts:
        progress.stop()
        return []
    use_fast_layers(model)
    share_cores()
    encoded = [encode_chat(tokenizer, p, system) for p in prompts]
    stopper = RowStopper(tokenizer, max(1, max_tokens), stop_after_answer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # stable: K copies stay adjacent
    results: list[list[int] | None] = [None] * len(prompts)
    t0, n_tok = time.perf_counter(), 0
    P = shared_prefix_len(encoded) if len(model.layers) else 0
    prefix_kv = prefix_cache(model, encoded[0][:P]) if P else None

    def done(row: int, toks: list[int]) -> None:
        nonlocal n_tok
        n_tok += len(toks)
        results[order[row]] = toks
        progress.update(1, tok_s=round(n_tok / max(time.perf_counter() - t0, 1e-9), 1))

    decode_batch(model, [encoded[i] for i in order], stopper,
                 make_sampler(temperature, top_p, mx.random.key(seed)), done, prefix_kv, batch_size)
    progress.stop()
    return [r if r is not None else [] for r in results]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_tokens: int = 160,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
    stop_after_answer: bool = True,
    system: str = SYSTEM_PROMPT,
) -> list[str]:
    """Completions (prompt and stop token excluded) for raw user ``prompts``, chats under the
    ``system`` message, in input order.

    Greedy when ``temperature == 0``, else temperature + top-p sampling seeded by ``seed``.
    With ``stop_after_answer`` a completion ends with the ANSWER line the reward reads.
    """
    toks = generate_tokens(
        model, tokenizer, prompts, max_tokens, temperature, top_p, seed, batch_size, progress,
        stop_after_answer, system,
    )
    return [finish_text(tokenizer, t, stop_after_answer) for t in toks]


def sample_k(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    max_tokens: int = 160,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
    stop_after_answer: bool = True,
) -> list[list[str]]:
    """``k`` sampled completions per prompt (each prompt repeated ``k`` times within batches)."""
    if k < 1:
        raise ValueError(f"sample_k: k must be >= 1, got {k}")
    flat = [p for p in prompts for _ in range(k)]
    outs = generate(
        model, tokenizer, flat, max_tokens, temperature, top_p, seed, batch_size, progress,
        stop_after_answer,
    )
    return [outs[i * k : (i + 1) * k] for i in range(len(prompts))]
