"""LoRA adapters and checkpoints (tracer.adapters): attached fresh or from a saved adapter; checkpoints
survive damage and full disks (resume falls back, failed writes clean up)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from tracer import adapters, train
from tracer.config import LoraConfig, TrainConfig
from tracer.errors import TracerError
from tracer.format import SYSTEM_PROMPT
from tracer.progress import NullProgress

from tiny_model import build_tiny_model  # tests/tiny_model.py

PAIRS = [(f"Follow E{i} -r{i % 3}-> ?", f"TRACE: E{i} -r{i % 3}-> E{(i * 7 + 3) % 12}\nANSWER: A") for i in range(12)]
CFG = TrainConfig(iters=6, batch_size=4, learning_rate=1e-3, warmup=1, save_every=2, val_every=0, seed=3)
LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n"
             f"<|im_start|>assistant\n{c}<|im_end|>\n" for p, c in PAIRS]
    out = tmp_path_factory.mktemp("ckpt") / "model"
    build_tiny_model(out, texts, vocab_size=400, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    return str(out)


def fresh(model_dir):
    from tracer import model as models

    return models.load(model_dir)


class Log(NullProgress):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def interrupted_at(model_dir, out, step):
    """Train into ``out`` and stop (as Ctrl-C would) after ``step`` steps."""
    class StopAt(NullProgress):
        seen = 0

        def update(self, advance=1, **info):
            self.seen += advance
            if self.seen == step:
                raise KeyboardInterrupt

    model, tok = fresh(model_dir)
    with pytest.raises(train.TrainingInterrupted):
        train.train(model, tok, PAIRS, CFG, LORA, out, "tiny", progress=StopAt())


def test_damaged_checkpoint_falls_back_to_the_previous_one(model_dir, tmp_path):
    model, tok = fresh(model_dir)
    full = train.train(model, tok, PAIRS, CFG, LORA, tmp_path / "full", "tiny")
    out = tmp_path / "split"
    interrupted_at(model_dir, out, 5)  # checkpoints at steps 2 and 4, then 5 on the interrupt
    assert json.loads((out / "checkpoint.prev" / "state.json").read_text())["step"] == 4
    weights = out / "checkpoint" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash or a full disk
    log = Log()
    model, tok = fresh(model_dir)
    stats = train.train(model, tok, PAIRS, CFG, LORA, out, "tiny", resume=True, progress=log)
    assert any("is damaged" in line and "resuming from checkpoint.prev at step 4" in line for line in log.lines)
    assert np.allclose(stats["losses"], full["losses"], atol=1e-5)  # the same run, steps 5-6 redone


def test_no_readable_checkpoint_is_one_clear_error(model_dir, tmp_path):
    out = tmp_path / "run"
    interrupted_at(model_dir, out, 3)
    (out / "checkpoint" / "state.json").write_text("{\"step\": ")
    (out / "checkpoint.prev" / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    model, tok = fresh(model_dir)
    with pytest.raises(TracerError) as err:
        train.train(model, tok, PAIRS, CFG, LORA, out, "tiny", resume=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.count("is damaged") == 2 and msg.endswith("no checkpoint to resume from")


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted_at(model_dir, out, 3)  # a good checkpoint at step 3
    real = mx.save_safetensors

    def full_disk(path, arrays):
        if "optimizer" in str(path):
            real(path, arrays)  # part of the checkpoint gets written first
            raise RuntimeError("[write] Unable to write 4096 bytes to file.")
        return real(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    model, tok = fresh(model_dir)
    with pytest.raises(TracerError, match=r"cannot write .*checkpoint: \[write\] Unable to write .*intact"):
        train.train(model, tok, PAIRS, CFG, LORA, out, "tiny", resume=True)
    monkeypatch.setattr(mx, "save_safetensors", real)
    assert not (out / "checkpoint.tmp").exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "checkpoint.prev"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    model, tok = fresh(model_dir)
    assert train.train(model, tok, PAIRS, CFG, LORA, out, "tiny", resume=True)["steps"] == CFG.iters


def test_full_disk_writing_an_adapter_leaves_no_temporary_file(model_dir, tmp_path, monkeypatch):
    def full_disk(path, arrays):
        open(path, "wb").write(b"\x00" * 8)
        raise RuntimeError("[write] Unable to write")

    model, _ = fresh(model_dir)
    adapters.add_lora(model, adapters.lora_config(LORA, model))
    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(TracerError, match="cannot write"):
        adapters.save_adapter(model, tmp_path / "adapter", LORA, "tiny")
    assert list((tmp_path / "adapter").iterdir()) == []


def test_attach_lora_fresh_is_seeded_and_from_an_adapter_copies_it(model_dir, tmp_path):
    a, _ = fresh(model_dir)
    cfg = adapters.attach_lora(a, LORA, seed=5)
    assert cfg == adapters.lora_config(LORA, a) and cfg["lora_parameters"]["rank"] == 4
    b, _ = fresh(model_dir)
    adapters.attach_lora(b, LORA, seed=5)
    weights = adapters.adapter_weights(a)
    assert weights and all(mx.array_equal(v, adapters.adapter_weights(b)[k]) for k, v in weights.items())
    weights = {k: v + 0.5 for k, v in weights.items()}  # a trained-looking adapter: B is zero when fresh
    a.update(tree_unflatten(list(weights.items())))
    adapters.save_adapter(a, tmp_path / "saved", cfg, "tiny")
    c, _ = fresh(model_dir)
    again = adapters.attach_lora(c, LoraConfig(rank=8, alpha=1.0), seed=9, init_adapter=str(tmp_path / "saved"))
    assert again == {k: cfg[k] for k in ("fine_tune_type", "num_layers", "lora_parameters")}  # the adapter's settings
    got = adapters.adapter_weights(c)
    assert set(got) == set(weights) and all(mx.array_equal(got[k], weights[k]) for k in weights)
