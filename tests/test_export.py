"""`tracer export`: a fused, standalone mlx-lm model and its card."""

import json

import pytest

from tracer import export, train
from tracer.config import LoraConfig, TrainConfig
from tracer.errors import TracerError
from tracer.generate import generate

PROMPTS = [f"Start from `E{i}`. Follow caused_by. Which entity do you reach?" for i in range(4)]
PAIRS = [(p, f"TRACE: E{i} -caused_by-> E{i + 1}\nANSWER: B") for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """An adapter trained a few steps inside a run directory (``<run>/models/sft``)."""
    from tracer import model as models

    run = tmp_path_factory.mktemp("run") / "demo"
    model, tok = models.load(str(tiny_model))
    train.train(model, tok, PAIRS, TrainConfig(iters=3, batch_size=2, warmup=1, val_every=0, learning_rate=1e-2),
                LoraConfig(rank=4, alpha=16.0), run / "models" / "sft", models.model_id(str(tiny_model)))
    (run / "meta.json").write_text(json.dumps({"contaminated": False, "command": "tracer run demo.toml"}))
    (run / "metrics.json").write_text(json.dumps({"phases": {"sft": {
        "n": 64, "correct": 40, "accuracy": 0.625, "accuracy_ci": [0.503, 0.734], "path_coverage": 0.8,
        "reward": 0.9, "format_rate": 1.0}}}))
    return run / "models" / "sft"


def test_export_runs_without_tracer_and_matches_the_adapter(tiny_model, adapter, tmp_path):
    from mlx_lm.utils import load as mlx_lm_load

    from tracer import model as models

    out = export.export(str(tiny_model), str(adapter), tmp_path / "exported")
    fused, fused_tok = mlx_lm_load(str(out))  # stock mlx-lm, no adapter
    base, tok = models.load(str(tiny_model), adapter=str(adapter))
    want = generate(base, tok, PROMPTS, max_tokens=12)
    assert generate(fused, fused_tok, PROMPTS, max_tokens=12) == want
    plain, plain_tok = models.load(str(tiny_model))
    assert generate(plain, plain_tok, PROMPTS, max_tokens=12) != want  # the adapter did change it
    card = (out / "README.md").read_text()
    assert "62.5% [50.3–73.4]" in card and "| 64 |" in card
    assert "made by: `tracer run demo.toml`" in card and "trained on eval questions: no" in card
    with pytest.raises(TracerError, match="already exists"):
        export.export(str(tiny_model), str(adapter), out)


def test_card_says_contaminated(adapter):
    cfg = adapter / "adapter_config.json"
    before = cfg.read_text()
    cfg.write_text(json.dumps(dict(json.loads(before), contaminated=True)))
    try:
        facts = export.card_facts(adapter)
        assert facts["contaminated"] and "contaminated" in export.model_card(facts)
    finally:
        cfg.write_text(before)


def test_card_says_how_to_write_the_prompt(adapter):
    facts = export.card_facts(adapter)
    assert "written `A) Name`" in export.model_card(facts) and "traces" not in export.model_card(facts)
    config, acfg = adapter.parent.parent / "config.toml", adapter / "adapter_config.json"
    before = acfg.read_text()
    config.write_text('[data]\ntrace = "frontier"\noption_tags = true\n')
    acfg.write_text(json.dumps(dict(json.loads(before), option_tags=True)))
    try:
        tagged = export.model_card(export.card_facts(adapter))
    finally:
        config.unlink()
        acfg.write_text(before)
    assert "written `Name (A)`" in tagged and "every entity each hop reaches" in tagged


def test_export_command_bad_input(tiny_work, capsys):
    from tracer.cli import main

    assert main(["export", "nowhere", "--model-out", "out", "-c", "tiny.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and not (tiny_work / "out").exists()
