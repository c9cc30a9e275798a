"""tracer.cpu_ops: the polynomial exp and the layers built on it against MLX's own ops, values and
gradients; the compiled training step against the plain one."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.models.base import create_causal_mask

from tracer import adapters, batching, cpu_ops, generate, train
from tracer.config import LoraConfig

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="needs the CPU device and g++")


def close(a, b, tol=1e-5):
    """Relative error under tol, entries near zero measured against the tensor's RMS: a different
    summation order (another BLAS kernel) moves a 2e-4 entry of an O(1) tensor by ~1e-8."""
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return np.max(np.abs(a - b) / (np.abs(b) + np.sqrt(np.mean(b * b)))) < tol


def test_exp_matches_float64_over_float32_range():
    x = mx.concatenate([mx.linspace(-87, 88, 100_001), mx.random.uniform(-30, 5, (10_000,))])
    got = np.array(cpu_ops.exp(x), dtype=np.float64)
    want = np.exp(np.array(x, dtype=np.float64))
    assert np.max(np.abs(got - want) / want) < 3e-7
    edges = cpu_ops.exp(mx.array([-float("inf"), -1000.0, 0.0, 1000.0])).tolist()
    assert edges[0] == edges[1] == 0.0 and edges[2] == 1.0 and edges[3] > 1e38


@pytest.mark.parametrize("name", ["silu", "softmax", "logsumexp"])
def test_values_and_gradients_match_mlx(name):
    x = mx.random.normal((4, 7, 33), key=mx.random.key(1)) * 6
    ours, ref = {
        "silu": (cpu_ops.silu, nn.silu),
        "softmax": (cpu_ops.softmax, lambda v: mx.softmax(v, axis=-1)),
        "logsumexp": (cpu_ops.logsumexp, lambda v: mx.logsumexp(v, axis=-1)),
    }[name]
    w = mx.random.normal(ref(x).shape, key=mx.random.key(2))
    assert close(ours(x), ref(x))
    assert close(mx.grad(lambda v: (ours(v) * w).sum())(x), mx.grad(lambda v: (ref(v) * w).sum())(x), 1e-4)


@pytest.mark.parametrize("mask_kind", ["causal", "offset", "additive", "none"])
def test_grouped_attention_matches_mlx_fast_attention(mask_kind):
    k1, k2, k3 = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((2, 6, 5, 8), key=k1)
    k, v = mx.random.normal((2, 3, 9, 8), key=k2), mx.random.normal((2, 3, 9, 8), key=k3)
    mask = {"causal": "causal", "offset": create_causal_mask(5, 4), "none": None,
            "additive": mx.random.normal((2, 1, 5, 9), key=k1)}[mask_kind]
    if mask_kind == "causal":
        q = q[:, :, :5]
        k, v = k[:, :, :5], v[:, :, :5]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    assert close(cpu_ops.attention(q, k, v, 0.3, mask), want, 1e-4)
    g = lambda f: mx.grad(lambda a, b, c: (f(a, b, c) * want).sum(), argnums=(0, 1, 2))(q, k, v)  # noqa: E731
    ours = g(lambda a, b, c: cpu_ops.attention(a, b, c, 0.3, mask))
    theirs = g(lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=0.3, mask=mask))
    assert all(close(o, t, 1e-3) for o, t in zip(ours, theirs))


def test_attention_over_left_padding_stays_finite():
    """A left-padded batch (prefill): query positions inside a row's padding have every key
    masked. They must come out finite (their keys and values feed no real position, but NaN times
    a zero weight is NaN); the other rows as mlx-lm's attention gives them."""
    k1, k2, k3 = mx.random.split(mx.random.key(4), 3)
    q = mx.random.normal((2, 6, 5, 8), key=k1)
    k, v = mx.random.normal((2, 3, 9, 8), key=k2), mx.random.normal((2, 3, 9, 8), key=k3)
    pad = mx.array([0, 6])[:, None, None, None]  # row 1: queries at positions 4 and 5 see only padding
    mask = create_causal_mask(5, 4)[None, None] & (mx.arange(9)[None, None, None, :] >= pad)
    got = cpu_ops.attention(q, k, v, 0.3, mask)
    assert np.isfinite(np.array(got)).all()
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    assert close(got[0], want[0], 1e-4) and close(got[1, :, 2:], want[1, :, 2:], 1e-4)
    additive = mx.where(mask, 0.0, -mx.inf)  # the same mask as -inf additions
    got_additive = cpu_ops.attention(q, k, v, 0.3, additive)
    assert np.isfinite(np.array(got_additive)).all()
    assert close(got_additive[0], want[0], 1e-4) and close(got_additive[1, :, 2:], want[1, :, 2:], 1e-4)


def _tiny_llama():
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50,
                           tie_word_embeddings=True)
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    adapters.add_lora(model, adapters.lora_config(LoraConfig(rank=4, alpha=8.0, num_layers=-1), model))
    model.train()
    return model


@pytest.mark.parametrize("share_prefix", [True, False])
def test_compiled_step_trains_like_the_plain_one(share_prefix):
    """Same batches, same init: the compiled step (cpu_ops layers, padded batches, weighted loss)
    gives the plain step's losses and LoRA weights to float tolerance, with and without a shared
    prefix. The plain step runs mlx-lm's layers even on a model that generation left on cpu_ops'
    layers; the compiled step's are switched back afterwards."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(0)
    prefix = [int(t) for t in rng.integers(1, 50, 9)]
    examples = [(prefix + [int(t) for t in rng.integers(1, 50, n)], 9 + int(n) // 2) for n in rng.integers(4, 20, 24)]
    runs = {}
    for compiled in (False, True):
        model = _tiny_llama()
        opt = optim.AdamW(learning_rate=1e-2)
        generate.use_fast_layers(model)  # as generation leaves a model: the plain step switches back
        step = train.TrainStep(model, opt, grad_clip=1.0, compiled=compiled)
        assert isinstance(model.layers[0].mlp, cpu_ops.CpuMLP) == compiled
        assert isinstance(model.layers[0].self_attn, cpu_ops.CpuAttention) == compiled
        pad = train.COMPILED_PAD if compiled else None
        losses = []
        for i in range(0, 24, 6):
            b = batching.collate(examples[i: i + 6], share_prefix, pad)
            assert (b.prefix is not None) == share_prefix
            if compiled:
                assert b.inputs.shape[1] % 8 == 0 and b.positions.size % 32 == 0
                assert b.weights.sum().item() == sum(len(ids) - s for ids, s in examples[i: i + 6])
            loss = step(b)
            mx.eval(loss, model.parameters(), opt.state)
            losses.append(loss.item())
        runs[compiled] = (losses, dict(tree_flatten(model.trainable_parameters())))
        cpu_ops.use_cpu_ops(model, False)
        assert type(model.layers[0].mlp) is llama.MLP and type(model.layers[0].self_attn) is llama.Attention
    (plain_losses, plain_w), (comp_losses, comp_w) = runs[False], runs[True]
    assert plain_losses[-1] < plain_losses[0]
    assert comp_losses == pytest.approx(plain_losses, rel=1e-4)
    assert all(mx.allclose(comp_w[k], plain_w[k], atol=1e-4).item() for k in plain_w)


def test_only_float32_models_get_the_compiled_step():
    """The polynomial exp rounds with a float32 constant: a bfloat16 model keeps mlx-lm's layers."""
    model = _tiny_llama()
    assert cpu_ops.available(model)
    model.set_dtype(mx.bfloat16)
    assert not cpu_ops.available(model) and cpu_ops.available()
