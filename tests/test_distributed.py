"""Data-parallel training, evaluation, RSFT, GRPO, consolidation and `tracer run` under
`mlx.launch -n 2 --backend ring`: two ranks follow one process."""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "dist_train.py"
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tracer.format import SYSTEM_PROMPT

    from tiny_model import build_tiny_model
    sys.path.insert(0, str(SCRIPT.parent))
    from dist_train import PAIRS

    texts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n"
             f"<|im_start|>assistant\n{c}<|im_end|>\n" for p, c in PAIRS]
    out = tmp_path_factory.mktemp("dist") / "model"
    build_tiny_model(out, texts, vocab_size=400, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    return out


def run(argv, cwd, check=True):
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 or not check, out.stdout + out.stderr
    return out


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_two_ranks_follow_one_process(model_dir, tmp_path):
    run([sys.executable, str(SCRIPT), str(model_dir), str(tmp_path / "one")], tmp_path)
    run([LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, str(SCRIPT), str(model_dir),
         str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert (one["size"], two["size"]) == (1, 2)  # two ranks really ran, each on half of every batch
    one, two = one["losses"], two["losses"]
    assert len(one) == len(two) == 6
    assert np.allclose(one, two, atol=1e-4), (one, two)
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-4).item(), k
    assert (tmp_path / "two" / "checkpoint" / "state.json").is_file()  # rank 0 checkpointed


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_tracer_sft_under_mlx_launch(tiny_work):
    tracer = str(Path(sys.executable).parent / "tracer")
    out = run([LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, tracer, "sft", "-c", "tiny.toml",
               "--iters", "2"], tiny_work)
    assert "error" not in out.stdout + out.stderr, out.stdout + out.stderr  # mlx.launch exits 0 whatever the ranks do
    sft = tiny_work / "data" / "runs" / "tiny" / "models" / "sft"
    assert (sft / "adapters.safetensors").is_file() and json.loads((sft / "checkpoint" / "state.json").read_text())["step"] == 2


def _launch(args: list[str], cwd: Path) -> str:
    """``args`` under ``mlx.launch -n 2``; its output, which must hold no error (it exits 0 whatever the ranks do)."""
    out = run([LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, *args], cwd)
    assert "error" not in out.stdout + out.stderr, out.stdout + out.stderr
    return out.stdout


def _phase(run_dir: Path, phase: str) -> tuple[dict, int]:
    """The phase's metrics.json entry less what differs between runs (timings, ranks), and its ranks."""
    entry = json.loads((run_dir / "metrics.json").read_text())["phases"][phase]
    ranks = entry.pop("ranks")
    for key in ("wall_s", "finished_at"):
        entry.pop(key)
    return entry, ranks


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_tracer_eval_under_mlx_launch_answers_as_one_process(tiny_work):
    from tracer.cli import main

    tracer = str(Path(sys.executable).parent / "tracer")
    stdout = _launch([tracer, "eval", "-c", "tiny.toml", "--run-dir", "two"], tiny_work)  # makes the splits too
    assert stdout.count("episodes: ") == 1  # rank 0 prints, rank 1 does not
    assert main(["eval", "-c", "tiny.toml", "--run-dir", "one"]) == 0
    one, two = (tiny_work / d / "episodes" / "eval.jsonl" for d in ("one", "two"))
    texts = [json.loads(line)["completion"] for line in one.read_text().splitlines()]
    assert len(texts) == 12 and len(set(texts)) > 1  # different answers: a reordering would show
    assert two.read_text() == one.read_text()
    (want, ranks_one), (got, ranks_two) = _phase(one.parents[1], "eval"), _phase(two.parents[1], "eval")
    assert (ranks_one, ranks_two) == (1, 2)
    assert got == want and got["shuffle_agreement"] is not None


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_tracer_rsft_under_mlx_launch_samples_as_one_process(tiny_work):
    from tracer.cli import main

    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "--adapter-out", "sft"]) == 0
    script = str(SCRIPT.parent / "dist_rsft.py")  # a few questions per sampling chunk: more chunks than ranks
    args = ["rsft", "-c", "tiny.toml", "--adapter", "sft"]
    stdout = _launch([script, *args, "--run-dir", "two"], tiny_work)
    assert stdout.count("samples: ") == 1
    run([sys.executable, script, *args, "--run-dir", "one"], tiny_work)
    one, two = tiny_work / "one", tiny_work / "two"
    samples = [json.loads(line) for line in (one / "rsft_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and len({s["completion"] for s in samples}) > 1
    assert (two / "rsft_samples.jsonl").read_text() == (one / "rsft_samples.jsonl").read_text()
    a = mx.load(str(one / "models" / "rsft" / "adapters.safetensors"))
    b = mx.load(str(two / "models" / "rsft" / "adapters.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-4).item(), k
    assert _phase(two, "rsft")[1] == 2  # the round's adapter evaluated on both ranks, recorded by rank 0
    assert not list(two.glob("rsft_r*_samples.partial.jsonl"))


# GRPO on the tiny model: one question per sampling chunk (sample_batch_size = group_size), so each
# rank samples two of a step's four; updates in parts of 3 completions, across the ranks' shares
GRPO_TOML = """
[grpo]
iters = 3
batch_questions = 4
group_size = 2
sample_batch_size = 2
batch_size = 3
max_tokens = 12
learning_rate = 1e-3
beta = 0.05
save_every = 2
seed = 3
"""
TIMING = ("tok_s", "sample_s", "update_s")


def _grpo_log(adapter: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter / "grpo_log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_tracer_grpo_under_mlx_launch_samples_and_learns_as_one_process_and_resumes(tiny_work):
    """Each sampling chunk is drawn under its own seed, whichever rank draws it, so 2 ring ranks sample
    the completions one process does (exactly: the rewards match), and with the loss divided by the
    whole step's tokens and the gradients summed, the step logs (loss, KL, clip fraction) and the
    adapter match one process's to 1e-4. The two ranks run 2 steps, then `--resume` a third."""
    from tracer.cli import main

    with (tiny_work / "tiny.toml").open("a", encoding="utf-8") as f:
        f.write(GRPO_TOML)
    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "--adapter-out", "sft"]) == 0
    script = str(SCRIPT.parent / "dist_grpo.py")  # the KG reward plus a length bonus: groups differ
    args = ["grpo", "-c", "tiny.toml", "--adapter", "sft", "--run-dir", "two", "--adapter-out", "two/grpo"]
    stdout = _launch([script, *args, "--iters", "2"], tiny_work)
    assert stdout.count("step log: ") == 1  # rank 0 prints, rank 1 does not
    assert json.loads((tiny_work / "two" / "grpo" / "checkpoint" / "state.json").read_text())["step"] == 2
    _launch([script, *args, "--iters", "3", "--resume"], tiny_work)
    run([sys.executable, script, "grpo", "-c", "tiny.toml", "--adapter", "sft", "--run-dir", "one",
         "--adapter-out", "one/grpo"], tiny_work)
    one, two = _grpo_log(tiny_work / "one" / "grpo"), _grpo_log(tiny_work / "two" / "grpo")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    assert all(m["reward_std"] > 0 for m in one) and any(m["loss"] != 0 for m in one)  # something to learn
    for want, got in zip(one, two):
        assert want.keys() == got.keys()
        for k in ("reward_mean", "reward_std", "format_rate", "accuracy", "flat_groups", "completion_tokens"):
            assert got[k] == want[k], (want["step"], k)  # the same completions, scored in the same order
        for k in want.keys() - set(TIMING):
            if isinstance(want[k], float):
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (want["step"], k)
            else:
                assert got[k] == want[k], (want["step"], k)
    _same_adapter(tiny_work / "one" / "grpo", tiny_work / "two" / "grpo")
    assert _phase(tiny_work / "two", "grpo")[1] == 2  # evaluated on both ranks, recorded by rank 0


def _adapter(path: Path) -> dict:
    return mx.load(str(path / "adapters.safetensors"))


def _same_adapter(a: Path, b: Path, atol: float = 1e-4) -> None:
    a, b = _adapter(a), _adapter(b)
    assert a.keys() == b.keys() and a
    for k in a:
        assert mx.allclose(a[k], b[k], atol=atol).item(), k


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_tracer_consolidate_under_mlx_launch_trains_and_answers_as_one_process(tiny_work):
    from tracer.cli import main

    assert main(["sft", "-c", "tiny.toml", "--iters", "2"]) == 0
    assert main(["rsft", "-c", "tiny.toml", "--iters", "2"]) == 0
    rsft = tiny_work / "data" / "runs" / "tiny"
    tracer = str(Path(sys.executable).parent / "tracer")
    args = ["consolidate", "-c", "tiny.toml", "--iters", "2", "--samples", str(rsft / "rsft_samples.jsonl"),
            "--adapter", str(rsft / "models" / "rsft")]
    stdout = _launch([tracer, *args, "--run-dir", "two"], tiny_work)
    assert stdout.count("consolidated on ") == 1  # rank 0 prints, rank 1 does not
    assert main([*args, "--run-dir", "one"]) == 0
    one, two = tiny_work / "one", tiny_work / "two"
    _same_adapter(one / "models" / "consolidate", two / "models" / "consolidate")
    (want, ranks_one), (got, ranks_two) = _phase(one, "consolidate"), _phase(two, "consolidate")
    assert (ranks_one, ranks_two) == (1, 2)
    assert (want.pop("adapter"), got.pop("adapter")) == ("one/models/consolidate", "two/models/consolidate")
    assert got == want
    assert (two / "episodes" / "consolidate.jsonl").read_text() == (one / "episodes" / "consolidate.jsonl").read_text()


def _run_on_two_ranks_and_one(tiny_work: Path, config: str, phases: set[str]) -> Path:
    """``tracer run CONFIG`` on 2 ring ranks (run ``two``) and in one process (run ``one``): rank 0
    alone prints, and each phase's n, accuracy and shuffle agreement are equal. The runs directory."""
    from tracer.cli import main

    tracer = str(Path(sys.executable).parent / "tracer")
    stdout = _launch([tracer, "run", config, "--name", "two"], tiny_work)
    assert stdout.count("run directory: ") == 1  # rank 0 prints, rank 1 does not
    assert main(["run", config, "--name", "one"]) == 0
    runs_dir = tiny_work / "data" / "runs"
    one, two = (json.loads((runs_dir / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert set(one["phases"]) == set(two["phases"]) == phases
    for phase, want in one["phases"].items():
        got = two["phases"][phase]
        assert (want["ranks"], got["ranks"]) == (1, 2)
        for key in ("n", "accuracy", "shuffle_agreement"):
            assert got[key] == want[key], (phase, key)
    return runs_dir


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_tracer_run_under_mlx_launch_records_what_one_process_does(tiny_work):
    text = (tiny_work / "tiny.toml").read_text()
    (tiny_work / "tiny.toml").write_text(text.replace("iters = 12", "iters = 4", 1))  # sft; rsft, consolidate: 4
    runs_dir = _run_on_two_ranks_and_one(tiny_work, "tiny.toml", {"base", "sft", "rsft", "consolidate"})
    for phase in ("sft", "rsft"):
        _same_adapter(runs_dir / "one" / "models" / phase, runs_dir / "two" / "models" / phase)
    # consolidation continues the chain: AdamW's normalisation blows the last bits of near-zero
    # gradients up to about lr, so a couple of weights (2 of 131072 when tried) end 1.5e-4 apart
    _same_adapter(runs_dir / "one" / "models" / "consolidate", runs_dir / "two" / "models" / "consolidate", 1e-3)
    meta = json.loads((runs_dir / "two" / "meta.json").read_text())
    assert meta["phases"] == ["base", "sft", "rsft", "consolidate"] and "finished_at" in meta
    assert set(meta["timings"]) >= {"base", "sft_train", "sft", "rsft", "consolidate_train", "consolidate"}


def _launch_dying(args: list[str], cwd: Path) -> str:
    """tests/scripts/dist_die.py ``args`` under ``mlx.launch -n 2``: its output."""
    out = run([LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, str(SCRIPT.parent / "dist_die.py"),
               *args], cwd, check=False)
    return out.stdout + out.stderr


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_a_rank_that_dies_stops_the_job_and_resume_ends_as_one_uninterrupted(tiny_work):
    tracer = str(Path(sys.executable).parent / "tracer")
    sft = ["sft", "-c", "tiny.toml", "--iters", "4"]
    _launch([tracer, *sft, "--adapter-out", "whole"], tiny_work)
    text = _launch_dying(["2", "kill", *sft, "--adapter-out", "cut"], tiny_work)  # rank 1 is killed after step 2
    assert "Node with rank 1 exited with code -9" in text and "Traceback" not in text, text
    # mlx.launch stops rank 0 (SIGTERM) and its collective fails: whichever comes first, one line
    said = [line for line in text.splitlines() if re.fullmatch(
        r"(error: rank 0: lost the connection to another rank, which stopped; training stopped at step 2, "
        r"|training interrupted at step 2; )checkpoint saved to cut/checkpoint; rerun with --resume to continue", line)]
    assert len(said) == 1 and not re.search(r"^(error|interrupted)", text.replace(said[0], ""), re.M), text
    assert json.loads((tiny_work / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert "trained 4 steps" in _launch([tracer, *sft, "--adapter-out", "cut", "--resume"], tiny_work)
    whole, cut = _adapter(tiny_work / "whole"), _adapter(tiny_work / "cut")
    assert whole.keys() == cut.keys() and whole
    for k in whole:
        assert mx.allclose(whole[k], cut[k], atol=1e-4).item(), k


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_a_rank_that_leaves_early_ends_the_other_through_its_collective(tiny_work):
    # rank 1 exits 0 after step 2, so mlx.launch stops no one: rank 0's next all_sum fails
    text = _launch_dying(["2", "exit", "sft", "-c", "tiny.toml", "--iters", "3", "--adapter-out", "cut"], tiny_work)
    assert "Node with rank 0 exited with code 1" in text and "Traceback" not in text, text
    assert re.findall(r"^(?:error|interrupted).*", text, re.M) == [
        "error: rank 0: lost the connection to another rank, which stopped; training stopped at step 2, "
        "checkpoint saved to cut/checkpoint; rerun with --resume to continue"], text
    assert json.loads((tiny_work / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2


RING_LOST = "[ring] connection to a peer was lost"  # what a collective raises once a peer is gone


def test_a_lost_peer_stops_training_with_one_line_and_a_checkpoint(tiny_work, monkeypatch, capsys):
    from tracer import train
    from tracer.cli import main

    monkeypatch.setenv("MLX_RANK", "0")  # rank 0 of an mlx.launch job (of one rank: no backend)
    monkeypatch.setitem(importlib.import_module("tracer.cli.main")._STOPPING, "signal", None)
    step_call = train.TrainStep.__call__

    def step_then_lose_the_peer(self, b, share=1.0):
        loss = step_call(self, b, share)  # the step's update is in the model, not yet evaluated
        if self.calls == 2:
            raise RuntimeError(RING_LOST)
        self.calls += 1
        return loss

    monkeypatch.setattr(train.TrainStep, "calls", 0, raising=False)
    monkeypatch.setattr(train.TrainStep, "__call__", step_then_lose_the_peer)
    assert main(["sft", "-c", "tiny.toml", "--iters", "4", "--adapter-out", "cut"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: rank 0: lost the connection to another rank, which stopped; training stopped at step 2, "
        "checkpoint saved to cut/checkpoint; rerun with --resume to continue"]
    assert json.loads((tiny_work / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(train.TrainStep, "__call__", step_call)
    assert main(["sft", "-c", "tiny.toml", "--iters", "4", "--adapter-out", "cut", "--resume"]) == 0
    assert main(["sft", "-c", "tiny.toml", "--iters", "4", "--adapter-out", "whole"]) == 0
    whole, cut = _adapter(tiny_work / "whole"), _adapter(tiny_work / "cut")  # the rolled-back step left no trace
    for k in whole:
        assert mx.allclose(whole[k], cut[k], atol=1e-5).item(), k


def test_a_lost_peer_outside_training_is_one_line_too(tiny_work, monkeypatch, capsys):
    from tracer import distributed
    from tracer.cli import main

    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.setattr(importlib.import_module("tracer.cli.common").console, "quiet", False)  # rank 1 quiets it
    monkeypatch.setitem(importlib.import_module("tracer.cli.main")._STOPPING, "signal", None)

    def lost(results):
        raise RuntimeError(RING_LOST)

    monkeypatch.setattr(distributed, "gather_shards", lost)
    assert main(["eval", "-c", "tiny.toml"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: rank 1: lost the connection to another rank, which stopped; the job stops"]


def test_the_sigterm_after_a_lost_peer_does_not_cut_the_stop_short(monkeypatch):
    cli = importlib.import_module("tracer.cli.main")
    monkeypatch.setitem(cli._STOPPING, "signal", None)
    before = signal.signal(signal.SIGTERM, cli._stop)
    try:
        try:
            raise RuntimeError(RING_LOST)
        except RuntimeError:  # what mlx.launch sends every rank once one stopped arrives here
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # and later: ignored too
        time.sleep(0.01)
    except KeyboardInterrupt:
        pytest.fail("the SIGTERM raised KeyboardInterrupt")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert cli._STOPPING["signal"] == cli._PEER_LOST


def test_other_commands_refuse_data_parallel(tiny_work, monkeypatch, capsys):
    from tracer.cli import main

    monkeypatch.setenv("MLX_RANK", "0")  # what mlx.launch --backend ring sets
    assert main(["export", "-c", "tiny.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: tracer export: under mlx.launch only consolidate, continue, eval, grpo, rsft, run, sft "
                   "run data-parallel; run it as one process"]


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")
def test_tracer_run_with_grpo_under_mlx_launch_records_what_one_process_does(tiny_work):
    text = (tiny_work / "tiny.toml").read_text().replace("iters = 12", "iters = 4", 1)  # sft
    text = text.replace('phases = ["base", "sft", "rsft", "consolidate"]', 'phases = ["base", "sft", "grpo"]')
    (tiny_work / "grpo.toml").write_text(text + GRPO_TOML)
    runs_dir = _run_on_two_ranks_and_one(tiny_work, "grpo.toml", {"base", "sft", "grpo"})
    # the plain KG reward: the tiny model's groups are flat, so this checks the plumbing, not learning
    one_log, two_log = (_grpo_log(runs_dir / d / "models" / "grpo") for d in ("one", "two"))
    assert [m["completion_tokens"] for m in two_log] == [m["completion_tokens"] for m in one_log]
    assert [m["loss"] for m in two_log] == pytest.approx([m["loss"] for m in one_log], rel=1e-4, abs=1e-6)
    for phase in ("sft", "grpo"):
        _same_adapter(runs_dir / "one" / "models" / phase, runs_dir / "two" / "models" / phase)
