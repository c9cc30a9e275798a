"""`tracer rsft` on the tiny config: rounds, resuming them, resuming an interrupted round."""

import json
from pathlib import Path


from tracer.cli import main


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rsft_resume_adds_rounds_like_an_uninterrupted_run(tiny_work, capsys):
    """Two rounds in one go == one round, then `--rounds 2 --resume` (round 1 is not redone)."""
    import mlx.core as mx

    assert main(["sft", "-c", "tiny.toml", "--iters", "6", "--adapter-out", "sft_adapter"]) == 0
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
                 "--adapter-out", "final"]) == 0
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
    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "--adapter-out", "sft_adapter"]) == 0
    assert main(["rsft", "-c", "tiny.toml", "--adapter", "sft_adapter", "--rounds", "2", "--max-questions", "5"]) == 0
    pool = [r["id"] for r in read_jsonl(tiny_work / "data" / "tiny" / "rsft.jsonl")]
    samples = read_jsonl(tiny_work / "data" / "runs" / "tiny" / "rsft_samples.jsonl")
    for r, want in ((1, pool[:5]), (2, pool[5:10])):
        assert sorted({s["ex_id"] for s in samples if s["round"] == r}) == sorted(want)


def test_rsft_interrupted_while_sampling_resumes_with_the_same_samples(tiny_work, monkeypatch):
    """A kill during a round's sampling keeps the chunks already scored; --resume samples only the
    rest and ends with the samples and adapter of an uninterrupted run (sampled on two worker
    processes: the samples do not depend on where they were drawn)."""
    import mlx.core as mx

    from tracer import generate, workers
    from tracer.pipeline import rsft

    monkeypatch.setattr(rsft, "SAMPLE_CHUNK", 4)  # tiny pool: 12 questions -> 3 chunks
    assert main(["sft", "-c", "tiny.toml", "--iters", "2", "--adapter-out", "sft_adapter"]) == 0
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
    monkeypatch.setattr(rsft, "select_winners", lambda scored, *a: [s for s in scored if s["sample"] == 0])
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
