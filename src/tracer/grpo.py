"""GRPO with the knowledge graph as reward: the LoRA policy samples G completions per question, the
KG scores them, and the policy moves towards the completions that beat their group's mean.

One step (:func:`grpo_step`):

1. sample G completions for each of B questions with the current policy (batched, in process);
2. score each with the KG reward (:func:`tracer.reward.score`);
3. advantages, normalised within each question's group (:func:`advantages`);
4. one AdamW step on the clipped policy-gradient loss (:func:`grpo_loss`) over the completion
   tokens, with an optional k3 KL penalty to the starting adapter (:func:`reference_logprobs`).

The loss is a token-level mean: the per-token terms summed over every completion token of the
batch, divided by the number of those tokens (DAPO's normalisation). Each token weighs the same
whatever its completion's length, unlike GRPO's per-completion mean, which gives the tokens of a
short completion more weight than those of a long one with the same advantage.

Each step samples from the policy it then updates once, so the sampling policy's log-probs equal
the policy's (``logp_old = stop_gradient(logp)``): the ratio is 1 and the clip only matters for a
caller that passes older log-probs. LoRA dropout is off throughout: the policy scored is the one
sampled. The questions and the sampling seeds of step ``s`` are functions of (seed, s), and the
optimizer state is checkpointed with the adapter, so ``resume`` reproduces an uninterrupted run.

A step's questions are sampled in chunks (:func:`sampling_chunks`), each by its own call under its
own seed, so a chunk's completions do not depend on which process samples it. Under ``mlx.launch``
the ranks take the chunks in turn (:func:`tracer.distributed.shard`), score and train on their own
(a question's G completions stay on one rank, so its group's advantages are local); the loss is
divided by the whole step's completion tokens and the gradients are summed over the ranks before
clipping, so N ranks follow one process's run (to float rounding). Rank 0 alone writes.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from tracer import cpu_ops, distributed, reward
from tracer.adapters import adapter_weights, attach_lora, load_checkpoint, save_adapter, save_checkpoint
from tracer.batching import Batch, Example, collate
from tracer.blas import share_cores
from tracer.config import GRPOConfig, LoraConfig, RewardConfig
from tracer.distributed import world
from tracer.errors import TracerError
from tracer.format import SYSTEM_PROMPT, answer_end, encode_chat
from tracer.generate import generate_tokens
from tracer.heap import release_freed_pages
from tracer.kg import KG
from tracer.progress import NullProgress, Progress
from tracer.sampling import finish_text
from tracer.train import hidden, output_logits, schedule, stopped, stops_training

LOG_FILE = "grpo_log.jsonl"
Scorer = Callable[[str, dict], dict]  # (completion, question row) -> reward.score()'s breakdown


# ------------------------------------------------------------------------------- advantages


def advantages(rewards, group_size: int, scale: str = "std", eps: float = 1e-4) -> np.ndarray:
    """Per completion, its reward minus its group's mean, divided by the group's std + ``eps`` when
    ``scale == "std"`` (GRPO; the unbiased std, as TRL's); ``"none"``: not divided (Dr.GRPO).
    ``rewards`` holds the groups one after another, ``group_size`` each."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    if scale not in ("std", "none"):
        raise ValueError(f"advantage scale: expected 'std' or 'none', got {scale!r}")
    a = r - r.mean(axis=1, keepdims=True)
    if scale == "std":
        a = a / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    a[r.max(axis=1) == r.min(axis=1)] = 0.0  # exactly: a mean's rounding must not become a signal
    return a.reshape(-1).astype(np.float32)


# ------------------------------------------------------------------------------------- loss


def token_logprobs(model: nn.Module, b: Batch) -> mx.array:
    """Log-probability of each loss target of ``b`` (one per completion token, in ``b``'s order)."""
    h = hidden(model, b.inputs, b.prefix)
    h = h.reshape(-1, h.shape[-1])[b.positions]
    return -nn.losses.cross_entropy(output_logits(model, h), b.targets, reduction="none")


def grpo_loss(model: nn.Module, b: Batch, adv: mx.array, ref_logp: mx.array | None = None,
              logp_old: mx.array | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
              n_tokens: int | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Clipped policy-gradient loss over ``b``'s completion tokens; ``adv``: each token's advantage.

    Per token: ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``, with ratio =
    exp(logp - logp_old) (``logp_old`` None: the policy's own, gradient stopped), plus, with
    ``ref_logp``, ``beta`` x the k3 estimate of KL(policy || reference), exp(d) - d - 1 with
    d = ref_logp - logp. Returns (loss, kl, clip fraction), each a sum over the tokens divided by
    ``n_tokens`` (default: ``b``'s tokens), so the values of a batch's parts add up to the batch's.
    Clipped tokens are those whose gradient the clip cuts (ratio past the bound the advantage pushes to).
    """
    logp = token_logprobs(model, b)
    n = logp.size if n_tokens is None else n_tokens
    ratio = mx.exp(logp - (mx.stop_gradient(logp) if logp_old is None else logp_old))
    clipped = mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    kl = mx.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = mx.exp(d) - d - 1.0
        per_token = per_token + beta * kl
    cut = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    return per_token.sum() / n, mx.stop_gradient(kl).sum() / n, cut.sum().astype(mx.float32) / n


def token_advantages(examples: list[Example], adv) -> mx.array:
    """Each completion's advantage repeated over its loss positions (:func:`tracer.batching.collate`'s order)."""
    return mx.array(np.repeat(np.asarray(adv, np.float32), [len(ids) - start for ids, start in examples]))


# -------------------------------------------------------------------------------- reference


def swap_adapter(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Put the flat LoRA ``weights`` into ``model``; returns the ones they replace."""
    current = adapter_weights(model)
    model.update(tree_unflatten(list(weights.items())))
    return current


def reference_logprobs(model: nn.Module, batches: list[Batch], reference: dict[str, mx.array]) -> list[mx.array]:
    """Token log-probs of each batch under the ``reference`` adapter (no gradient); the policy's
    weights are back in place afterwards."""
    policy = swap_adapter(model, reference)
    try:
        out = [mx.stop_gradient(token_logprobs(model, b)) for b in batches]
        mx.eval(out)
    finally:
        swap_adapter(model, policy)
    return out


# ------------------------------------------------------------------------------------- step


def sample_completions(model: nn.Module, tokenizer, questions: list[dict], cfg: GRPOConfig,
                       seed: int, system: str = SYSTEM_PROMPT) -> tuple[list[Example], list[str]]:
    """G sampled completions per question (chats under the ``system`` message), groups in question
    order: the (prompt + sampled tokens, completion start) examples the loss runs on, and the texts
    the reward reads. A completion that ended on a stop token gets the end-of-turn token as its last
    (sampled, so trained) token."""
    prompts = [q["prompt"] for q in questions for _ in range(cfg.group_size)]
    toks = generate_tokens(model, tokenizer, prompts, cfg.max_tokens, cfg.temperature, cfg.top_p, seed,
                           cfg.sample_batch_size, system=system)
    examples, texts, encoded = [], [], {}
    for p, t in zip(prompts, toks):
        ids = encoded.setdefault(p, encode_chat(tokenizer, p, system))
        # not at the token budget and not cut after the ANSWER line: a stop token ended it
        at_stop = len(t) < cfg.max_tokens and answer_end(tokenizer.decode(t)) is None
        examples.append((ids + t + ([tokenizer.eos_token_id] if at_stop else []), len(ids)))
        texts.append(finish_text(tokenizer, t))
    return examples, texts


def kg_scorer(kg: KG, cfg: RewardConfig) -> Scorer:
    """``(completion, row) -> reward.score(...)`` against ``kg`` under ``cfg``."""
    matcher = reward.EntityMatcher(kg.entities)
    return lambda text, row: reward.score(text, row, matcher, kg, cfg)


def sampling_chunks(n_questions: int, cfg: GRPOConfig) -> list[list[int]]:
    """A step's questions (their positions) in sampling chunks of ``sample_batch_size // group_size``
    questions (at least one: what one decode batch holds), each sampled by its own call."""
    per = max(1, cfg.sample_batch_size // cfg.group_size)
    return [list(range(i, min(i + per, n_questions))) for i in range(0, n_questions, per)]


def chunk_seed(seed: int, chunk: int) -> int:
    """Sampling seed of a step's chunk ``chunk`` (the first samples under the step's ``seed`` itself)."""
    return (seed + 1_000_000 * chunk) % 2**31


def sample_chunks(model: nn.Module, tokenizer, questions: list[dict], scorer: Scorer, cfg: GRPOConfig, seed: int,
                  chunks: list[tuple[int, list[int]]], system: str = SYSTEM_PROMPT,
                  ) -> tuple[list[Example], list[list[list]]]:
    """The completions of ``chunks`` (index c and question positions, of :func:`sampling_chunks`),
    chunk c sampled under ``chunk_seed(seed, c)`` and scored: the examples, groups in chunk order,
    and per chunk, per completion, ``[reward, valid format, correct, completion tokens]``."""
    examples, done = [], []
    for c, chunk in chunks:
        qs = [questions[i] for i in chunk]
        ex, texts = sample_completions(model, tokenizer, qs, cfg, chunk_seed(seed, c), system)
        scores = [scorer(text, q) for text, q in zip(texts, [q for q in qs for _ in range(cfg.group_size)])]
        examples += ex
        done.append([[float(s["total"]), bool(s["valid_format"]), bool(s["correct"]), len(ids) - start]
                     for s, (ids, start) in zip(scores, ex)])
    return examples, done


def all_ranks(grads, totals: np.ndarray) -> tuple[Any, np.ndarray]:
    """``grads`` and ``totals`` summed over the ``mlx.launch`` ranks (as is, in a plain process): the
    gradients as :class:`tracer.train.TrainStep` sums them (``nn.average_gradients`` x size)."""
    _, size = world()
    if size == 1:
        return grads, totals
    grads = tree_map(lambda g: g * size, nn.average_gradients(grads))
    return grads, np.sum(distributed.gather(totals.tolist()), axis=0)


def policy_update(model: nn.Module, optimizer, examples: list[Example], adv: np.ndarray, cfg: GRPOConfig,
                  reference: dict[str, mx.array] | None = None, n_tokens: int | None = None) -> dict[str, float]:
    """One AdamW step on :func:`grpo_loss` over ``examples`` (``cfg.batch_size`` at a time, gradients
    summed; every part normalised by ``n_tokens``, the whole batch's completion tokens, by default
    ``examples``'). Under ``mlx.launch`` the gradients and the loss's parts are summed over the ranks
    (:func:`all_ranks`), each with its share of the batch. Without a KL term, a completion whose
    advantage is 0 adds nothing to the loss or its gradient, so it is skipped."""
    cpu_ops.use_cpu_ops(model, False)  # mlx-lm's layers: generation leaves cpu_ops' ones, slower under mx.grad
    n_tokens = n_tokens or sum(len(ids) - start for ids, start in examples)
    use_kl = reference is not None and cfg.beta > 0
    rows = [i for i in range(len(examples)) if use_kl or adv[i] != 0]
    parts = [rows[i: i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    batches = [collate([examples[i] for i in part], cfg.share_prefix) for part in parts]
    advs = [token_advantages([examples[i] for i in part], adv[part]) for part in parts]
    refs = reference_logprobs(model, batches, reference) if use_kl else [None] * len(batches)
    loss_and_grad = nn.value_and_grad(model, grpo_loss)
    grads, totals = None, np.zeros(3)
    for b, a, ref in zip(batches, advs, refs):
        values, g = loss_and_grad(model, b, a, ref, None, cfg.beta, cfg.eps_low, cfg.eps_high, n_tokens)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(values, grads)
        totals += [v.item() for v in values]
    if grads is None:  # nothing to learn from: a zero gradient, so AdamW's state still advances
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
    grads, totals = all_ranks(grads, totals)
    if cfg.grad_clip > 0:
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return {"loss": float(totals[0]), "kl": float(totals[1]) if use_kl else None, "clip_frac": float(totals[2]),
            "lr": float(optimizer.learning_rate.item())}


def grpo_step(model: nn.Module, tokenizer, optimizer, questions: list[dict], scorer: Scorer, cfg: GRPOConfig,
              seed: int, reference: dict[str, mx.array] | None = None, system: str = SYSTEM_PROMPT) -> dict[str, Any]:
    """Sample G completions per question (seeded by ``seed``, chunk by chunk: :func:`sample_chunks`),
    score them, update once; returns the step's metrics: rewards (mean, std), format rate, accuracy,
    KL, clip fraction, tokens/s. Under ``mlx.launch`` this rank samples and trains on its share of
    the chunks; the metrics, gathered, are the whole step's on every rank."""
    t0 = time.perf_counter()
    chunks = distributed.shard(list(enumerate(sampling_chunks(len(questions), cfg))))
    examples, done = sample_chunks(model, tokenizer, questions, scorer, cfg, seed, chunks, system)
    rewards = np.array([c[0] for chunk in done for c in chunk], dtype=np.float64)
    adv = advantages(rewards, cfg.group_size, cfg.advantage_scale)
    every = np.array([c for chunk in distributed.gather_shards(done) for c in chunk], dtype=np.float64).reshape(-1, 4)
    tokens = int(every[:, 3].sum())
    t1 = time.perf_counter()
    stats = policy_update(model, optimizer, examples, adv, cfg, reference, tokens)
    t2 = time.perf_counter()
    groups = every[:, 0].reshape(-1, cfg.group_size)
    return {
        "reward_mean": float(every[:, 0].mean()),
        "reward_std": float(every[:, 0].std()),
        "format_rate": float(every[:, 1].mean()),
        "accuracy": float(every[:, 2].mean()),
        **stats,
        "flat_groups": float(np.mean(groups.max(axis=1) == groups.min(axis=1))),  # no learning signal
        "completion_tokens": tokens,
        "tok_s": tokens / max(t2 - t0, 1e-9),
        "sample_s": round(t1 - t0, 3),
        "update_s": round(t2 - t1, 3),
    }


# ------------------------------------------------------------------------------------- loop


def draw_questions(pool_size: int, n: int, seed: int, step: int) -> list[int]:
    """Pool indices of step ``step``'s questions: ``n`` distinct ones, a function of (seed, step)."""
    return random.Random(seed * 1_000_003 + step).sample(range(pool_size), min(n, pool_size))


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of step ``step``."""
    return (seed * 1_000_003 + step) % 2**31


def attach_policy(model: nn.Module, lora: LoraConfig, seed: int, init_adapter: str | None) -> dict:
    """Put LoRA on ``model`` (initialised from ``seed``, or ``init_adapter``'s weights); returns the
    adapter config saved with it."""
    adapter_cfg = attach_lora(model, lora, seed, init_adapter)
    model.eval()  # no LoRA dropout: the policy trained is the one sampled
    return adapter_cfg


def _write_log(path: Path, rows: list[dict], append: bool) -> None:
    if distributed.world()[0] == 0:  # under mlx.launch rank 0 writes for all
        with path.open("a" if append else "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def _progress_info(m: dict) -> dict:
    info = {"reward": round(m["reward_mean"], 3), "std": round(m["reward_std"], 3),
            "fmt": round(m["format_rate"], 2), "acc": round(m["accuracy"], 2)}
    if m["kl"] is not None:
        info["kl"] = round(m["kl"], 4)
    return dict(info, clip=round(m["clip_frac"], 3), tok_s=round(m["tok_s"]))


def _started(model: nn.Module, optimizer, out: Path, resume: bool, progress: Progress) -> tuple[int, list, float]:
    """The step to start at, the log so far and the time spent before: a resume's from the checkpoint
    (read by every rank); the log file is (re)written to match (a resumed run drops steps logged
    after its checkpoint)."""
    start, log, earlier_s = 0, [], 0.0
    if resume:
        state = load_checkpoint(model, optimizer, out, progress.log)
        start, log, earlier_s = state["step"], state["log"], state.get("wall_s", 0.0)
    if distributed.world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
    _write_log(out / LOG_FILE, log, append=False)
    return start, log, earlier_s


def _roll_back(model: nn.Module, optimizer, log: list[dict], snapshot: tuple | None) -> None:
    """After a stop inside a step (``snapshot``: what it started from): back to the last finished one."""
    if snapshot is not None:
        swap_adapter(model, snapshot[0])
        optimizer.state = snapshot[1]
        del log[snapshot[2]:]


def train_grpo(model: nn.Module, tokenizer, pool: list[dict], scorer: Scorer, cfg: GRPOConfig, lora: LoraConfig,
               out_dir: str | Path, base_model: str, resume: bool = False, progress: Progress | None = None,
               init_adapter: str | None = None, system: str = SYSTEM_PROMPT, tags: bool = False) -> dict:
    """GRPO-train a LoRA policy on the ``pool`` questions (chats under the ``system`` message, which
    the adapter records, with ``tags``: whether the prompts carry letter tags), rewarded by
    ``scorer`` (:func:`kg_scorer`), from ``init_adapter`` (else a fresh LoRA); the reference of the
    KL term is that start. Writes the adapter, checkpoints and ``grpo_log.jsonl`` (one metrics dict
    per step) to ``out_dir``.

    Under ``mlx.launch`` each rank samples and trains on its share of every step (:func:`grpo_step`);
    rank 0 alone writes and reports progress. A Ctrl-C, or under ``mlx.launch`` a rank that stops,
    ends the training with a checkpoint of the last finished step (:func:`tracer.train.stopped`)."""
    if not pool:
        raise TracerError("no GRPO questions")
    rank, _ = world()
    progress = progress if progress is not None and rank == 0 else NullProgress()
    out = Path(out_dir)
    adapter_cfg = dict(attach_policy(model, lora, cfg.seed, init_adapter), system_prompt=system, option_tags=tags)
    reference = dict(adapter_weights(model)) if cfg.beta > 0 else None
    optimizer = optim.AdamW(learning_rate=schedule(cfg), weight_decay=cfg.weight_decay)
    start, log, earlier_s = _started(model, optimizer, out, resume, progress)
    t0 = time.perf_counter()

    def checkpoint(step: int) -> Path:
        if rank:
            return out / "checkpoint"
        wall_s = round(earlier_s + time.perf_counter() - t0, 2)
        return save_checkpoint(model, optimizer, out, adapter_cfg, base_model,
                               {"step": step, "log": log, "wall_s": wall_s})

    progress.start("grpo", total=cfg.iters)
    progress.update(start)
    snapshot = None  # adapter and optimizer state before the running step, for a clean Ctrl-C
    try:
        for step in range(start, cfg.iters):
            idx = draw_questions(len(pool), cfg.batch_questions, cfg.seed, step)
            snapshot = (adapter_weights(model), tree_map(lambda x: x, optimizer.state), step)
            m = grpo_step(model, tokenizer, optimizer, [pool[i] for i in idx], scorer, cfg,
                          step_seed(cfg.seed, step), reference, system)
            log.append({"step": step + 1, **m, "questions": [pool[i].get("id", i) for i in idx]})
            snapshot = None
            _write_log(out / LOG_FILE, log[-1:], append=True)
            share_cores()  # nothing in flight here
            release_freed_pages()
            progress.update(1, **_progress_info(m))
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.iters:
                checkpoint(step + 1)
    except (KeyboardInterrupt, RuntimeError) as exc:
        if not stops_training(exc):
            raise
        _roll_back(model, optimizer, log, snapshot)
        path = checkpoint(len(log))
        progress.stop()
        raise stopped(exc, rank, len(log), path) from None
    finally:
        cpu_ops.use_cpu_ops(model, False)
    progress.stop()
    checkpoint(cfg.iters)
    if rank == 0:
        save_adapter(model, out, adapter_cfg, base_model)
    return {"steps": cfg.iters, "log": log, "wall_s": round(earlier_s + time.perf_counter() - t0, 2),
            "final_reward": log[-1]["reward_mean"] if log else float("nan"), "adapter": str(out)}
