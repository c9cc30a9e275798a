"""LoRA training on tiny models: learning, exact resume, adapter format, masked loss."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from tracer import adapters, batching, train
from tracer.cli import main
from tracer.config import LoraConfig, TrainConfig, load_config, override, to_toml
from tracer.errors import TrainingInterrupted
from tracer.format import SYSTEM_PROMPT
from tracer.generate import generate
from tracer.pipeline.data import make_data
from tracer.progress import NullProgress

from tiny_model import build_tiny_model  # tests/tiny_model.py

FIXTURES = Path(__file__).resolve().parent / "fixtures"

ENTS = ["DiskFull", "LogRotation", "CronJob", "OOMKill", "MemoryLimit", "CacheEviction", "TLSHandshake",
        "CertExpiry", "DNSTimeout", "ResolverConfig", "PoolExhausted", "ConnLeak", "HighLatency",
        "LockContention", "SlowQuery", "MissingIndex", "PacketLoss", "NetFlap", "GCPause", "HeapSize"]
RELS = ["caused_by", "fixed_by", "depends_on", "mitigated_by"]
# 20 facts "X -rel-> Y": the completion copies X and rel from the prompt and recalls Y
FACTS = [(ENTS[i], RELS[i % 4], ENTS[(i * 7 + 3) % 20]) for i in range(20)]
PAIRS = [(f"Follow {x} -{rel}-> ?", f"TRACE: {x} -{rel}-> {y}\nANSWER: {y}") for x, rel, y in FACTS]


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def facts_model(tmp_path_factory):
    """A 2-layer random llama whose tokenizer is fitted to the synthetic facts."""
    texts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n"
             f"<|im_start|>assistant\n{c}<|im_end|>\n" for p, c in PAIRS]
    out = tmp_path_factory.mktemp("facts") / "model"
    build_tiny_model(out, texts, vocab_size=700, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    return str(out)


def fresh(model_dir):
    from tracer import model as models

    return models.load(model_dir)


def weights(path) -> dict:
    return dict(mx.load(str(Path(path) / "adapters.safetensors")))


def test_learns_the_training_facts(facts_model, tmp_path):
    model, tok = fresh(facts_model)
    cfg = TrainConfig(iters=200, batch_size=20, learning_rate=2e-3, warmup=5, val_every=50, save_every=1000)
    stats = train.train(model, tok, PAIRS, cfg, LoraConfig(rank=16, alpha=32.0), tmp_path / "ad", "tiny",
                        val_pairs=PAIRS[:4])
    losses = stats["losses"]
    assert len(losses) == 200 and stats["steps"] == 200 and stats["tokens"] > 0 and stats["tok_s"] > 0
    assert np.mean(losses[-5:]) < 0.1 * np.mean(losses[:3])
    assert [s for s, _ in stats["val_losses"]] == [50, 100, 150, 200]
    outs = generate(model, tok, [p for p, _ in PAIRS], max_tokens=24, batch_size=20)
    exact = sum(o.strip() == c for o, (_, c) in zip(outs, PAIRS))
    answers = sum(o.strip().endswith(f"ANSWER: {y}") for o, (_, _, y) in zip(outs, FACTS))
    assert exact >= 10 and answers >= 10, outs  # chance is 1 in 20


def test_masked_gather_loss_equals_full_logits_loss(facts_model):
    model, tok = fresh(facts_model)
    examples = batching.encode_pairs(tok, PAIRS[:6], 512)
    b = batching.collate(examples, share_prefix=False)
    inputs, positions, targets = b.inputs, b.positions, b.targets
    assert b.prefix is None
    gathered = train.loss_fn(model, inputs, positions, targets).item()
    assert gathered == pytest.approx(train.full_loss(model, inputs, positions, targets).item(), rel=1e-5)
    # the same loss written as a masked mean over full logits of right-padded (input, target) rows
    width = inputs.shape[1]
    tgt = np.zeros((len(examples), width), np.int32)
    mask = np.zeros((len(examples), width), np.float32)
    for row, (ids, start) in enumerate(examples):
        tgt[row, : len(ids) - 1] = ids[1:]
        mask[row, start - 1: len(ids) - 1] = 1.0
    ce = nn.losses.cross_entropy(model(inputs), mx.array(tgt), reduction="none")
    masked = (ce * mx.array(mask)).sum() / mask.sum()
    assert gathered == pytest.approx(masked.item(), rel=1e-5)
    # only completion tokens and the end-of-turn are targets
    assert positions.size == sum(len(ids) - start for ids, start in examples) == mask.sum()
    assert targets.tolist().count(tok.eos_token_id) == len(examples)
    assert b.tokens == sum(len(ids) for ids, _ in examples)


def test_shared_prefix_gives_the_same_loss_and_gradients(facts_model):
    model, tok = fresh(facts_model)
    adapters.add_lora(model, LoraConfig(rank=4, alpha=8.0))
    # LoRA's B starts at zero: give it values so the adapter changes the prefix's keys/values too
    model.update(tree_map(lambda a: mx.random.normal(a.shape) * 0.05, model.trainable_parameters()))
    examples = batching.encode_pairs(tok, PAIRS[:7], 512)
    shared, plain = batching.collate(examples), batching.collate(examples, share_prefix=False)
    P = shared.prefix.shape[1]
    assert P >= 8 and shared.inputs.shape[1] == plain.inputs.shape[1] - P
    assert shared.tokens == plain.tokens and shared.targets.tolist() == plain.targets.tolist()
    grad = nn.value_and_grad(model, train.loss_fn)
    loss_s, g_s = grad(model, *shared[:3], shared.prefix)
    loss_p, g_p = grad(model, *plain[:3], plain.prefix)
    assert loss_s.item() == pytest.approx(loss_p.item(), rel=1e-5)
    flat_s, flat_p = dict(tree_flatten(g_s)), dict(tree_flatten(g_p))
    assert flat_s.keys() == flat_p.keys() and len(flat_s) > 0
    for k in flat_s:
        assert mx.allclose(flat_s[k], flat_p[k], rtol=1e-4, atol=1e-6).item(), k
    # the prefix never swallows a loss position: an example whose completion starts early
    short = [(examples[0][0], 3)] + examples[1:]
    assert batching.collate(short).prefix is None


def test_encode_pairs_keeps_the_completion_when_truncating(facts_model):
    _, tok = fresh(facts_model)
    full = batching.encode_pairs(tok, PAIRS[:1], 512)[0]
    ids, start = batching.encode_pairs(tok, PAIRS[:1], 20)[0]
    completion = full[0][full[1]:]
    assert len(ids) == 20 and ids[start:] == completion and ids[:start] == full[0][full[1] - start: full[1]]
    assert completion[-1] == tok.eos_token_id


def token_ce(model, b: batching.Batch) -> mx.array:
    """Cross-entropy at each of the batch's loss positions, from full logits."""
    logits = model(b.inputs)
    return nn.losses.cross_entropy(logits.reshape(-1, logits.shape[-1])[b.positions], b.targets, reduction="none")


