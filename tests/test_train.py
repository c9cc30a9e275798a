"""LoRA training on the tiny model: learning, exact resume, adapter format, masked loss."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tracer import service, train
from tracer.cli import main
from tracer.config import LoraConfig, TrainConfig, load_config, override
from tracer.errors import TrainingInterrupted
from tracer.progress import NullProgress

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny KG splits + the tiny model, built once for this module."""
    work = tmp_path_factory.mktemp("tiny")
    (work / "data").mkdir()
    shutil.copy(ROOT / "data" / "tiny_kg.json", work / "data" / "tiny_kg.json")
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    cfg = override(cfg, data__kg=str(work / "data" / "tiny_kg.json"), data__out_dir=str(work / "data" / "tiny"),
                   model__cache_dir=str(work / "cache"), run__runs_dir=str(work / "runs"))
    service.make_data(cfg)
    model_dir = service.tiny_model_dir(cfg)
    pairs = [(r["prompt"], r["ref"]["trace"]) for r in service.load_split(cfg, "train")]
    return {"work": work, "cfg": cfg, "model_dir": str(model_dir), "pairs": pairs}


def fresh(tiny):
    from tracer import model as models

    return models.load(tiny["model_dir"])


def weights(path) -> dict:
    return dict(mx.load(str(Path(path) / "adapters.safetensors")))


def test_masked_gather_loss_equals_full_logits_loss(tiny):
    model, tok = fresh(tiny)
    examples = train.encode_pairs(tok, tiny["pairs"][:6], 512)
    batch = train.collate(examples)[:3]
    assert train.loss_fn(model, *batch).item() == pytest.approx(train.full_loss(model, *batch).item(), rel=1e-5)
    # only completion tokens (and the end-of-turn) are targets
    inputs, positions, targets = batch
    n_completion = sum(len(ids) - start for ids, start in examples)
    assert positions.size == n_completion
    assert targets.tolist().count(tok.eos_token_id) == len(examples)


def test_batches_are_length_grouped_and_deterministic():
    lengths = [10, 200, 11, 199, 12, 198, 13, 197] * 8
    a = train.epoch_batches(lengths, 4, seed=3, epoch=0)
    assert a == train.epoch_batches(lengths, 4, seed=3, epoch=0)
    assert a != train.epoch_batches(lengths, 4, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in a)
    assert waste < 0.05 * sum(lengths)
    hops = [1, 3, 2, 1] * 16
    cur = train.epoch_batches(lengths, 4, seed=3, epoch=0, hop_lens=hops, curriculum=True)
    flat = [hops[i] for b in cur for i in b]
    assert flat == sorted(flat)


def test_sft_through_cli_learns_training_questions(tiny, monkeypatch):
    """`tracer sft` then `tracer eval` on the training questions: well above chance (25%)."""
    work = tiny["work"]
    cfg_file = work / "learn.toml"
    text = (ROOT / "configs" / "tiny.toml").read_text()
    text = text.replace('path = "tiny"', f'path = "tiny"\ncache_dir = "{work / "cache"}"')
    cfg_file.write_text(text.replace('out_dir = "data/tiny"', f'out_dir = "{work / "data" / "tiny"}"')
                        .replace('kg = "data/tiny_kg.json"', f'kg = "{work / "data" / "tiny_kg.json"}"'))
    monkeypatch.chdir(work)
    adapter = work / "learned"
    assert main(["sft", "-c", str(cfg_file), "--iters", "200", "-o", str(adapter)]) == 0
    state = json.loads((adapter / "checkpoint" / "state.json").read_text())
    losses = state["losses"]
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])
    train_file = work / "data" / "tiny" / "train.jsonl"
    assert main(["eval", "-c", str(cfg_file), "--examples", str(train_file), "--adapter", str(adapter),
                 "--phase", "train_check", "-o", str(work / "check")]) == 0
    entry = json.loads((work / "check" / "metrics.json").read_text())["phases"]["train_check"]
    assert entry["format_rate"] > 0.9
    assert entry["accuracy"] > 0.6, entry


def test_resume_after_interrupt_matches_uninterrupted_run(tiny, tmp_path):
    cfg = TrainConfig(iters=8, batch_size=8, learning_rate=1e-3, warmup=2, save_every=3, val_every=0, seed=5)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    pairs = tiny["pairs"][:40]

    model, tok = fresh(tiny)
    train.train(model, tok, pairs, cfg, lora, tmp_path / "full", "tiny")

    class StopAt(NullProgress):
        seen = 0

        def update(self, advance=1, **info):
            self.seen += advance
            if self.seen == 5:
                raise KeyboardInterrupt

    model, tok = fresh(tiny)
    with pytest.raises(TrainingInterrupted) as e:
        train.train(model, tok, pairs, cfg, lora, tmp_path / "split", "tiny", progress=StopAt())
    assert e.value.step == 5
    assert json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())["step"] == 5
    assert not (tmp_path / "split" / "adapters.safetensors").exists()
    model, tok = fresh(tiny)
    stats = train.train(model, tok, pairs, cfg, lora, tmp_path / "split", "tiny", resume=True)
    assert stats["steps"] == 8 and len(stats["losses"]) == 8
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-5).item(), k


def test_adapter_loads_in_stock_mlx_lm_and_is_small(tiny, tmp_path):
    from mlx_lm import load as mlx_load

    model, tok = fresh(tiny)
    cfg = TrainConfig(iters=3, batch_size=8, warmup=0, val_every=0, save_every=100)
    train.train(model, tok, tiny["pairs"][:16], cfg, LoraConfig(rank=4, alpha=8.0), tmp_path / "ad", "tiny")
    acfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == "lora" and acfg["base_model"] == "tiny"
    assert acfg["lora_parameters"]["rank"] == 4 and acfg["lora_parameters"]["scale"] == 2.0
    saved = weights(tmp_path / "ad")
    assert all(k.endswith(("lora_a", "lora_b")) for k in saved)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert sum(v.size for v in saved.values()) < 0.2 * n_params

    stock, _ = mlx_load(tiny["model_dir"], adapter_path=str(tmp_path / "ad"))
    ids = mx.array([tok.encode("TRACE: HighLatency -caused_by-> LockContention")])
    assert mx.allclose(stock(ids), model(ids), atol=1e-4).item()


def test_continue_from_adapter_starts_from_its_weights(tiny, tmp_path):
    model, tok = fresh(tiny)
    cfg = TrainConfig(iters=4, batch_size=8, warmup=0, val_every=0, save_every=100)
    train.train(model, tok, tiny["pairs"][:16], cfg, LoraConfig(rank=4, alpha=8.0), tmp_path / "a", "tiny")
    model, tok = fresh(tiny)
    train.train(model, tok, tiny["pairs"][:16], TrainConfig(iters=1, batch_size=8, learning_rate=1e-12, warmup=0,
                val_every=0, save_every=100), LoraConfig(rank=16), tmp_path / "b", "tiny", init_adapter=str(tmp_path / "a"))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()  # the adapter's own rank (4), not the config's (16)
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k


def test_continue_refuses_adapter_of_another_base_model(tiny, tmp_path, capsys):
    adapter = tmp_path / "other"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "base_model": "someone/else"}))
    (adapter / "adapters.safetensors").write_bytes(b"")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{tiny["model_dir"]}"\n[data]\nkg = "{tiny["work"] / "data" / "tiny_kg.json"}"\n')
    code = main(["continue", "-c", str(cfg), "--adapter", str(adapter), "--train",
                 str(tiny["work"] / "data" / "tiny" / "train.jsonl"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "someone/else" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
