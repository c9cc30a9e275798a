"""Model sources, OpenBLAS preload and loading (no download needed; GGUF conversion: test_gguf.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.errors import TracerError

tm = pytest.importorskip("tracer.model")
mx = pytest.importorskip("mlx.core")

TEXTS = [
    "The cause of the outage was a failed disk, fixed by replacing it.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "TRACE: E0 -caused_by-> E1 -fixed_by-> E2\nANSWER: C",
    "Numbers like 12345 and 678 are split into single digits.",
] * 4


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------- resolve errors


def test_resolve_unknown_name(tmp_path):
    with pytest.raises(TracerError) as e:
        tm.resolve("no-such-model", tmp_path)
    msg = _one_line_error(e)
    assert "unknown model 'no-such-model'" in msg and "smollm2-135m-instruct" in msg


def test_resolve_missing_path(tmp_path):
    with pytest.raises(TracerError) as e:
        tm.resolve(str(tmp_path / "missing" / "dir"), tmp_path)
    assert "unknown model" in _one_line_error(e)


def test_resolve_missing_gguf(tmp_path):
    with pytest.raises(TracerError) as e:
        tm.resolve(str(tmp_path / "model.gguf"), tmp_path)
    assert "no such .gguf file" in _one_line_error(e)


def test_resolve_hub_id_offline(tmp_path, monkeypatch):
    import mlx_lm.utils

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(mlx_lm.utils, "_download", offline)
    with pytest.raises(TracerError) as e:
        tm.resolve("SomeOrg/some-model", tmp_path)
    msg = _one_line_error(e)
    assert "cannot download 'SomeOrg/some-model' (offline?)" in msg


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(TracerError) as e:
        tm.resolve(str(tmp_path), tmp_path)
    assert "config.json missing" in _one_line_error(e)


def test_resolve_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TracerError) as e:
        tm.resolve(str(tmp_path), tmp_path)
    msg = _one_line_error(e)
    assert "corrupt config.json" in msg and str(tmp_path) in msg


def test_resolve_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TracerError) as e:
        tm.resolve(str(tmp_path), tmp_path)
    msg = _one_line_error(e)
    assert "no *.safetensors weights" in msg and str(tmp_path) in msg


def test_resolve_dir_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TracerError) as e:
        tm.resolve(str(tmp_path), tmp_path)
    assert "no tokenizer" in _one_line_error(e)


def test_model_id():
    assert tm.model_id("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert tm.model_id("Org/name") == "Org/name"


# ---------------------------------------------------------------- OpenBLAS preload


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is Linux only")
def test_preload_openblas_in_fresh_process():
    code = (
        "import sys, warnings; warnings.simplefilter('error');"
        "from tracer.blas import preload_openblas, blas_info;"
        "p = preload_openblas(); assert p == preload_openblas();"
        "import mlx.core as mx; a = mx.ones((64, 64)); assert (a @ a)[0, 0].item() == 64;"
        "print(p); print(blas_info()['status'])"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("TRACER_NO_OPENBLAS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    path, status = r.stdout.split()
    assert "libopenblas" in path and status == "loaded"


def test_fixed_target_openblas_needs_its_instructions():
    from tracer.blas import missing_instructions

    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    # cmeel-openblas 0.3.31 is built for SKYLAKEX only: SIGILL on an AVX2-only CPU, so refused.
    assert "avx512f" in missing_instructions("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4", avx2)
    assert missing_instructions("OpenBLAS 0.3.29 NO_AFFINITY ZEN MAX_THREADS=4", avx2) == []
    assert missing_instructions("OpenBLAS 0.3.29 NO_AFFINITY ZEN MAX_THREADS=4", {"avx"}) == ["avx2", "fma"]
    assert missing_instructions("OpenBLAS 0.3.33 DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=128", set()) == []
    assert missing_instructions("OpenBLAS 0.3.33 NO_AFFINITY NEWCHIP", avx2) == ["?"]


def test_preload_openblas_too_late_warns():
    code = (
        "import mlx.core, warnings\n"
        "from tracer.blas import preload_openblas, blas_info\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert preload_openblas() is None\n"
        "assert sys.platform != 'linux' or any('imported before' in str(x.message) for x in w)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("TRACER_NO_OPENBLAS", None)
    r = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_preload_openblas_disabled_by_env():
    code = "from tracer.blas import preload_openblas, blas_info; assert preload_openblas() is None; print(blas_info()['status'])"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "TRACER_NO_OPENBLAS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "TRACER_NO_OPENBLAS" in r.stdout


# ---------------------------------------------------------------- glibc heap (tracer.heap)

HEAP_PROBE = """
import ctypes, resource
from tracer.heap import heap_info, retain_freed_memory
retain_freed_memory()
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):  # what MLX does with a large intermediate each step: malloc, write, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(heap_info()); print(*faults)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
@pytest.mark.parametrize("disabled", ["0", "1"])
def test_retained_heap_reuses_freed_blocks_without_page_faults(disabled):
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "TRACER_NO_MALLOPT": disabled}
    r = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    status, faults = r.stdout.splitlines()
    first, *later = map(int, faults.split())
    assert first > 10_000  # 64 MB = 16,384 pages, faulted in once
    if disabled == "1":  # glibc's default: mmap'd fresh and unmapped on free, so faulted in each time
        assert status == "disabled by TRACER_NO_MALLOPT" and min(later) > 10_000
    else:
        assert status == "retained" and max(later) < 100


