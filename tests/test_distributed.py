"""Data-parallel training, evaluation and RSFT under `mlx.launch -n 2 --backend ring`: two ranks follow one process."""

import json
import shutil
import subprocess
import sys
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


def run(argv, cwd):
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
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


def test_other_commands_refuse_data_parallel(tiny_work, monkeypatch, capsys):
    from tracer.cli import main

    monkeypatch.setenv("MLX_RANK", "0")  # what mlx.launch --backend ring sets
    assert main(["grpo", "-c", "tiny.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: tracer grpo: under mlx.launch only continue, eval, rsft, sft run data-parallel; "
                   "run it as one process"]