def answer_ce(model, tok, pairs) -> float:
    """Mean cross-entropy of the answers' first tokens (what ``answer_weight`` weighs)."""
    examples = batching.encode_pairs(tok, pairs, 512)
    b = batching.collate(examples, False, None, batching.answer_indices(tok, pairs, examples), 2.0)
    at_answer = (b.weights == 2.0).astype(mx.float32)
    return ((token_ce(model, b) * at_answer).sum() / at_answer.sum()).item()


def test_answer_indices_and_weighted_loss(facts_model):
    model, tok = fresh(facts_model)
    pairs = PAIRS[:6] + [("Follow DiskFull -caused_by-> ?", "TRACE: DiskFull -caused_by-> CronJob")]
    examples = batching.encode_pairs(tok, pairs, 512)
    answers = batching.answer_indices(tok, pairs, examples)
    assert answers[-1] == -1  # no ANSWER line
    for (ids, start), at, (_, _, y) in zip(examples[:6], answers, FACTS):
        assert start <= at < len(ids) - 1 and tok.decode(ids[at:-1]).strip() == y
    cut = batching.encode_pairs(tok, PAIRS[:1], 8)  # the completion's end (answer, end-of-turn) cut off
    assert len(cut[0][0]) == 8 and batching.answer_indices(tok, PAIRS[:1], cut) == [-1]

    assert batching.collate(examples, False, None, answers, 1.0).weights is None
    b = batching.collate(examples, False, None, answers, 5.0)
    width = b.inputs.shape[1]
    w = b.weights.tolist()
    assert len(w) == b.positions.size and set(w) == {1.0, 5.0}
    # 5 exactly where the position predicts an answer's first token
    at_answer = {row * width + at - 1 for row, at in enumerate(answers) if at >= 0}
    assert {p for p, x in zip(b.positions.tolist(), w) if x == 5.0} == at_answer and len(at_answer) == 6
    # the loss is the weighted mean of the per-token cross-entropy
    ce = token_ce(model, b)
    expected = ((ce * b.weights).sum() / b.weights.sum()).item()
    assert train.loss_fn(model, b.inputs, b.positions, b.targets, None, b.weights).item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(ce.mean().item(), rel=1e-3)
    # padded for the compiled step: padding weighs 0, the answers still 5, the same loss
    padded = batching.collate(examples, False, train.COMPILED_PAD, answers, 5.0)
    pw = padded.weights.tolist()
    assert pw.count(5.0) == 6 and pw.count(0.0) == padded.positions.size - len(w)
    assert train.loss_fn(model, padded.inputs, padded.positions, padded.targets, None, padded.weights).item() == \
        pytest.approx(expected, rel=1e-5)