TRIM_PROBE = """
import ctypes
from tracer.heap import release_freed_pages, retain_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20  # MB
retain_freed_memory()
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 20) for _ in range(4)]
for p in blocks:
    ctypes.memset(p, 1, 64 << 20)
pin = libc.malloc(1 << 20)  # a live block above them: the heap's top cannot shrink
for p in blocks:
    libc.free(p)
held = rss()
plenty = release_freed_pages(low=0.0, interval=0.0)  # memory to spare: nothing to do
print(held, plenty, rss(), release_freed_pages(low=1.01, interval=60.0), rss(), release_freed_pages(low=1.01))
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc_trim only")
def test_freed_pages_go_back_to_the_system_when_memory_runs_short():
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "TRACER_NO_MALLOPT": "0"}
    r = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    held, plenty, kept, short, after, again = r.stdout.split()
    assert plenty == "False" and int(held) - int(kept) < 50  # nothing handed back
    assert short == "True" and int(held) - int(after) > 200  # of the 256 MB freed below a live block
    assert again == "False"  # the next call comes within the interval


# ---------------------------------------------------------------- loading a tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tiny = pytest.importorskip("tiny_model")
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, vocab_size=300)


def test_load_tiny_model(tiny_dir):
    model, tokenizer = tm.load(str(tiny_dir), dtype="auto")
    ids = tokenizer.encode("Paris is the capital")
    logits = model(mx.array([ids]))
    assert logits.shape[:2] == (1, len(ids))
    expected = mx.float32 if tm._on_cpu() else mx.bfloat16
    assert all(p.dtype == expected for _, p in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def _write_adapter(path: Path, tiny_dir: Path, rank: int, wrong: bool, base_model: str | None = None,
                   random: bool = False) -> Path:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    path.mkdir(parents=True, exist_ok=True)
    acfg = {
        "fine_tune_type": "lora",
        "num_layers": cfg["num_hidden_layers"],
        "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
    }
    if base_model:
        acfg["base_model"] = base_model
    (path / "adapter_config.json").write_text(json.dumps(acfg))
    hidden = cfg["hidden_size"] + (8 if wrong else 0)
    weights = {}
    for i in range(cfg["num_hidden_layers"]):
        init = (lambda shape: mx.random.normal(shape) * 0.2) if random else mx.zeros
        weights[f"model.layers.{i}.self_attn.q_proj.lora_a"] = init((hidden, rank))
        weights[f"model.layers.{i}.self_attn.q_proj.lora_b"] = init((rank, cfg["hidden_size"]))
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    return path


def test_load_matching_adapter(tiny_dir, tmp_path):
    adapter = _write_adapter(tmp_path / "ok", tiny_dir, rank=4, wrong=False, base_model=tm.model_id(str(tiny_dir)))
    model, _ = tm.load(str(tiny_dir), adapter=str(adapter))
    names = [k for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters())]
    assert any(k.endswith("q_proj.lora_a") for k in names)


def test_fused_adapter_gives_the_same_logits(tiny_dir, tmp_path):
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    adapter = _write_adapter(tmp_path / "a", tiny_dir, rank=4, wrong=False, random=True)
    ids = mx.array([[1, 5, 9, 13, 17, 21]])
    base, _ = tm.load(str(tiny_dir))
    lora, _ = tm.load(str(tiny_dir), adapter=str(adapter))
    fused, _ = tm.load(str(tiny_dir), adapter=str(adapter), fuse=True)
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    assert any("lora" in k for k, _ in tree_flatten(lora.parameters()))
    want = lora(ids)
    assert mx.abs(want - base(ids)).max().item() > 1e-2  # the adapter changes the output
    assert mx.allclose(fused(ids), want, atol=1e-4, rtol=1e-4).item()


def test_load_adapter_wrong_shapes(tiny_dir, tmp_path):
    adapter = _write_adapter(tmp_path / "bad", tiny_dir, rank=4, wrong=True)
    with pytest.raises(TracerError) as e:
        tm.load(str(tiny_dir), adapter=str(adapter))
    msg = _one_line_error(e)
    assert msg.startswith(f"{adapter}: adapter does not match model {tiny_dir}")
    assert "shape" in msg


def test_load_adapter_other_base_model(tiny_dir, tmp_path):
    adapter = _write_adapter(tmp_path / "other", tiny_dir, rank=4, wrong=False, base_model="Org/other-model")
    with pytest.raises(TracerError) as e:
        tm.load(str(tiny_dir), adapter=str(adapter))
    assert "trained on 'Org/other-model'" in _one_line_error(e)


def test_load_adapter_missing_config(tiny_dir, tmp_path):
    with pytest.raises(TracerError) as e:
        tm.load(str(tiny_dir), adapter=str(tmp_path))
    assert "adapter_config.json missing" in _one_line_error(e)


def test_device_info():
    from tracer.doctor import device_info

    info = device_info()
    assert info["backend"] in ("cpu", "gpu") and info["matmul_gflops_fp32"] > 0
    assert "openblas" in info["blas"]
    from tracer.blas import THREAD_ENV

    forced = any(os.environ.get(k) for k in THREAD_ENV)  # a fixed thread count: one process
    cores = len(os.sched_getaffinity(0))
    assert info["generation_workers"] == (min(cores, 2) if info["backend"] == "cpu" and not forced else 1)
    assert info["cpu_ops"] == (info["backend"] == "cpu" and shutil.which("g++") is not None
                                           and not os.environ.get("MLX_DISABLE_COMPILE"))


def test_share_cores_splits_threads_between_live_tracer_processes(tmp_path):
    """Each registered, still-running tracer process gets cores // n OpenBLAS threads; a stopped one
    is not counted, entries of dead processes are dropped; a thread count set in the environment is
    left alone."""
    code = f"""
