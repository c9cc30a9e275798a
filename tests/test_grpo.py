"""GRPO on the tiny random model: advantages, the loss and its gradient against a hand-written one,
KL to the reference, and a few steps end to end with an exact resume."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from pydantic import ValidationError

from tracer import adapters, batching, dataset, grpo
from tracer import model as models
from tracer.config import LoraConfig, RewardConfig
from tracer.errors import TrainingInterrupted
from tracer.kg import load_kg

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TIMING = ("tok_s", "sample_s", "update_s")
pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def pool(tiny_model):
    """RSFT-pool questions of the tiny config (generated beside the tiny model by conftest)."""
    return dataset.load_examples(tiny_model.parent / "data" / "rsft.jsonl")[:6]


def lora_model(tiny_model, seed=0):
    """The tiny model with random (not zero) LoRA weights, so the adapter matters everywhere."""
    model, tok = models.load(str(tiny_model))
    mx.random.seed(seed)
    adapters.add_lora(model, LoraConfig(rank=4, alpha=8.0))
    model.update(tree_map(lambda a: mx.random.normal(a.shape) * 0.05, model.trainable_parameters()))
    return model, tok


def examples_for(tok, pool):
    pairs = [(q["prompt"], c) for q in pool[:2] for c in ("TRACE: a -b-> c\nANSWER: A", "TRACE: x\nANSWER: D")]
    return batching.encode_pairs(tok, pairs, 512)


# ------------------------------------------------------------------------------- advantages


def test_advantages_by_hand():
    r = [1.0, 3.0, 0.0, 0.0, 2.0, -2.0]
    s = math.sqrt(2.0)  # unbiased std of a pair a, b: |a - b| / sqrt(2)
    want = [-1 / (s + 1e-4), 1 / (s + 1e-4), 0, 0, 2 / (2 * s + 1e-4), -2 / (2 * s + 1e-4)]
    assert np.allclose(grpo.advantages(r, 2), want, rtol=1e-6)
    assert np.allclose(grpo.advantages(r, 2, "none"), [-1, 1, 0, 0, 2, -2])
    four = [1.0, 2.0, 3.0, 6.0]  # mean 3, unbiased std sqrt(14 / 3)
    assert np.allclose(grpo.advantages(four, 4), np.array([-2, -1, 0, 3]) / (math.sqrt(14 / 3) + 1e-4), rtol=1e-6)
    equal = grpo.advantages([-2.0] * 4 + [0.5] * 4 + [0.1] * 4, 4)
    assert equal.tolist() == [0.0] * 12
    assert grpo.advantages([0.1] * 3, 3).tolist() == [0.0] * 3  # their float mean is not 0.1
    with pytest.raises(ValueError):
        grpo.advantages(r, 2, "max")


def test_config_defaults_and_bad_values():
    cfg = grpo.GRPOConfig()
    assert (cfg.group_size, cfg.beta, cfg.eps_low, cfg.eps_high, cfg.learning_rate) == (2, 0.05, 0.2, 0.2, 1e-5)
    assert all(f.description for f in grpo.GRPOConfig.model_fields.values())
    for bad in ({"group_size": 1}, {"advantage_scale": "max"}, {"beta": -0.1}, {"temperature": 0.0}):
        with pytest.raises(ValidationError):
            grpo.GRPOConfig(**bad)


# ------------------------------------------------------------------------------------- loss


def full_logprobs(model, plain: batching.Batch) -> mx.array:
    """Log-probs of the targets from a plain full-logits forward (no shared prefix, no gather first)."""
    logits = model(plain.inputs)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logp = logp.reshape(-1, logp.shape[-1])[plain.positions]
    return mx.take_along_axis(logp, plain.targets[:, None], axis=-1)[:, 0]


def test_loss_and_gradient_match_the_hand_computed_case(tiny_model, pool):
    model, tok = lora_model(tiny_model)
    examples = examples_for(tok, pool)
    b, plain = batching.collate(examples), batching.collate(examples, share_prefix=False)
    assert b.prefix is not None  # the loss under test runs the system prompt once
    adv_rows = np.array([1.0, -0.5, 0.7, -1.2], np.float32)
    adv = grpo.token_advantages(examples, adv_rows)
    lp = np.array(full_logprobs(model, plain), np.float64)
    rng = np.random.default_rng(0)
    old = lp + rng.uniform(-0.4, 0.4, lp.size)  # ratios from exp(-0.4) to exp(0.4): both bounds clip some
    ref = lp + rng.uniform(-0.5, 0.5, lp.size)
    beta, lo, hi, a = 0.1, 0.2, 0.28, np.array(adv, np.float64)
    ratio = np.exp(lp - old)
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    per = -np.minimum(ratio * a, np.clip(ratio, 1 - lo, 1 + hi) * a) + beta * k3
    cut = ((ratio < 1 - lo) & (a < 0)) | ((ratio > 1 + hi) & (a > 0))
    assert 0 < cut.sum() < lp.size
    old_mx, ref_mx = mx.array(old, mx.float32), mx.array(ref, mx.float32)
    args = (adv, ref_mx, old_mx, beta, lo, hi)
    (loss, kl, clip), grads = nn.value_and_grad(model, grpo.grpo_loss)(model, b, *args)
    assert loss.item() == pytest.approx(per.mean(), rel=1e-4)
    assert kl.item() == pytest.approx(k3.mean(), rel=1e-4) and clip.item() == pytest.approx(cut.mean())

    def hand(model):  # the same objective, written out on full logits
        logp = full_logprobs(model, plain)
        r = mx.exp(logp - old_mx)
        surrogate = mx.minimum(r * adv, mx.clip(r, 1 - lo, 1 + hi) * adv)
        d = ref_mx - logp
        return (beta * (mx.exp(d) - d - 1) - surrogate).mean()

    hand_loss, hand_grads = nn.value_and_grad(model, hand)(model)
    assert loss.item() == pytest.approx(hand_loss.item(), rel=1e-5)
    g, h = dict(tree_flatten(grads)), dict(tree_flatten(hand_grads))
    assert g.keys() == h.keys() and len(g) > 0
    for k in g:
        assert mx.allclose(g[k], h[k], rtol=1e-3, atol=1e-6).item(), k
    # a central difference along the gradient agrees with its squared norm
    flat = dict(tree_flatten(model.trainable_parameters()))
    step = 1e-2 / math.sqrt(sum((v * v).sum().item() for v in g.values()))
    values = []
    for sign in (1, -1):
        model.update(tree_unflatten([(k, flat[k] + sign * step * g[k]) for k in flat]))
        values.append(grpo.grpo_loss(model, b, *args)[0].item())
    model.update(tree_unflatten(list(flat.items())))
    norm2 = sum((v * v).sum().item() for v in g.values())
    assert (values[0] - values[1]) / (2 * step) == pytest.approx(norm2, rel=2e-2)


def test_on_policy_gradient_is_the_policy_gradient(tiny_model, pool):
    """With logp_old the policy's own (one update per batch) and no KL, the ratio is 1 and the
    gradient is that of -sum(A x logp) / N."""
    model, tok = lora_model(tiny_model)
    examples = examples_for(tok, pool)
    b = batching.collate(examples)
    adv = grpo.token_advantages(examples, [0.9, -0.9, 0.3, -0.3])
    (loss, kl, clip), grads = nn.value_and_grad(model, grpo.grpo_loss)(model, b, adv)
    _, want = nn.value_and_grad(model, lambda m: -(adv * grpo.token_logprobs(m, b)).mean())(model)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6) and kl.item() == 0 and clip.item() == 0
    g, w = dict(tree_flatten(grads)), dict(tree_flatten(want))
    for k in g:
        assert mx.allclose(g[k], w[k], rtol=1e-4, atol=1e-7).item(), k


def test_kl_is_zero_against_itself_and_the_reference_swap_restores_the_policy(tiny_model, pool):
    model, tok = lora_model(tiny_model)
    examples = examples_for(tok, pool)
    b = batching.collate(examples)
    adv = grpo.token_advantages(examples, [1.0, -1.0, 0.5, -0.5])
    policy = adapters.adapter_weights(model)
    (same,) = grpo.reference_logprobs(model, [b], dict(policy))
    loss, kl, clip = grpo.grpo_loss(model, b, adv, same, beta=0.05)
    assert kl.item() == 0.0 and clip.item() == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    # another reference: its log-probs are those of a model holding its weights, and the policy stays
    other = {k: v * 0.5 for k, v in policy.items()}
    (ref,) = grpo.reference_logprobs(model, [b], other)
    for k, v in adapters.adapter_weights(model).items():
        assert mx.array_equal(v, policy[k]).item(), k
    twin, _ = lora_model(tiny_model)
    twin.update(tree_unflatten(list(other.items())))
    assert mx.allclose(ref, grpo.token_logprobs(twin, b), atol=1e-5).item()
    assert grpo.grpo_loss(model, b, adv, ref, beta=0.05)[1].item() > 0


# ---------------------------------------------------------------------------------- samples


def test_sampled_completions_end_as_they_were_sampled(tiny_model, pool, monkeypatch):
    """A completion trains on the tokens sampled, plus the end-of-turn token where one stopped it
    (not where the token budget or the ANSWER line's end did); the reward reads the cut text. Both
    the sampling and the trained prompt are chats under the given system message."""
    _, tok = models.load(str(tiny_model))
    answered = tok.encode("TRACE: a\nANSWER: B\n", add_special_tokens=False)
    short = tok.encode("TRACE: a", add_special_tokens=False)
    budget = tok.encode("x " * 40, add_special_tokens=False)[:8]
    asked = []
    monkeypatch.setattr(grpo, "generate_tokens", lambda *a, **k: asked.append(k) or [short, budget, answered, short])
    system = "You answer multi-hop questions about a clinical knowledge graph."
    examples, texts = grpo.sample_completions(None, tok, pool[:2], run_cfg(max_tokens=8), seed=0, system=system)
    assert asked[0]["system"] == system
    prompt = tok.apply_chat_template([{"role": "system", "content": system},
                                      {"role": "user", "content": pool[0]["prompt"]}], add_generation_prompt=True)
    assert examples[0][0][: examples[0][1]] == list(prompt)
    completions = [ids[start:] for ids, start in examples]
    assert completions == [short + [tok.eos_token_id], budget, answered, short + [tok.eos_token_id]]
    assert texts == ["TRACE: a", tok.decode(budget), "TRACE: a\nANSWER: B", "TRACE: a"]


def test_a_chunk_samples_the_same_completions_whichever_rank_samples_it(tiny_model, pool):
    """Under mlx.launch rank r samples every N-th chunk of a step; each chunk is drawn under its own
    seed, so a rank's share gives the completions (and scores) one process draws for those chunks."""
    model, tok = lora_model(tiny_model)
    cfg = run_cfg(batch_questions=4, sample_batch_size=2, temperature=1.0)  # one question per chunk
    questions, scorer = pool[:4], lambda text, row: {"total": len(text), "valid_format": False, "correct": False}
    chunks = list(enumerate(grpo.sampling_chunks(len(questions), cfg)))
    assert chunks == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]
    assert grpo.sampling_chunks(5, run_cfg(sample_batch_size=4)) == [[0, 1], [2, 3], [4]]
    whole, whole_done = grpo.sample_chunks(model, tok, questions, scorer, cfg, 11, chunks)
    share, share_done = grpo.sample_chunks(model, tok, questions, scorer, cfg, 11, chunks[1::2])  # rank 1 of 2
    assert share == whole[2:4] + whole[6:8] and share_done == whole_done[1::2]
    assert len({tuple(ids[start:]) for ids, start in whole}) > 4  # sampled, not greedy: chunks differ


