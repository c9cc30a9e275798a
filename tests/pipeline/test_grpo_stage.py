"""`tracer grpo` and the grpo phase of `tracer run`, on the tiny config."""

import json

from tracer.cli import main

GRPO = "\n[grpo]\niters = 2\nbatch_questions = 3\ngroup_size = 2\nbatch_size = 6\nmax_tokens = 24\nsave_every = 1\n"


def test_grpo_command_trains_logs_and_evaluates(tiny_work, capsys):
    (tiny_work / "tiny.toml").write_text((tiny_work / "tiny.toml").read_text() + GRPO)
    assert main(["sft", "-c", "tiny.toml", "--iters", "2"]) == 0, capsys.readouterr().err
    assert main(["grpo", "-c", "tiny.toml"]) == 0, capsys.readouterr().err
    run = tiny_work / "data" / "runs" / "tiny"
    log = [json.loads(line) for line in (run / "models" / "grpo" / "grpo_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(len(row["questions"]) == 3 for row in log)
    assert {"reward_mean", "reward_std", "format_rate", "kl", "clip_frac", "tok_s"} <= set(log[0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["phases"]["grpo"]["n"] == 12
    assert (run / "models" / "grpo" / "adapters.safetensors").is_file()


def test_bad_grpo_settings_are_one_line(tiny_work, capsys):
    (tiny_work / "bad.toml").write_text((tiny_work / "tiny.toml").read_text() + "\n[grpo]\ngroup_size = 1\n")
    assert main(["grpo", "-c", "bad.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grpo.group_size" in err[0]
    (tiny_work / "bad.toml").write_text((tiny_work / "tiny.toml").read_text().replace(
        'phases = ["base", "sft", "rsft", "consolidate"]', 'phases = ["base", "grpo", "sft"]'))
    assert main(["run", "bad.toml"]) == 2
    assert "'grpo' starts from the run's SFT adapter" in capsys.readouterr().err
