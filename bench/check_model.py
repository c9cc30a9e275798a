"""Check the offline default model end to end: pull, load, perplexity, greedy chat answer.

    PYTHONPATH=src python bench/check_model.py [--spec smollm2-135m-instruct] [--cache-dir DIR]

Prints pull / load time, fp32 matmul GFLOP/s, perplexity on plain English (SmolLM2-135M: ~10;
a wrong q/k RoPE layout gives ~200) and the greedy answer to a chat question (should say Paris).
"""

from __future__ import annotations

import argparse
import json
import math
import time

from tracer import backend

backend.setup()

import mlx.core as mx  # noqa: E402

from tracer import model as tm  # noqa: E402
from tracer.doctor import device_info  # noqa: E402

TEXT = [
    "The history of the city goes back more than two thousand years. It was founded as a small "
    "settlement on the banks of a river, where farmers and traders met to exchange goods. Over the "
    "centuries it grew into an important center of commerce, art and learning.",
    "Regular exercise has many benefits for both the body and the mind. It strengthens the heart, "
    "improves sleep and helps people maintain a healthy weight. Even a short walk every day can make "
    "a noticeable difference in how you feel.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure "
    "is lower, so water boils at a lower temperature, which is why cooking pasta in the mountains "
    "takes longer than it does at the coast.",
]


def perplexity(model, tokenizer, texts: list[str]) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = mx.array([tokenizer.encode(text)])
        logits = model(ids[:, :-1]).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tgt = mx.take_along_axis(logp, ids[:, 1:, None], axis=-1)
        nll -= tgt.sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def greedy(model, tokenizer, question: str, max_tokens: int = 40) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    for _ in range(max_tokens):  # no KV cache: simple and short
        logits = model(mx.array([ids + out]))[0, -1]
        nxt = int(mx.argmax(logits).item())
        if nxt in tokenizer.eos_token_ids:
            break
        out.append(nxt)
    return tokenizer.decode(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="smollm2-135m-instruct")
    ap.add_argument("--cache-dir", default="~/.cache/tracer")
    args = ap.parse_args()

    t = time.perf_counter()
    path = tm.resolve(args.spec, args.cache_dir, progress=None)
    pull_s = time.perf_counter() - t
    t = time.perf_counter()
    model, tokenizer = tm.load(args.spec, args.cache_dir)
    load_s = time.perf_counter() - t
    info = device_info()
    t = time.perf_counter()
    ppl = perplexity(model, tokenizer, TEXT)
    ppl_s = time.perf_counter() - t
    answer = greedy(model, tokenizer, "What is the capital of France?")
    print(json.dumps({
        "model_dir": str(path),
        "resolve_or_pull_s": round(pull_s, 2),
        "load_s": round(load_s, 2),
        "device": info,
        "perplexity": round(ppl, 2),
        "perplexity_s": round(ppl_s, 2),
        "eos_token_ids": sorted(tokenizer.eos_token_ids),
        "greedy_answer": answer,
        "mentions_paris": "paris" in answer.lower(),
    }, indent=2))


if __name__ == "__main__":
    main()