def test_two_shares_of_an_update_with_summed_gradients_make_the_whole_update(tiny_model, pool, monkeypatch):
    """What policy_update does under mlx.launch, two ranks played in turn: each share normalised by
    the whole batch's tokens, the gradients and the loss's parts summed (:func:`grpo.all_ranks`)
    before clipping, give one process's update and metrics on the whole batch."""
    examples, adv = examples_for(models.load(str(tiny_model))[1], pool), np.array([1.0, -1.0, 0.4, -0.4], np.float32)
    n_tokens = sum(len(ids) - start for ids, start in examples)
    cfg = run_cfg(batch_size=1, grad_clip=0.5, learning_rate=1e-2)

    def update(rows, reduce=None):
        model, _ = lora_model(tiny_model)
        if reduce is not None:
            monkeypatch.setattr(grpo, "all_ranks", reduce)
        # SGD: the update is linear in the gradient, so summing in another order moves it by float
        # rounding only (AdamW's first step divides near-zero gradients by their own size)
        opt = grpo.optim.SGD(learning_rate=cfg.learning_rate)
        stats = grpo.policy_update(model, opt, [examples[i] for i in rows], adv[rows], cfg, n_tokens=n_tokens)
        return stats, adapters.adapter_weights(model)

    whole, want = update([0, 1, 2, 3])
    other = {}
    update([0, 1], lambda grads, totals: other.update(grads=grads, totals=totals) or (grads, totals))
    summed, got = update([2, 3], lambda grads, totals: (tree_map(mx.add, grads, other["grads"]),
                                                        totals + other["totals"]))
    assert summed["kl"] is whole["kl"] is None and whole["loss"] != 0
    for key in ("loss", "clip_frac", "lr"):
        assert summed[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    alone, _ = update([2, 3], lambda grads, totals: (grads, totals))  # a share alone is another update
    assert alone["loss"] != pytest.approx(whole["loss"], rel=1e-3)
    for k in want:
        assert mx.allclose(got[k], want[k], atol=1e-6).item(), k


# ------------------------------------------------------------------------------------- runs


def run_cfg(**kw):
    base = dict(iters=4, batch_questions=2, group_size=2, max_tokens=12, batch_size=8, save_every=2,
                learning_rate=2e-2, beta=0.05, seed=3)
    return grpo.GRPOConfig(**dict(base, **kw))


@pytest.fixture(scope="module")
def scorer():
    """The KG reward plus a length bonus: a random model's completions are all unparseable, and
    equal rewards would leave nothing to learn."""
    kg_score = grpo.kg_scorer(load_kg(FIXTURES / "tiny_kg.json"), RewardConfig())

    def score(text, row):
        s = kg_score(text, row)
        return dict(s, total=s["total"] + 0.1 * len(text))

    return score


def run(tiny_model, pool, scorer, out, cfg, **kw):
    model, tok = models.load(str(tiny_model))
    stats = grpo.train_grpo(model, tok, pool, scorer, cfg, LoraConfig(rank=4, alpha=8.0), out, "tiny", **kw)
    return stats, model


def same_steps(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k in TIMING:
                continue
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
            else:
                assert x[k] == y[k], (x["step"], k)


def test_steps_log_and_checkpoint_and_resume_equals_an_uninterrupted_run(tiny_model, pool, scorer, tmp_path,
                                                                         monkeypatch):
    full, full_model = run(tiny_model, pool, scorer, tmp_path / "full", run_cfg())
    log = [json.loads(line) for line in (tmp_path / "full" / grpo.LOG_FILE).read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3, 4] and log == json.loads(json.dumps(full["log"]))
    for m in log:
        assert {"reward_mean", "reward_std", "format_rate", "accuracy", "kl", "clip_frac", "tok_s", "loss",
                "lr", "questions"} <= m.keys()
        assert len(m["questions"]) == 2 and m["reward_std"] > 0 and m["tok_s"] > 0 and m["clip_frac"] == 0
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] > 0  # the first step samples from the reference itself
    assert len({tuple(m["questions"]) for m in log}) > 1
    ckpt = tmp_path / "full" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4 and (ckpt / "optimizer.safetensors").is_file()
    final = dict(mx.load(str(tmp_path / "full" / "adapters.safetensors")))
    assert any(not mx.array_equal(v, 0).item() for k, v in final.items() if "lora_b" in k)  # it learned something

    # interrupted inside step 3, after its update: rolled back to step 2's checkpoint
    real_update, calls = grpo.policy_update, []

    def update_then_stop(*args, **kwargs):
        out = real_update(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(grpo, "policy_update", update_then_stop)
    with pytest.raises(TrainingInterrupted) as e:
        run(tiny_model, pool, scorer, tmp_path / "split", run_cfg())
    assert e.value.step == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "split" / grpo.LOG_FILE).read_text().splitlines()] == [1, 2]
    monkeypatch.setattr(grpo, "policy_update", real_update)
    resumed, _ = run(tiny_model, pool, scorer, tmp_path / "split", run_cfg(), resume=True)
    same_steps(resumed["log"], full["log"])
    assert len((tmp_path / "split" / grpo.LOG_FILE).read_text().splitlines()) == 4
    split = dict(mx.load(str(tmp_path / "split" / "adapters.safetensors")))
    assert split.keys() == final.keys()
    for k in final:
        assert mx.allclose(split[k], final[k], atol=1e-5).item(), k


def test_dr_grpo_without_kl_runs_on_the_kg_reward_alone(tiny_model, pool, tmp_path):
    """The plain KG reward: the random model's completions all score `invalid`, so every group is
    flat, nothing is learned, and no reference pass runs (KL off)."""
    scorer = grpo.kg_scorer(load_kg(FIXTURES / "tiny_kg.json"), RewardConfig())
    stats, model = run(tiny_model, pool, scorer, tmp_path / "dr", run_cfg(iters=2, beta=0.0, advantage_scale="none"))
    for m in stats["log"]:
        assert m["kl"] is None and m["format_rate"] == 0 and m["flat_groups"] == 1.0 and m["loss"] == 0.0
        assert m["reward_mean"] == RewardConfig().invalid
