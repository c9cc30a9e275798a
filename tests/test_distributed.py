"""Data-parallel training under `mlx.launch -n 2 --backend ring`: two ranks follow one process."""

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


def test_other_commands_refuse_data_parallel(tiny_work, monkeypatch, capsys):
    from tracer.cli import main

    monkeypatch.setenv("MLX_WORLD_SIZE", "2")
    assert main(["eval", "-c", "tiny.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: tracer eval: under mlx.launch only continue, sft run data-parallel; run it as one process"]