def test_answer_weight_trains_the_answer_token_faster(facts_model, tmp_path):
    ce = {}
    for weight in (1.0, 10.0):
        model, tok = fresh(facts_model)
        cfg = TrainConfig(iters=25, batch_size=20, learning_rate=2e-3, warmup=5, val_every=0, save_every=1000,
                          answer_weight=weight)
        train.train(model, tok, PAIRS, cfg, LoraConfig(rank=16, alpha=32.0), tmp_path / str(weight), "tiny")
        ce[weight] = answer_ce(model, tok, PAIRS)
    assert ce[10.0] < 0.5 * ce[1.0], ce


def test_resume_after_interrupt_matches_uninterrupted_run(facts_model, tmp_path):
    cfg = TrainConfig(iters=10, batch_size=8, learning_rate=1e-3, warmup=2, save_every=5, val_every=0, seed=5)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1)  # dropout: the per-step RNG must be reproduced too

    model, tok = fresh(facts_model)
    full = train.train(model, tok, PAIRS, cfg, lora, tmp_path / "full", "tiny")

    class StopAt(NullProgress):
        seen = 0

        def update(self, advance=1, **info):
            self.seen += advance
            if self.seen == 7:
                raise KeyboardInterrupt

    model, tok = fresh(facts_model)
    with pytest.raises(TrainingInterrupted) as e:
        train.train(model, tok, PAIRS, cfg, lora, tmp_path / "split", "tiny", progress=StopAt())
    assert e.value.step == 7
    ckpt = tmp_path / "split" / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 7 and state["wall_s"] > 0
    assert (ckpt / "optimizer.safetensors").is_file() and not (tmp_path / "split" / "checkpoint.tmp").exists()
    assert not (tmp_path / "split" / "adapters.safetensors").exists()
    model, tok = fresh(facts_model)
    stats = train.train(model, tok, PAIRS, cfg, lora, tmp_path / "split", "tiny", resume=True)
    assert stats["steps"] == 10 and len(stats["losses"]) == 10
    assert stats["wall_s"] > state["wall_s"]  # training time counts the interrupted part too
    assert np.allclose(stats["losses"], full["losses"], atol=1e-5)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-5).item(), k


def test_adapter_loads_in_stock_mlx_lm_and_is_small(facts_model, tmp_path):
    from mlx_lm import load as mlx_load

    model, tok = fresh(facts_model)
    cfg = TrainConfig(iters=3, batch_size=8, warmup=0, val_every=0, save_every=100)
    train.train(model, tok, PAIRS, cfg, LoraConfig(rank=4, alpha=8.0), tmp_path / "ad", "tiny")
    acfg = adapters.read_adapter_config(tmp_path / "ad")
    assert acfg["fine_tune_type"] == "lora" and acfg["base_model"] == "tiny" and acfg["tracer_version"]
    assert acfg["num_layers"] == 2
    assert acfg["lora_parameters"]["rank"] == 4 and acfg["lora_parameters"]["scale"] == 2.0
    saved = weights(tmp_path / "ad")
    assert saved and all(k.endswith(("lora_a", "lora_b")) for k in saved)
    assert len(saved) == 2 * 2 * 7  # lora_a + lora_b × 2 layers × 7 projections
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert sum(v.size for v in saved.values()) < 0.2 * n_params
    size = (tmp_path / "ad" / "adapters.safetensors").stat().st_size
    assert size < 4 * sum(v.size for v in saved.values()) + 16_384

    stock, _ = mlx_load(facts_model, adapter_path=str(tmp_path / "ad"))
    ids = mx.array([tok.encode("TRACE: DiskFull -caused_by-> OOMKill")])
    assert mx.allclose(stock(ids), model(ids), atol=1e-4).item()