import ctypes, os, subprocess, sys, time
from pathlib import Path
from tracer import blas
if blas.preload_openblas() is None:
    print("skip"); sys.exit(0)
reg = Path({str(tmp_path / "reg")!r})
lib = ctypes.CDLL(blas.blas_info()["openblas"])
cores = len(os.sched_getaffinity(0))
other = subprocess.Popen(["sleep", "60"])
time.sleep(0.2)
reg.mkdir()
(reg / str(other.pid)).write_text(blas._start_time(other.pid))
(reg / "999999999").write_text("1")  # a process that is gone
assert blas.share_cores(0, reg) == max(1, cores // 2) == lib.openblas_get_num_threads()
assert blas.blas_info()["threads"] == max(1, cores // 2)  # what `tracer doctor` shows
assert sorted(p.name for p in reg.iterdir()) == sorted([str(os.getpid()), str(other.pid)])
other.send_signal(19); time.sleep(0.2)  # SIGSTOP: stopped, its cores are free
assert blas.share_cores(0, reg) == cores and (reg / str(other.pid)).exists()
other.send_signal(18); time.sleep(0.2)  # SIGCONT
assert blas.share_cores(0, reg) == max(1, cores // 2)
other.kill(); other.wait()
assert blas.share_cores(0, reg) == cores == lib.openblas_get_num_threads()
os.environ["OPENBLAS_NUM_THREADS"] = "1"
assert blas.share_cores(0, reg) is None
print("ok")
"""
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    from tracer.blas import THREAD_ENV

    for k in ("TRACER_NO_OPENBLAS", *THREAD_ENV):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("ok", "skip")
    if sys.platform.startswith("linux"):
        assert r.stdout.strip() == "ok"
