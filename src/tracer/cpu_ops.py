"""Faster element-wise work for training and generation on MLX's CPU backend.

MLX's Linux CPU wheel computes ``exp`` one element at a time, with libm calls, on one thread, and
SiLU, the attention softmax and the loss's log-sum-exp all pay it. Here ``exp`` is a Cephes-style
polynomial built from MLX ops; under ``mx.compile`` MLX's CPU backend fuses such chains into C++
kernels that it builds with g++, faster and more accurate than ``mx.exp``. Under ``mx.grad``
compiled functions run op by op, so these pay off only when the whole training step is compiled
(``train.TrainStep``). SiLU, softmax and log-sum-exp carry their own gradients (no exp in their
backward passes except SiLU's sigmoid). The measurements (``bench/bench_cpu_ops.py``,
``bench/bench_decode.py``) are in docs/performance.md.

:func:`use_cpu_ops` switches a model's llama attention and MLP layers to these; GPUs and machines
without g++, and models not in float32 (:func:`available`), keep mlx-lm's. Generation uses the
same layers outside ``mx.compile`` (``generate.use_fast_layers``): there each of exp's two halves
is a fused kernel of its own.
"""

from __future__ import annotations

import os
import shutil

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_causal_mask

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 in two parts (Cody-Waite reduction)
POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds a float32 to an integer


def available(model=None) -> bool:
    """True on the CPU device with g++ on PATH (MLX's CPU compiler) and compiling not disabled;
    with ``model``, also only when its floating-point weights are float32 (the exp needs a
    24-bit mantissa)."""
    if mx.default_device().type != mx.DeviceType.cpu or shutil.which("g++") is None:
        return False
    if os.environ.get("MLX_DISABLE_COMPILE"):
        return False
    if model is None:
        return True
    return all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))


@mx.compile
def _reduce(x: mx.array) -> tuple[mx.array, mx.array]:
    """x = n ln 2 + r with integer n and |r| <= ln 2 / 2 (x clipped to float32's normal range).
    Below -87, n = -127: 2^n's exponent bits are then 0, so e^x comes out exactly 0."""
    under = x < -87.0
    x = mx.minimum(mx.maximum(x, -87.0), 88.0)
    n = mx.where(under, -127.0, (x * LOG2E + ROUND) - ROUND)
    return n, (x - n * LN2_HI) - n * LN2_LO


@mx.compile
def _expand(n: mx.array, r: mx.array) -> mx.array:
    """e^r by a degree-7 polynomial (Estrin's scheme, for short fused chains), times 2^n via the
    exponent bits."""
    r2 = r * r
    p = (POLY[5] + POLY[4] * r) + r2 * ((POLY[3] + POLY[2] * r) + r2 * (POLY[1] + POLY[0] * r))
    return ((1.0 + r) + r2 * p) * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)


def exp(x: mx.array) -> mx.array:
    """float32 e^x; 0 below -87 (where float32's normal range ends). Not the smallest normal
    float: a causal softmax's masked half would hold it, and on x86 every product that turns it
    into a subnormal takes a microcode assist, which slows the whole layer (docs/performance.md)."""
    return _expand(*_reduce(x))


def sigmoid(x: mx.array) -> mx.array:
    return mx.reciprocal(1.0 + exp(-x))


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    return x * sigmoid(x)


@silu.vjp
def _silu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    s = sigmoid(x)
    return (cotangent * (s * (1.0 + x * (1.0 - s))),)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    e = exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)


@mx.custom_function
def logsumexp(x: mx.array) -> mx.array:
    """log Σ e^x over the last axis (which is dropped)."""
    m = mx.max(x, axis=-1, keepdims=True)
    return (m + mx.log(exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


@logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    return (cotangent[..., None] * exp(x - output[..., None]),)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row cross-entropy of ``logits (N, V)`` against ``targets (N,)``."""
    return logsumexp(logits) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, softmax_fn=None) -> mx.array:
    """Attention of ``q (B, H, L, D)`` over ``k, v (B, Hk, S, D)``, each KV head's H / Hk query
    heads as one product (no copies of K and V; MLX's CPU fallback of
    ``mx.fast.scaled_dot_product_attention`` copies each KV head to its query heads). ``mask``:
    None, "causal" (the last L of S positions), or a boolean / additive array broadcastable to
    ``(B, H, L, S)``. ``softmax_fn`` (last axis) defaults to :func:`softmax`."""
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = H // Hk
    # (B, Hk, G * L, D) @ (B, Hk, D, S): batch axes that match, so no operand is broadcast (copied)
    scores = ((q * scale).reshape(B, Hk, G * L, D) @ k.swapaxes(-1, -2)).reshape(B, Hk, G, L, S)
    if isinstance(mask, str):
        mask = create_causal_mask(L, S - L)
    if mask is not None:
        if mask.ndim == 4:  # (B or 1, H or 1, L, S) -> (B or 1, Hk or 1, G or 1, L, S)
            mask = mask.reshape(mask.shape[0], Hk, G, L, S) if mask.shape[1] == H else mask[:, :, None]
        # finfo.min, not -inf: a query with every key masked (left padding) gets finite garbage, not NaN
        fill = mx.finfo(scores.dtype).min
        scores = mx.where(mask, scores, fill) if mask.dtype == mx.bool_ else mx.maximum(scores + mask, fill)
    return ((softmax_fn or softmax)(scores).reshape(B, Hk, G * L, S) @ v).reshape(B, H, L, D)


class CpuAttention(llama.Attention):
    """mlx-lm's llama attention with :func:`attention` (polynomial-exp softmax)."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class CpuMLP(llama.MLP):
    """mlx-lm's llama MLP with :func:`silu`."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


def use_cpu_ops(model, on: bool = True) -> int:
    """Switch ``model``'s llama attention and MLP layers to (``on``) or back from the classes above;
    returns the number of layers switched."""
    swaps = {llama.Attention: CpuAttention, llama.MLP: CpuMLP}
    if not on:
        swaps = {new: old for old, new in swaps.items()}
    n = 0
    for layer in getattr(model, "layers", []):
        for name in ("self_attn", "mlp"):
            part = getattr(layer, name, None)
            if type(part) in swaps:
                part.__class__ = swaps[type(part)]
                n += name == "mlp"
    return n
