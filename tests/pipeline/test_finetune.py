"""`tracer sft` on the tiny config: it learns, and a kill saves a checkpoint."""

import json

from tracer.cli import main


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
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err
    step = json.loads(state.read_text())["step"]
    assert step >= 6  # tiny.toml saves every 6 steps; SIGTERM saved the step it stopped at
    assert not (out / "adapters.safetensors").exists()
