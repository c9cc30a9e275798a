"""`tracer run` end to end on the tiny config: a real (tiny) model, real training, real files."""

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
    assert main(["consolidate", "-c", "tiny.toml", "--iters", "2", "--adapter-out", "cons2"]) == 0
    cons = json.loads((run / "metrics.json").read_text())["phases"]["consolidate"]
    assert cons["adapter"] == "cons2" and (tiny_work / "cons2" / "adapters.safetensors").is_file()
    # no round kept a winner: the facts alone are rehearsed, from the last round's adapter
    lost = tiny_work / "no_winners.jsonl"
    lost.write_text("".join(json.dumps(s | {"kept": False}) + "\n" for s in samples))
    capsys.readouterr()
    assert main(["consolidate", "-c", "tiny.toml", "--samples", str(lost), "--iters", "2", "--adapter-out", "cons3"]) == 0
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


def test_force_lists_what_it_deletes_and_a_directory_sft_made_is_not_a_dead_end(tiny_work, capsys):
    text = (tiny_work / "tiny.toml").read_text().replace('phases = ["base", "sft", "rsft", "consolidate"]', 'phases = ["sft"]')
    (tiny_work / "tiny.toml").write_text(text.replace("iters = 12", "iters = 3", 1))
    run = tiny_work / "data" / "runs" / "tiny"
    # `tracer sft` writes models/sft of the run directory, without meta.json
    assert main(["sft", "-c", "tiny.toml", "--iters", "2"]) == 0
    assert (run / "models" / "sft" / "adapters.safetensors").is_file() and not (run / "meta.json").exists()
    capsys.readouterr()
    assert main(["run", "tiny.toml"]) == 2
    err = capsys.readouterr().err
    assert "no meta.json" in err and "--resume" in err and "--force" in err and "models/ (" in err
    # --resume continues from what it holds, but an adapter of other settings (2 steps, not 3) is refused
    assert main(["run", "tiny.toml", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained for 2 steps, but sft.iters is 3" in err and len(err.strip().splitlines()) == 1
    assert main(["sft", "-c", "tiny.toml", "--force"]) == 0  # this config's adapter
    adapter = (run / "models" / "sft" / "adapters.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["run", "tiny.toml", "--resume"]) == 0, capsys.readouterr().err
    assert "continuing from what it holds" in " ".join(capsys.readouterr().out.split())  # (rich wraps lines)
    assert (run / "models" / "sft" / "adapters.safetensors").read_bytes() == adapter  # kept, not trained again
    assert json.loads((run / "metrics.json").read_text())["phases"]["sft"]["n"] == 12
    assert json.loads((run / "meta.json").read_text())["phases"] == ["sft"]
    # --force deletes only what tracer wrote, and says what
    (run / "notes.txt").write_text("mine")
    (run / "models" / "sft" / "plot.png").write_text("mine too")
    capsys.readouterr()
    assert main(["run", "tiny.toml", "--force"]) == 2
    err = capsys.readouterr().err
    assert "tracer did not write: models/sft/plot.png, notes.txt" in err and len(err.strip().splitlines()) == 1
    assert (run / "notes.txt").is_file() and (run / "models" / "sft" / "adapters.safetensors").is_file()
    (run / "notes.txt").unlink()
    (run / "models" / "sft" / "plot.png").unlink()
    assert main(["run", "tiny.toml", "--force"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--force: deleting the contents of" in out
    assert "config.toml, episodes/ (1 file), meta.json, metrics.json, models/ (" in out, out
