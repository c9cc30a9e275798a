"""End to end through the CLI on the tiny config: a real (tiny) model, real training, real files."""

import json
from pathlib import Path

import pytest

from tracer.cli import main


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_tiny_end_to_end(tiny_work, capsys):
    assert main(["run", "tiny.toml"]) == 0, capsys.readouterr().err
    run = tiny_work / "data" / "runs" / "tiny"
    for name in ("config.toml", "meta.json", "metrics.json", "rsft_samples.jsonl",
                 "episodes/base.jsonl", "episodes/sft.jsonl", "episodes/rsft.jsonl",
                 "models/sft/adapters.safetensors", "models/sft/adapter_config.json",
                 "models/rsft/adapters.safetensors", "models/rsft/adapter_config.json",
                 "episodes/consolidate.jsonl", "models/consolidate/adapters.safetensors",
                 "models/consolidate/adapter_config.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "meta.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert meta["phases"] == ["base", "sft", "rsft", "consolidate"] and meta["contaminated"] is False
    assert set(meta["timings"]) >= {"base", "sft_train", "sft", "rsft", "consolidate_train", "consolidate"}
    assert set(metrics["phases"]) == {"base", "sft", "rsft", "consolidate"} and metrics["contaminated"] is False
    eval_ids = [r["id"] for r in read_jsonl(tiny_work / "data" / "tiny" / "eval.jsonl")]
    for phase, entry in metrics["phases"].items():
        episodes = read_jsonl(run / "episodes" / f"{phase}.jsonl")
        assert [e["ex_id"] for e in episodes] == eval_ids
        assert entry["n"] == len(eval_ids)
        assert entry["accuracy"] == pytest.approx(sum(e["correct"] for e in episodes) / len(episodes))
        assert 0 <= entry["shuffle_agreement"] <= 1
    samples = read_jsonl(run / "rsft_samples.jsonl")
    assert len(samples) == 12 * 2  # rsft_size questions x k_samples
    # the resolved config is written as TOML and loads back
    from tracer.config import load_config

    assert load_config(run / "config.toml").run.name == "tiny"
    # a second run refuses to overwrite; --resume finds every phase finished
    assert main(["run", "tiny.toml"]) == 2
    assert main(["run", "tiny.toml", "--resume"]) == 0
    # a config.toml written before a knob existed (here: without consolidate.hops) resumes: same settings
    stored = (run / "config.toml").read_text()
    assert stored.count("hops = [1]\n") == 1
    (run / "config.toml").write_text(stored.replace("hops = [1]\n", ""))
    assert main(["run", "tiny.toml", "--resume"]) == 0
    assert (run / "config.toml").read_text() == stored
    # resuming under a changed config would mix two configs in one run: refused, nothing written
    changed = tiny_work / "changed.toml"
    changed.write_text((tiny_work / "tiny.toml").read_text().replace("min_reward = -10.0", "min_reward = -9.0"))
    before = (run / "config.toml").read_text()
    capsys.readouterr()
    assert main(["run", str(changed), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config differs" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.toml").read_text() == before
    # `tracer consolidate` on its own: continues the last RSFT round's adapter, re-records the phase
    assert main(["consolidate", "-c", "tiny.toml", "--iters", "2", "-o", "cons2"]) == 0
    cons = json.loads((run / "metrics.json").read_text())["phases"]["consolidate"]
    assert cons["adapter"] == "cons2" and (tiny_work / "cons2" / "adapters.safetensors").is_file()
    # no round kept a winner: the facts alone are rehearsed, from the last round's adapter
    lost = tiny_work / "no_winners.jsonl"
    lost.write_text("".join(json.dumps(s | {"kept": False}) + "\n" for s in samples))
    capsys.readouterr()
    assert main(["consolidate", "-c", "tiny.toml", "--samples", str(lost), "--iters", "2", "-o", "cons3"]) == 0
    assert "facts alone" in capsys.readouterr().out
    assert (tiny_work / "cons3" / "adapters.safetensors").is_file()
    capsys.readouterr()
    assert main(["consolidate", "-c", "tiny.toml", "--run-dir", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "no RSFT samples" in err and len(err.strip().splitlines()) == 1
    assert not (tiny_work / "nowhere").exists()
    # the report renders the finished run
    capsys.readouterr()
    assert main(["report", str(run), "--per-hop"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "rsft" in out and f"{100 * metrics['phases']['sft']['accuracy']:.1f}%" in out


def test_leakage_guard_refuses_and_marks(tiny_work, capsys):
    assert main(["data", "--config", "tiny.toml"]) == 0
    data = tiny_work / "data" / "tiny"
    eval_rows = read_jsonl(data / "eval.jsonl")
    leaky = data / "leaky.jsonl"
    leaky.write_text((data / "train.jsonl").read_text() + json.dumps(eval_rows[0]) + "\n")
    capsys.readouterr()
    assert main(["sft", "--config", "tiny.toml", "--train", str(leaky), "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "overlap the eval split" in err and eval_rows[0]["id"] in err
    assert not (tiny_work / "data" / "runs").exists()
    # a leaked path under a new id is caught as well
    renamed = dict(eval_rows[1], id="innocent-looking-id")
    leaky.write_text(json.dumps(renamed) + "\n")
    assert main(["sft", "--config", "tiny.toml", "--train", str(leaky), "--iters", "2"]) == 2
    # overriding trains; the adapter carries the mark into every eval that uses it
    leaky.write_text((data / "train.jsonl").read_text() + json.dumps(eval_rows[0]) + "\n")
    assert main(["sft", "--config", "tiny.toml", "--train", str(leaky), "--iters", "2", "-o", "leaky_adapter",
                 "--allow-eval-overlap"]) == 0
    assert json.loads((tiny_work / "leaky_adapter" / "adapter_config.json").read_text())["contaminated"] is True
    assert main(["eval", "--config", "tiny.toml", "--adapter", "leaky_adapter", "-o", "leaky_run"]) == 0
    assert json.loads((tiny_work / "leaky_run" / "metrics.json").read_text())["contaminated"] is True
    # ... and so does a whole run trained on a leaky train split
    (data / "train.jsonl").write_text((data / "train.jsonl").read_text() + json.dumps(eval_rows[0]) + "\n")
    text = (tiny_work / "tiny.toml").read_text().replace('phases = ["base", "sft", "rsft", "consolidate"]', 'phases = ["sft"]')
    (tiny_work / "tiny.toml").write_text(text.replace("iters = 12", "iters = 2"))
    assert main(["run", "tiny.toml", "--allow-eval-overlap"]) == 0
    run = tiny_work / "data" / "runs" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["contaminated"] is True
    assert json.loads((run / "meta.json").read_text())["contaminated"] is True


def test_sft_through_cli_learns_training_questions(tiny_work):
    """`tracer sft` on the tiny KG, then `tracer eval` on its training questions: far above chance (25%)."""
    adapter = tiny_work / "learned"
    assert main(["sft", "-c", "tiny.toml", "--iters", "200", "-o", str(adapter)]) == 0
    losses = json.loads((adapter / "checkpoint" / "state.json").read_text())["losses"]
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:5]) / 5
    train_file = tiny_work / "data" / "tiny" / "train.jsonl"
    assert main(["eval", "-c", "tiny.toml", "--examples", str(train_file), "--adapter", str(adapter),
                 "--phase", "train_check", "-o", "check"]) == 0
    entry = json.loads((tiny_work / "check" / "metrics.json").read_text())["phases"]["train_check"]
    assert entry["format_rate"] > 0.9 and entry["accuracy"] > 0.6, entry


def test_rsft_resume_adds_rounds_like_an_uninterrupted_run(tiny_work, capsys):
    """Two rounds in one go == one round, then `--rounds 2 --resume` (round 1 is not redone)."""
    import mlx.core as mx

    assert main(["sft", "-c", "tiny.toml", "--iters", "6", "-o", "sft_adapter"]) == 0
    (tiny_work / "full.toml").write_text((tiny_work / "tiny.toml").read_text().replace('name = "tiny"', 'name = "full"'))
    assert main(["rsft", "-c", "full.toml", "--adapter", "sft_adapter", "--rounds", "2"]) == 0
    assert main(["rsft", "-c", "tiny.toml", "--adapter", "sft_adapter", "--rounds", "1"]) == 0
    runs_dir = tiny_work / "data" / "runs"
    part, full = runs_dir / "tiny", runs_dir / "full"
    round1 = json.loads((part / "metrics.json").read_text())["phases"]["rsft"]
    # anything but the round count changed: refused in one line, nothing written
    (tiny_work / "changed.toml").write_text((tiny_work / "tiny.toml").read_text().replace("k_samples = 2", "k_samples = 3"))
    capsys.readouterr()
    assert main(["rsft", "-c", "changed.toml", "--adapter", "sft_adapter", "--rounds", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume RSFT" in err and len(err.strip().splitlines()) == 1
    assert not (part / "models" / "rsft_r2").exists()

    assert main(["rsft", "-c", "tiny.toml", "--adapter", "sft_adapter", "--rounds", "2", "--resume",
                 "-o", "final"]) == 0
    assert "round 1: finished before, skipped" in capsys.readouterr().out
    metrics = json.loads((part / "metrics.json").read_text())["phases"]
    assert metrics["rsft"] == round1  # kept, not re-evaluated
    assert read_jsonl(part / "rsft_samples.jsonl") == read_jsonl(full / "rsft_samples.jsonl")
    assert metrics["rsft_r2"]["accuracy"] == json.loads((full / "metrics.json").read_text())["phases"]["rsft_r2"]["accuracy"]
    want = mx.load(str(full / "models" / "rsft_r2" / "adapters.safetensors"))
    for path in (part / "models" / "rsft_r2", tiny_work / "final"):
        got = mx.load(str(path / "adapters.safetensors"))
        assert set(got) == set(want)
        for k in want:
            assert mx.allclose(got[k], want[k], atol=1e-5).item(), k
    assert "rounds = 2" in (part / "config.toml").read_text()


def test_rsft_rounds_sample_the_next_pool_questions(tiny_work):
    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "-o", "sft_adapter"]) == 0
    assert main(["rsft", "-c", "tiny.toml", "--adapter", "sft_adapter", "--rounds", "2", "-n", "5"]) == 0
    pool = [r["id"] for r in read_jsonl(tiny_work / "data" / "tiny" / "rsft.jsonl")]
    samples = read_jsonl(tiny_work / "data" / "runs" / "tiny" / "rsft_samples.jsonl")
    for r, want in ((1, pool[:5]), (2, pool[5:10])):
        assert sorted({s["ex_id"] for s in samples if s["round"] == r}) == sorted(want)


def test_eval_max_tokens_caps_completions(tiny_work):
    """Greedy answers under a 2-token budget are strict prefixes of the unbudgeted ones."""
    args = ["eval", "-c", "tiny.toml", "-n", "4", "--no-shuffled"]
    assert main(args + ["-o", "full"]) == 0
    assert main(args + ["--max-tokens", "2", "-o", "short"]) == 0
    full = read_jsonl(tiny_work / "full" / "episodes" / "eval.jsonl")
    short = read_jsonl(tiny_work / "short" / "episodes" / "eval.jsonl")
    assert len(full) == len(short) == 4
    for f, s in zip(full, short):
        assert f["completion"].startswith(s["completion"]) and len(s["completion"]) < len(f["completion"])
    assert main(args + ["--max-tokens", "0"]) == 2


def test_splits_of_other_data_settings_are_refused_not_reused(tiny_work, capsys):
    from tracer import service
    from tracer.config import load_config
    from tracer.errors import TracerError

    assert main(["data", "-c", "tiny.toml"]) == 0
    cfg = load_config(tiny_work / "tiny.toml")
    assert service.ensure_data(cfg) is None  # same settings: the files are reused
    split = tiny_work / "data" / "tiny" / "eval.jsonl"
    before = split.read_text()

    text = (tiny_work / "tiny.toml").read_text()
    (tiny_work / "other.toml").write_text(text.replace("seed = 7", "seed = 8", 1))
    code = main(["eval", "-c", "other.toml"])
    err = capsys.readouterr().err
    assert code == 2 and "data.seed" in err and len(err.strip().splitlines()) == 1, err
    assert split.read_text() == before

    kg_file = tiny_work / "data" / "tiny_kg.json"
    original = kg_file.read_text()
    kg = json.loads(original)
    kg_file.write_text(json.dumps(kg))  # reformatted only: still the same KG
    assert service.ensure_data(cfg) is None
    kg["edges"] = kg["edges"][1:]
    kg_file.write_text(json.dumps(kg))
    with pytest.raises(TracerError, match=r"\(the KG differ\)"):
        service.ensure_data(cfg)

    settings = tiny_work / "data" / "tiny" / "splits.json"
    kg_file.write_text(original)  # the KG as before
    record = json.loads(settings.read_text())
    del record["counterfactual_pool"]  # a record older than a knob left at its default
    settings.write_text(json.dumps(record))
    assert service.ensure_data(cfg) is None

    kg_file.write_text(json.dumps(kg))  # the changed KG again, but ...
    settings.unlink()  # ... splits from before splits.json existed are taken as they are
    assert service.ensure_data(cfg) is None


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tiny_work):
    """`kill` (SIGTERM) of a training command stops it cleanly: checkpoint, message, exit 130."""
    import signal
    import subprocess
    import sys
    import time

    out = tiny_work / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tracer.cli import entry; entry()", "sft", "-c", "tiny.toml",
         "--iters", "100000", "-o", str(out)],
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


def test_rsft_interrupted_while_sampling_resumes_with_the_same_samples(tiny_work, monkeypatch):
    """A kill during a round's sampling keeps the chunks already scored; --resume samples only the
    rest and ends with the samples and adapter of an uninterrupted run (sampled on two worker
    processes: the samples do not depend on where they were drawn)."""
    import mlx.core as mx

    from tracer import generate, service

    from tracer import workers

    monkeypatch.setattr(service, "SAMPLE_CHUNK", 4)  # tiny pool: 12 questions -> 3 chunks
    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "-o", "sft_adapter"]) == 0
    # the uninterrupted run samples its chunks on two worker processes, the others in this one
    monkeypatch.setattr(workers, "MIN_PROMPTS", 1)
    full_text = (tiny_work / "tiny.toml").read_text().replace('name = "tiny"', 'name = "full"')
    (tiny_work / "full.toml").write_text(full_text.replace("[eval]\n", "[eval]\nworkers = 2\n"))
    assert main(["rsft", "-c", "full.toml", "--adapter", "sft_adapter"]) == 0
    monkeypatch.setattr(workers, "MIN_PROMPTS", 10**6)
    real, calls, kill = generate.generate, [], [True]

    def killed_at_second_chunk(*args, **kwargs):
        if kwargs.get("temperature", 0) > 0:  # sampling, not the round's greedy eval
            calls.append(len(kwargs["prompts"]))
            if len(calls) == 2 and kill and kill.pop():
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate", killed_at_second_chunk)
    assert main(["rsft", "-c", "tiny.toml", "--adapter", "sft_adapter"]) == 130
    run, full = tiny_work / "data" / "runs" / "tiny", tiny_work / "data" / "runs" / "full"
    assert len(read_jsonl(run / "rsft_r1_samples.partial.jsonl")) == 4 * 2  # chunk 1: 4 questions x k=2
    calls.clear()
    assert main(["rsft", "-c", "tiny.toml", "--adapter", "sft_adapter", "--resume"]) == 0
    assert calls == [8, 8]  # chunks 2 and 3 only (4 questions x k=2 each); chunk 1 came from the partial file
    assert not (run / "rsft_r1_samples.partial.jsonl").exists()
    assert read_jsonl(run / "rsft_samples.jsonl") == read_jsonl(full / "rsft_samples.jsonl")
    want = mx.load(str(full / "models" / "rsft" / "adapters.safetensors"))
    got = mx.load(str(run / "models" / "rsft" / "adapters.safetensors"))
    assert set(got) == set(want) and all(mx.allclose(got[k], want[k], atol=1e-5).item() for k in want)
    # killed during the round's training instead: the samples are all reused and training resumes
    # from its checkpoint (every question's first sample wins here: the tiny model's rarely parse)
    from tracer import train

    monkeypatch.setattr(generate, "generate", real)
    monkeypatch.setattr(service, "select_winners", lambda scored, *a: [s for s in scored if s["sample"] == 0])
    for name in ("mid", "mid_full"):
        (tiny_work / f"{name}.toml").write_text((tiny_work / "tiny.toml").read_text().replace('name = "tiny"', f'name = "{name}"'))
    assert main(["rsft", "-c", "mid_full.toml", "--adapter", "sft_adapter"]) == 0
    steps, real_share = [], train.share_cores

    def killed_at_second_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return real_share(*args, **kwargs)

    monkeypatch.setattr(train, "share_cores", killed_at_second_step)
    assert main(["rsft", "-c", "mid.toml", "--adapter", "sft_adapter"]) == 130
    mid = tiny_work / "data" / "runs" / "mid"
    assert (mid / "rsft_r1_samples.partial.jsonl").is_file() and (mid / "models" / "rsft" / "checkpoint").is_dir()
    at = json.loads((mid / "models" / "rsft" / "checkpoint" / "state.json").read_text())["step"]
    assert at >= 1
    calls.clear()
    monkeypatch.setattr(generate, "generate", killed_at_second_chunk)  # counts calls; kills no more
    assert main(["rsft", "-c", "mid.toml", "--adapter", "sft_adapter", "--resume"]) == 0
    assert calls == []  # nothing sampled again
    assert len(steps) - 2 == 4 - at  # rsft.iters = 4: only the steps after the checkpoint ran
    want = mx.load(str(tiny_work / "data" / "runs" / "mid_full" / "models" / "rsft" / "adapters.safetensors"))
    got = mx.load(str(mid / "models" / "rsft" / "adapters.safetensors"))
    assert set(got) == set(want) and all(mx.allclose(got[k], want[k], atol=1e-5).item() for k in want)
