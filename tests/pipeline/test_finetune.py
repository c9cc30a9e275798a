"""`tracer sft` on the tiny config: it learns, and a kill saves a checkpoint."""

import json

from tracer.cli import main


def _sft_until_first_checkpoint(tiny_work):
    """A long `tracer sft` in its own process, once it has written its first checkpoint; returns
    the process, its adapter directory and the checkpoint's state.json."""
    import subprocess
    import sys
    import time

    out = tiny_work / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tracer.cli import entry; entry()", "sft", "-c", "tiny.toml",
         "--iters", "100000", "--adapter-out", str(out)],
        cwd=tiny_work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert state.exists(), proc.communicate(timeout=30)
    return proc, out, state


def test_sft_through_cli_learns_training_questions(tiny_work):
    """`tracer sft` on the tiny KG, then `tracer eval` on its training questions: far above chance (25%)."""
    adapter = tiny_work / "learned"
    assert main(["sft", "-c", "tiny.toml", "--iters", "200", "--adapter-out", str(adapter)]) == 0
    losses = json.loads((adapter / "checkpoint" / "state.json").read_text())["losses"]
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:5]) / 5
    train_file = tiny_work / "data" / "tiny" / "train.jsonl"
    assert main(["eval", "-c", "tiny.toml", "--examples", str(train_file), "--adapter", str(adapter),
                 "--phase", "train_check", "--run-dir", "check"]) == 0
    entry = json.loads((tiny_work / "check" / "metrics.json").read_text())["phases"]["train_check"]
    assert entry["format_rate"] > 0.9 and entry["accuracy"] > 0.6, entry


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tiny_work):
    """`kill` (SIGTERM) of a training command stops it cleanly: checkpoint, message, exit 130."""
    import signal

    proc, out, state = _sft_until_first_checkpoint(tiny_work)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err
    step = json.loads(state.read_text())["step"]
    assert step >= 6  # tiny.toml saves every 6 steps; SIGTERM saved the step it stopped at
    assert not (out / "adapters.safetensors").exists()


def test_a_second_signal_does_not_abort_the_first_ones_checkpoint(tiny_work):
    """SIGINT then SIGTERM within a millisecond: the interrupt's checkpoint completes, the exit is
    130 with the --resume hint, and --resume continues from it."""
    import os
    import signal
    import time

    proc, out, state = _sft_until_first_checkpoint(tiny_work)
    time.sleep(0.5)  # a few steps past the periodic checkpoint
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) in (
        ["checkpoint"], ["checkpoint", "checkpoint.prev"])  # no checkpoint.tmp left half-written
    step = json.loads(state.read_text())["step"]
    assert f"training interrupted at step {step}" in err
    assert main(["sft", "-c", "tiny.toml", "--iters", str(step + 1), "--adapter-out", str(out), "--resume"]) == 0


