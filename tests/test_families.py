"""Model families beyond llama: tiny random Qwen2 and Qwen3 models (tied and untied output heads) and
a tiny Gemma 2 (tied, soft-capped attention and final logits, GeGLU, scaled embeddings) through SFT,
generation, adapters and a tiny `tracer run`."""

import json

import mlx.core as mx
import pytest

from tracer import batching, cpu_ops, train
from tracer.config import LoraConfig, TrainConfig
from tracer.format import SYSTEM_PROMPT
from tracer.generate import generate

from tiny_model import build_for_config, build_tiny_model  # tests/tiny_model.py

PAIRS = [(f"Follow E{i} -r{i % 2}-> ?", f"TRACE: E{i} -r{i % 2}-> E{(i + 3) % 8}\nANSWER: A") for i in range(8)]
FAMILIES = [("qwen2", True), ("qwen2", False), ("qwen3", True), ("qwen3", False), ("gemma2", True)]  # gemma2: tied only


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def family_model(request, tmp_path_factory):
    arch, tie = request.param
    texts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n"
             f"<|im_start|>assistant\n{c}<|im_end|>\n" for p, c in PAIRS]
    out = tmp_path_factory.mktemp(arch) / "model"
    build_tiny_model(out, texts, vocab_size=300, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64,
                     arch=arch, tie=tie)
    return str(out), arch, tie


def test_training_logits_are_the_models_own(family_model):
    from tracer import model as models

    path, arch, tie = family_model
    m, tok = models.load(path)
    assert json.loads((__import__("pathlib").Path(path) / "config.json").read_text())["model_type"] == arch
    assert hasattr(m, "lm_head") != tie
    b = batching.collate(batching.encode_pairs(tok, PAIRS, 256), share_prefix=True)
    flat = batching.collate(batching.encode_pairs(tok, PAIRS, 256), share_prefix=False)
    want = train.full_loss(m, flat.inputs, flat.positions, flat.targets).item()  # the model's own forward
    assert train.loss_fn(m, flat.inputs, flat.positions, flat.targets).item() == pytest.approx(want, rel=1e-5)
    assert train.loss_fn(m, b.inputs, b.positions, b.targets, b.prefix).item() == pytest.approx(want, rel=1e-4)
    assert cpu_ops.use_cpu_ops(m) == 0  # cpu_ops' layers are llama's: other families keep their own
    # the logits at the loss positions are the model's own (head, tied or not, and soft-cap)
    full = m(flat.inputs)
    full = full.reshape(-1, full.shape[-1])[flat.positions]
    h = train.hidden(m, flat.inputs)
    mine = train.output_logits(m, h.reshape(-1, h.shape[-1])[flat.positions])
    assert mx.allclose(mine, full, atol=1e-4).item()
    if arch == "gemma2":  # the cap applies: no logit beyond it
        assert mx.abs(full).max().item() <= m.args.final_logit_softcapping


def test_batched_generation_and_fast_layers(family_model):
    """Prompts of different lengths in one left-padded batch (a padding mask over grouped KV heads)
    decode as each does alone, and generation's layers leave the model's logits as they were."""
    from tracer import model as models
    from tracer.generate import last_logits, use_fast_layers

    path, _, _ = family_model
    m, tok = models.load(path)
    inputs = mx.array([tok.encode(PAIRS[3][0] + PAIRS[5][1])])
    before = m(inputs)
    assert mx.allclose(last_logits(m, inputs, None), before[:, -1], atol=1e-4).item()  # generation's head
    use_fast_layers(m)
    assert mx.allclose(m(inputs), before, atol=1e-4).item()
    prompts = [PAIRS[0][0], PAIRS[1][0] + " and then " + PAIRS[2][0], PAIRS[3][0] + " twice over, please"]
    batched = generate(m, tok, prompts, max_tokens=8, stop_after_answer=False)
    assert batched == [generate(m, tok, [p], max_tokens=8, stop_after_answer=False)[0] for p in prompts]


def test_sft_adapter_and_generation(family_model, tmp_path):
    from tracer import model as models

    path, _, _ = family_model
    m, tok = models.load(path)
    cfg = TrainConfig(iters=8, batch_size=4, learning_rate=1e-2, warmup=1, val_every=0, save_every=4)
    stats = train.train(m, tok, PAIRS, cfg, LoraConfig(rank=4, alpha=16.0), tmp_path / "a", models.model_id(path))
    assert stats["losses"][-1] < stats["losses"][0]
    in_memory = generate(m, tok, [p for p, _ in PAIRS[:3]], max_tokens=10)
    fused, ftok = models.load(path, adapter=str(tmp_path / "a"), fuse=True)
    loaded, ltok = models.load(path, adapter=str(tmp_path / "a"))
    assert generate(fused, ftok, [p for p, _ in PAIRS[:3]], max_tokens=10) == in_memory
    assert generate(loaded, ltok, [p for p, _ in PAIRS[:3]], max_tokens=10) == in_memory
    assert mx.load(str(tmp_path / "a" / "adapters.safetensors"))


@pytest.mark.parametrize("arch,tie", [("qwen3", False), ("gemma2", True)])
def test_tiny_run(arch, tie, tiny_work, capsys, tmp_path):
    """`tracer run` end to end (base, SFT, RSFT, consolidate) on a tiny untied Qwen3 and a tiny Gemma 2."""
    from tracer.cli import main
    from tracer.config import load_config

    cfg = load_config(tiny_work / "tiny.toml")
    model_dir = build_for_config(cfg, tmp_path / arch, arch=arch, tie=tie)
    assert main(["run", "tiny.toml", "--model", str(model_dir), "--name", arch]) == 0, capsys.readouterr().err
    metrics = json.loads((tiny_work / "data" / "runs" / arch / "metrics.json").read_text())
    assert set(metrics["phases"]) == {"base", "sft", "rsft", "consolidate"}
    assert all(entry["n"] == 12 for entry in metrics["phases"].values())