def test_init_adapter_continues_from_its_weights(facts_model, tmp_path):
    model, tok = fresh(facts_model)
    cfg = TrainConfig(iters=4, batch_size=8, warmup=0, val_every=0, save_every=100)
    train.train(model, tok, PAIRS, cfg, LoraConfig(rank=4, alpha=8.0), tmp_path / "a", "tiny")
    model, tok = fresh(facts_model)
    tiny_lr = TrainConfig(iters=1, batch_size=8, learning_rate=1e-12, warmup=0, val_every=0, save_every=100)
    train.train(model, tok, PAIRS, tiny_lr, LoraConfig(rank=16), tmp_path / "b", "tiny", init_adapter=str(tmp_path / "a"))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()  # the adapter's own rank (4), not the config's (16)
    for k in a:
        assert a[k].shape == b[k].shape and mx.allclose(a[k], b[k], atol=1e-6).item(), k
    assert adapters.read_adapter_config(tmp_path / "b")["lora_parameters"]["rank"] == 4


def test_continue_refuses_adapter_of_another_base_model(tmp_path, capsys, tiny_model):
    work = tmp_path / "w"
    (work / "data").mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny_kg.json", work / "data" / "tiny_kg.json")
    cfg = override(load_config(FIXTURES / "tiny.toml"), data__kg=str(work / "data" / "tiny_kg.json"),
                   data__out_dir=str(work / "data" / "tiny"), model__path=str(tiny_model),
                   model__cache_dir=str(work / "cache"))
    make_data(cfg)
    adapter = tmp_path / "other"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "base_model": "someone/else"}))
    (adapter / "adapters.safetensors").write_bytes(b"")
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(to_toml(cfg))
    code = main(["continue", "-c", str(cfg_file), "--adapter", str(adapter), "--train",
                 str(work / "data" / "tiny" / "train.jsonl"), "--adapter-out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "someone/else" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_sft_and_continue_train_on_several_files_together(tiny_work, capsys):
    assert main(["data", "-c", "tiny.toml"]) == 0
    lines = (tiny_work / "data" / "tiny" / "train.jsonl").read_text().splitlines(keepends=True)
    (tiny_work / "a.jsonl").write_text("".join(lines[:5]))
    (tiny_work / "b.jsonl").write_text("".join(lines[5:12]))
    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "-t", "a.jsonl", "-t", "b.jsonl", "--adapter-out", "two"]) == 0
    settings = json.loads((tiny_work / "two" / "train_settings.json").read_text())
    assert settings["rows"] == 12 and settings["source"] == "a.jsonl + b.jsonl"
    assert main(["continue", "-c", "tiny.toml", "--iters", "1", "-a", "two", "-t", "b.jsonl", "-t", "a.jsonl",
                 "--adapter-out", "more"]) == 0
    assert json.loads((tiny_work / "more" / "train_settings.json").read_text())["rows"] == 12
    capsys.readouterr()
    (tiny_work / "c.jsonl").write_text(lines[6])  # an id b.jsonl has too
    assert main(["sft", "-c", "tiny.toml", "-t", "b.jsonl", "-t", "c.jsonl", "--adapter-out", "dup"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c.jsonl" in err[0] and "also in b.jsonl" in err[0] and not (tiny_work / "dup").exists()


def test_interrupt_inside_a_step_rolls_back_to_the_last_finished_step(facts_model, tmp_path, monkeypatch):
    cfg = TrainConfig(iters=6, batch_size=8, learning_rate=1e-3, warmup=1, save_every=100, val_every=0, seed=2)
    lora = LoraConfig(rank=4, alpha=8.0)
    model, tok = fresh(facts_model)
    train.train(model, tok, PAIRS, cfg, lora, tmp_path / "full", "tiny")

    class Mx:  # mlx.core, except that the 4th mx.eval (step 4, after the update) is a Ctrl-C
        calls = 0

        def __getattr__(self, name):
            return getattr(mx, name)

        def eval(self, *args):
            Mx.calls += 1
            if Mx.calls == 4:
                raise KeyboardInterrupt
            return mx.eval(*args)

    model, tok = fresh(facts_model)
    monkeypatch.setattr(train, "mx", Mx())
    with pytest.raises(TrainingInterrupted) as e:
        train.train(model, tok, PAIRS, cfg, lora, tmp_path / "split", "tiny")
    monkeypatch.undo()
    assert e.value.step == 3
    model, tok = fresh(facts_model)
    train.train(model, tok, PAIRS, cfg, lora, tmp_path / "split", "tiny", resume=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-5).item(), k


def test_interrupt_while_the_compiled_step_is_traced_leaves_a_usable_model(facts_model, tmp_path, monkeypatch):
    """mx.compile swaps every weight (frozen ones too), the optimizer state and the random key for
    placeholders while it traces; a Ctrl-C then must not leave them in the caller's model."""
    cfg = TrainConfig(iters=3, batch_size=8, learning_rate=1e-3, warmup=1, save_every=100, val_every=0, seed=2)
    model, tok = fresh(facts_model)
    if not train.cpu_ops.available(model):
        pytest.skip("compiled steps need the CPU backend and a C++ compiler")
    before = dict(tree_flatten(model.parameters()))
    clip = train.optim.clip_grad_norm

    def ctrl_c_in_trace(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.optim, "clip_grad_norm", ctrl_c_in_trace)
    with pytest.raises(TrainingInterrupted) as e:
        train.train(model, tok, PAIRS, cfg, LoraConfig(rank=4, alpha=8.0), tmp_path / "a", "tiny")
    assert e.value.step == 0
    after = dict(tree_flatten(model.parameters()))
    for k, v in before.items():  # LoRA wrapped the projections: their weights moved to `.linear`
        got = after.get(k, after.get(k.replace(".weight", ".linear.weight")))
        assert got is not None and np.array_equal(np.array(got), np.array(v)), k
    mx.eval(mx.random.uniform(shape=(2,)))
    monkeypatch.setattr(train.optim, "clip_grad_norm", clip)
    # the checkpoint resumes into the finished run's adapter
    train.train(fresh(facts_model)[0], tok, PAIRS, cfg, LoraConfig(rank=4, alpha=8.0), tmp_path / "a", "tiny",
                resume=True)
    train.train(fresh(facts_model)[0], tok, PAIRS, cfg, LoraConfig(rank=4, alpha=8.0), tmp_path / "b", "tiny")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-5).item(), k


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_to_the_peak_and_ends_at_the_floor(kind):
    cfg = TrainConfig(iters=50, warmup=5, learning_rate=1e-3, min_lr_ratio=0.1, schedule=kind)
    lr = [float(train.schedule(cfg)(mx.array(s))) for s in range(cfg.iters)]
    assert lr[0] == pytest.approx(2e-4)  # peak / warmup
    assert all(a < b for a, b in zip(lr[:5], lr[1:6]))  # rising through the warmup
    assert lr[5] == pytest.approx(1e-3) and max(lr) == pytest.approx(1e-3)  # the peak, once
    assert all(a > b for a, b in zip(lr[5:], lr[6:]))  # then falling every step
    assert lr[-1] == pytest.approx(1e-4)  # the floor at the last step, not one step above it


def test_examples_cut_at_max_seq_len_are_said(facts_model, tmp_path):
    """Training on examples longer than max_seq_len says how many (they lose part of a prompt or
    trace); examples that fit say nothing."""

    class Lines(NullProgress):
        def __init__(self):
            self.lines = []

        def log(self, message):
            self.lines.append(message)

    cfg = TrainConfig(iters=1, batch_size=4, warmup=0, val_every=0, save_every=1000)
    lengths = []
    for max_seq_len, out in ((512, "fits"), (30, "cut")):
        model, tok = fresh(facts_model)
        said = Lines()
        train.train(model, tok, PAIRS, cfg.model_copy(update={"max_seq_len": max_seq_len}), LoraConfig(rank=4, alpha=8.0),
                    tmp_path / out, "tiny", progress=said)
        lengths.append(said.lines)
    cut = sum(len(ids) > 30 for ids, _ in batching.encode_pairs(fresh(facts_model)[1], PAIRS, 512))
    assert lengths[0] == [] and cut > 0
    assert lengths[1] == [f"warning: {cut} of {len(PAIRS)} training examples reach max_seq_len (30 tokens); "
                          "longer ones lose the start of their prompt or the end of their trace"]