def files_of(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_an_earlier_training_is_never_discarded_silently(tiny_work, capsys):
    """sft into a directory holding a checkpoint, without --resume: refused, pointing to --resume
    and --force; --force starts over (the old checkpoint goes), --resume without one is refused."""
    sft = ["sft", "-c", "tiny.toml", "--adapter-out", "a"]
    assert main(sft + ["--iters", "6"]) == 0
    before = files_of(tiny_work / "a")
    capsys.readouterr()
    assert main(sft + ["--iters", "6"]) == 2
    line = one_error(capsys)
    assert "a: holds an earlier training's checkpoint at step 6" in line and "--resume" in line and "--force" in line
    assert files_of(tiny_work / "a") == before
    assert main(sft + ["--resume", "--force"]) == 2 and "exclude each other" in one_error(capsys)
    assert main(sft + ["--iters", "3", "--force"]) == 0
    state = json.loads((tiny_work / "a" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert not (tiny_work / "a" / "checkpoint.prev").exists()  # the earlier training's checkpoint went too
    capsys.readouterr()
    assert main(["sft", "-c", "tiny.toml", "--adapter-out", "fresh", "--resume"]) == 2
    assert "fresh: no checkpoint to resume from" in one_error(capsys) and not (tiny_work / "fresh").exists()
    # an adapter in the way (copied there, no checkpoint) is not overwritten either
    (tiny_work / "copied").mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        (tiny_work / "copied" / name).write_bytes((tiny_work / "a" / name).read_bytes())
    assert main(["continue", "-c", "tiny.toml", "--adapter", "a", "--train", "data/tiny/train.jsonl",
                 "--adapter-out", "copied"]) == 2
    assert "copied: holds an adapter already; use --force" in one_error(capsys)
    assert main(["continue", "-c", "tiny.toml", "--adapter", "a", "--train", "data/tiny/train.jsonl",
                 "--adapter-out", "a", "--force"]) == 2
    assert "the adapter to continue is read from there" in one_error(capsys)


def test_resume_under_other_settings_is_refused_naming_them(tiny_work, capsys):
    """The settings a checkpoint was trained under are recorded beside it; a --resume that changes
    lr, batch size, seed, the training file or lowers iters below its step is refused, naming the
    setting; more iters is allowed and said."""
    sft = ["sft", "-c", "tiny.toml", "--adapter-out", "a"]
    assert main(sft + ["--iters", "6"]) == 0
    record = json.loads((tiny_work / "a" / "train_settings.json").read_text())
    assert record["section"] == "sft" and record["settings"]["learning_rate"] == 1e-3 and len(record["rows_sha256"]) == 64
    before = files_of(tiny_work / "a")
    text = (tiny_work / "tiny.toml").read_text()
    (tiny_work / "lr.toml").write_text(text.replace("learning_rate = 1e-3", "learning_rate = 2e-3", 1))
    (tiny_work / "bs.toml").write_text(text.replace("batch_size = 16", "batch_size = 8", 1))
    rows = (tiny_work / "data" / "tiny" / "train.jsonl").read_text().splitlines(keepends=True)
    (tiny_work / "fewer.jsonl").write_text("".join(rows[:-1]))
    capsys.readouterr()
    for argv, named in ((["-c", "lr.toml"], "sft.learning_rate 0.001 -> 0.002"),
                        (["-c", "bs.toml"], "sft.batch_size 16 -> 8"),
                        (["--seed", "5"], "sft.seed 0 -> 5"),
                        (["--train", "fewer.jsonl"], f"the training data ({len(rows)} -> {len(rows) - 1} rows"),
                        (["--iters", "4"], "sft.iters 4 is below the checkpoint's step 6")):
        code = main(sft + ["--resume", "--iters", "12"] + argv)
        line = one_error(capsys)
        assert code == 2 and named in line and "cannot resume" in line, (argv, line)
    assert files_of(tiny_work / "a") == before
    # a deliberate change: more steps
    assert main(sft + ["--resume", "--iters", "9"]) == 0
    assert "resuming at step 6 with sft.iters 6 -> 9" in capsys.readouterr().out
    assert json.loads((tiny_work / "a" / "checkpoint" / "state.json").read_text())["step"] == 9
    assert json.loads((tiny_work / "a" / "train_settings.json").read_text())["settings"]["iters"] == 9


def test_the_system_message_is_the_configs_and_the_adapter_keeps_it(tiny_work, capsys):
    """data.system_prompt reaches training and is recorded in the adapter; eval under another one is
    refused before any work (the adapter would be asked in a chat it never saw), as is a resume
    under another one; a continuation may retrain the adapter under a new one."""
    system = "You answer multi-hop questions about a clinical knowledge graph."
    text = (tiny_work / "tiny.toml").read_text()
    (tiny_work / "clinic.toml").write_text(text.replace("[data]\n", f'[data]\nsystem_prompt = "{system}"\n', 1))
    assert main(["sft", "-c", "clinic.toml", "--iters", "3", "--adapter-out", "a"]) == 0
    assert json.loads((tiny_work / "a" / "adapter_config.json").read_text())["system_prompt"] == system
    capsys.readouterr()
    assert main(["eval", "-c", "tiny.toml", "--adapter", "a", "--run-dir", "r"]) == 2
    line = one_error(capsys)
    assert f"a: adapter was trained under the system message '{system}'" in line, line
    assert not (tiny_work / "r").exists()
    assert main(["sft", "-c", "tiny.toml", "--iters", "6", "--adapter-out", "a", "--resume"]) == 2
    assert "data.system_prompt" in one_error(capsys)
    assert main(["eval", "-c", "clinic.toml", "--adapter", "a", "--run-dir", "r", "--phase", "sft"]) == 0
    train = str(tiny_work / "data" / "tiny" / "train.jsonl")
    assert main(["continue", "-c", "tiny.toml", "-a", "a", "-t", train, "--iters", "2", "--adapter-out", "b"]) == 0
    from tracer.format import SYSTEM_PROMPT

    assert json.loads((tiny_work / "b" / "adapter_config.json").read_text())["system_prompt"] == SYSTEM_PROMPT


def test_an_adapter_trained_with_letter_tags_is_evaluated_with_them(tiny_work, capsys):
    """data.option_tags is recorded in the adapter; eval under a config without tags (the prompts the
    adapter never saw) is refused before any work, and an untagged adapter under tags too."""
    text = (tiny_work / "tiny.toml").read_text()
    (tiny_work / "tags.toml").write_text(text.replace("[data]\n", '[data]\noption_tags = true\n', 1)
                                         .replace('out_dir = "data/tiny"', 'out_dir = "data/tiny_tags"'))
    assert main(["sft", "-c", "tags.toml", "--iters", "2", "--adapter-out", "a"]) == 0
    assert json.loads((tiny_work / "a" / "adapter_config.json").read_text())["option_tags"] is True
    rows = [json.loads(line) for line in (tiny_work / "data" / "tiny_tags" / "train.jsonl").read_text().splitlines()]
    assert all(r["ref"]["trace"].split("\n")[0].endswith(f" ({r['answer_star']})") for r in rows)
    capsys.readouterr()
    assert main(["eval", "-c", "tiny.toml", "--adapter", "a", "--run-dir", "r"]) == 2
    assert "a: adapter was trained with letter tags; set data.option_tags = true" in one_error(capsys)
    assert not (tiny_work / "r").exists()
    assert main(["eval", "-c", "tags.toml", "--adapter", "a", "--run-dir", "r", "--phase", "sft"]) == 0
    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "--adapter-out", "b"]) == 0
    capsys.readouterr()
    assert main(["eval", "-c", "tags.toml", "--adapter", "b", "--run-dir", "r", "--phase", "b"]) == 2
    assert "trained without letter tags; set data.option_tags = false" in one_error(capsys)
