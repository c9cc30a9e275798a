"""Bad input end to end through the CLI: one line on stderr, exit code 2, no traceback, nothing written."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tracer.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch working directory holding a copy of the shipped KG."""
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "kg.json", tmp_path / "data" / "kg.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def run_bad(argv, capsys, work):
    before = files_under(work)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert lines[0].startswith("error: ")
    assert files_under(work) == before, "a failed command wrote files"
    return lines[0]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_missing_config(capsys, work):
    assert "nope.toml: no such config file" in run_bad(["data", "--config", "nope.toml"], capsys, work)


def test_invalid_toml(capsys, work):
    cfg = write(work / "bad.toml", "[data\n")
    assert "bad.toml: invalid TOML" in run_bad(["data", "--config", cfg], capsys, work)


def test_unknown_config_key(capsys, work):
    cfg = write(work / "x.toml", "[sft]\nsteps = 3\n")
    assert "x.toml: sft.steps: unknown key" in run_bad(["sft", "--config", cfg], capsys, work)


def test_wrong_config_type(capsys, work):
    cfg = write(work / "x.toml", '[sft]\niters = "abc"\n')
    line = run_bad(["sft", "--config", cfg], capsys, work)
    assert "x.toml: sft.iters:" in line and "'abc'" in line


def test_bad_option_value(capsys, work):
    assert "--iters" in run_bad(["sft", "--iters", "abc"], capsys, work)


def test_option_out_of_range(capsys, work):
    assert "rsft.k_samples" in run_bad(["rsft", "--k-samples", "0"], capsys, work)


def test_unknown_context(capsys, work):
    assert "data.context" in run_bad(["data", "--context", "open"], capsys, work)


def test_missing_kg(capsys, work):
    assert "missing.json: no such file" in run_bad(["data", "--kg", "missing.json"], capsys, work)


def test_missing_exclude_file(capsys, work):
    assert "gone.jsonl: no such file" in run_bad(["data", "--exclude", "gone.jsonl"], capsys, work)


def test_data_exclude_makes_a_disjoint_pool(capsys, work):
    from tracer import dataset as ds

    assert main(["data", "--data-dir", "first"]) == 0
    assert main(["data", "--data-dir", "second", "--seed", "7", "-x", "first/eval.jsonl", "-x", "first/rsft.jsonl"]) == 0
    held = {ds.path_key(r) for s in ("eval", "rsft") for r in ds.load_examples(work / "first" / f"{s}.jsonl")}
    for split in ("train", "rsft", "eval"):
        rows = ds.load_examples(work / "second" / f"{split}.jsonl")
        assert rows and not {ds.path_key(r) for r in rows} & held, split
    assert json.loads((work / "second" / "splits.json").read_text())["exclude"] == ["first/eval.jsonl", "first/rsft.jsonl"]


def test_kg_invalid_json(capsys, work):
    kg = write(work / "kg_bad.json", '{"entities": [\n')
    assert "kg_bad.json: invalid JSON at line" in run_bad(["data", "--kg", kg], capsys, work)


def test_kg_edge_to_unknown_entity(capsys, work):
    data = json.loads((work / "data" / "kg.json").read_text())
    data["edges"].append({"src": data["entities"][0]["id"], "rel": "caused_by", "dst": "NoSuchThing"})
    kg = write(work / "kg_edge.json", json.dumps(data))
    line = run_bad(["data", "--kg", kg], capsys, work)
    assert "kg_edge.json" in line and "NoSuchThing" in line


def test_missing_examples(capsys, work):
    assert "nothing.jsonl: no such file" in run_bad(["eval", "--examples", "nothing.jsonl"], capsys, work)


def test_malformed_jsonl_line(capsys, work):
    ex = write(work / "train_bad.jsonl", '{"id": "a"}\n{not json\n')
    line = run_bad(["sft", "--train", ex], capsys, work)
    assert "train_bad.jsonl:" in line and ("line 1" in line or ":1:" in line or ":2:" in line)


def test_empty_examples(capsys, work):
    ex = write(work / "empty.jsonl", "")
    assert "empty.jsonl: no examples" in run_bad(["eval", "--examples", ex], capsys, work)


def test_continue_missing_adapter(capsys, work):
    ex = write(work / "t.jsonl", "")
    line = run_bad(["continue", "--adapter", "no_adapter", "--train", ex, "--adapter-out", "out"], capsys, work)
    assert "no_adapter" in line


def test_report_missing_run(capsys, work):
    assert "no such run directory" in run_bad(["report", "runs/none"], capsys, work)


def test_report_examples_refuses_what_it_would_ignore(capsys, work):
    for flag in (["--json"], ["--markdown", "r.md"], ["--plot", "r.png"], ["--per-hop"]):
        assert "does not combine" in run_bad(["report", "runs/none", "--examples", *flag], capsys, work)


def test_run_refuses_to_overwrite(capsys, work):
    run_dir = work / "data" / "runs" / "quick"
    run_dir.mkdir(parents=True)
    (run_dir / "meta.json").write_text("{}")
    shutil.copy(ROOT / "configs" / "quick.toml", work / "quick.toml")
    line = run_bad(["run", "quick.toml"], capsys, work)
    assert "exists" in line and "--force" in line


@pytest.fixture
def made(work, capsys):
    """`work` with the shipped KG's splits generated (default settings)."""
    assert main(["data"]) == 0
    capsys.readouterr()
    return work / "data"


def rerecord(data_dir: Path) -> None:
    """Record hand-edited splits in splits.json, as if `tracer data` had written them."""
    from tracer.pipeline.data import file_record

    record = json.loads((data_dir / "splits.json").read_text())
    record["files"] = {split: file_record(data_dir / f"{split}.jsonl") for split in record["files"]}
    (data_dir / "splits.json").write_text(json.dumps(record))


def test_run_refused_for_leaky_data_writes_no_run_dir(capsys, work, made):
    eval_row = (made / "eval.jsonl").read_text().splitlines()[0]
    (made / "train.jsonl").write_text((made / "train.jsonl").read_text() + eval_row + "\n")
    rerecord(made)  # (a split edited by hand is refused otherwise: tests/pipeline/test_data.py)
    shutil.copy(ROOT / "configs" / "quick.toml", work / "quick.toml")
    assert "overlap the eval split" in run_bad(["run", "quick.toml"], capsys, work)


def test_guard_compares_with_the_eval_split_before_it_is_made(capsys, work):
    assert main(["data", "--data-dir", "elsewhere"]) == 0  # the same default settings: the same eval split
    capsys.readouterr()
    ex = write(work / "leaky.jsonl", (work / "elsewhere" / "eval.jsonl").read_text().splitlines()[0] + "\n")
    shutil.rmtree(work / "elsewhere")
    line = run_bad(["sft", "--train", ex, "--model", "no-such-model"], capsys, work)
    assert "overlap the eval split data/eval.jsonl (not made yet)" in line


def test_run_refused_for_a_leaky_rsft_pool_writes_no_run_dir(capsys, work, made):
    eval_row = (made / "eval.jsonl").read_text().splitlines()[0]
    (made / "rsft.jsonl").write_text((made / "rsft.jsonl").read_text() + eval_row + "\n")
    rerecord(made)
    cfg = write(work / "q.toml", (ROOT / "configs" / "quick.toml").read_text())
    # (--model: a missed overlap must fail fast here, not evaluate the default model)
    line = run_bad(["run", cfg, "--model", "no-such-model"], capsys, work)
    assert "rsft.jsonl: 1 training examples overlap the eval split" in line


def test_failed_rsft_resume_leaves_the_runs_config_alone(capsys, work, made):
    from tracer.config import load_config, to_toml

    shutil.copy(ROOT / "configs" / "quick.toml", work / "quick.toml")
    run_dir = work / "data" / "runs" / "quick"
    run_dir.mkdir(parents=True)
    stored = write(run_dir / "config.toml", to_toml(load_config(work / "quick.toml")))
    before = Path(stored).read_text()
    line = run_bad(["rsft", "-c", "quick.toml", "--resume", "--rounds", "3", "--adapter", "nope"], capsys, work)
    assert "nope" in line and Path(stored).read_text() == before


def test_run_name_and_force_cannot_reach_outside_a_run_dir(capsys, work):
    shutil.copy(ROOT / "configs" / "quick.toml", work / "quick.toml")
    (work / "data" / "runs" / "keep").mkdir(parents=True)
    (work / "data" / "runs" / "keep" / "meta.json").write_text("{}")
    # (--model: were "." taken, the run must fail fast, not run the default model)
    line = run_bad(["run", "quick.toml", "--name", ".", "--force", "--model", "no-such-model"], capsys, work)
    assert "run.name: expected a directory name" in line
    (work / "data" / "notes").mkdir()
    (work / "data" / "notes" / "mine.txt").write_text("x")
    cfg = write(work / "r.toml", '[run]\nname = "notes"\nruns_dir = "data"\nphases = []\n')
    line = run_bad(["run", cfg, "--force"], capsys, work)
    assert "--force deletes only what tracer wrote" in line and "tracer did not write: mine.txt" in line


def test_corrupt_splits_record(capsys, work, made):
    (made / "splits.json").write_text('{"seed": 12')
    assert "splits.json: invalid JSON" in run_bad(["eval", "--model", "no-such-model"], capsys, work)


def test_run_seed_seeds_every_phase_but_keeps_the_questions(capsys, work):
    from tracer.config import load_config

    cfg = write(work / "s.toml", '[run]\nname = "s"\nphases = []\n')
    assert main(["run", cfg, "--seed", "7"]) == 0
    resolved = load_config(work / "data" / "runs" / "s" / "config.toml")
    assert [resolved.sft.seed, resolved.rsft.seed, resolved.grpo.seed, resolved.consolidate.seed, resolved.eval.seed,
            resolved.run.seed] == [7] * 6
    assert resolved.data.seed == load_config(cfg).data.seed
    assert json.loads((work / "data" / "runs" / "s" / "meta.json").read_text())["seed"] == 7


def test_eval_path_named_by_entities_alone_is_refused(capsys, work, made):
    row = json.loads((made / "eval.jsonl").read_text().splitlines()[0])
    row = dict(row, id="mine-1", path_star={"entities": row["path_star"]["entities"]}, meta={})
    ex = write(work / "mine.jsonl", json.dumps(row) + "\n")
    # (--model: a missed overlap must fail fast here, not train the default model)
    assert "mine-1" in run_bad(["sft", "--train", ex, "--model", "no-such-model"], capsys, work)


def test_training_row_without_a_trace(capsys, work, made):
    row = json.loads((made / "train.jsonl").read_text().splitlines()[0])
    row = dict(row, id="bare-1", path_star={"entities": row["path_star"]["entities"][::-1]}, meta={}, ref={})
    ex = write(work / "bare.jsonl", json.dumps(row) + "\n")
    assert "bare-1: no reference trace" in run_bad(["sft", "--train", ex, "--model", "no-such-model"], capsys, work)


def test_output_path_taken_by_a_file(capsys, work):
    write(work / "taken", "")
    assert "taken: cannot write the splits: not a directory" in run_bad(["data", "--data-dir", "taken"], capsys, work)
    line = run_bad(["sft", "--adapter-out", "taken/sub", "--model", "no-such-model"], capsys, work)
    assert "taken/sub: cannot write the adapter: not a directory: taken is in the way" in line


def unwritable(work: Path) -> Path:
    """A directory nobody may create files in: /sys (root too), or a read-only one when not root."""
    if os.geteuid() != 0:
        d = work / "readonly"
        d.mkdir()
        d.chmod(0o555)
        return d
    if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and not Path("/sys/fs").is_dir():
        pytest.skip("no read-only directory to write into")
    return Path("/sys")


def test_unwritable_outputs_are_refused_before_any_work(capsys, work):
    ro = unwritable(work)
    assert f"{ro}/splits: cannot write the splits" in run_bad(["data", "--data-dir", str(ro / "splits")], capsys, work)
    # the adapter directory, before the splits are made and the model loaded
    line = run_bad(["sft", "--adapter-out", str(ro / "adapter"), "--model", "no-such-model"], capsys, work)
    assert f"{ro}/adapter: cannot write the adapter" in line
    for argv in (["eval", "--run-dir", str(ro / "run")], ["rsft", "--run-dir", str(ro / "run")],
                 ["consolidate", "--run-dir", str(ro / "run"), "--samples", write(work / "s.jsonl", "{}\n")]):
        line = run_bad(argv + ["--model", "no-such-model"], capsys, work)
        assert line.startswith(f"error: {ro}/run") and "cannot write the" in line, argv
    cfg = write(work / "r.toml", f'[run]\nname = "r"\nruns_dir = "{ro}"\nphases = []\n')
    assert f"{ro}/r: cannot write the run" in run_bad(["run", cfg], capsys, work)
    assert not (work / "data" / "eval.jsonl").exists()


def test_a_bad_model_or_adapter_on_eval_writes_no_splits(capsys, work):
    """eval used to write the data splits, then fail on the model or adapter."""
    assert "unknown model 'no-such-model'" in run_bad(["eval", "--model", "no-such-model"], capsys, work)
    assert "nope: not an adapter directory" in run_bad(["eval", "--adapter", "nope"], capsys, work)
    (work / "half").mkdir()
    write(work / "half" / "adapter_config.json", '{"base_model": "smollm2-135m-instruct"}')
    assert "half: adapter directory has no adapters.safetensors" in run_bad(["eval", "--adapter", "half"], capsys, work)
    write(work / "half" / "adapters.safetensors", "")
    write(work / "half" / "adapter_config.json", '{"base_model": "another-model"}')
    assert "trained for base model 'another-model'" in run_bad(["eval", "--adapter", "half"], capsys, work)
    assert not (work / "data" / "eval.jsonl").exists()


def test_unknown_model_alias(capsys, work):
    cfg = write(work / "m.toml", '[model]\npath = "no-such-model"\ncache_dir = "cache"\n')
    assert "no-such-model" in run_bad(["model", "pull", "no-such-model", "--config", cfg], capsys, work)


def test_help_explains_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("data", "eval", "sft", "rsft", "continue", "run", "report", "model", "doctor"):
        assert cmd in out


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tracer", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rsft" in out.stdout and "consolidate" in out.stdout


def test_progress_off_a_terminal_prints_plain_status_lines():
    import io

    from rich.console import Console

    from tracer.display import RichProgress

    out = io.StringIO()
    p = RichProgress(Console(file=out, width=200), every=3600.0)
    p.start("train", 5)
    p.update(1, loss=0.5, tok_s=250)
    p.update(1, loss=0.25)  # within `every` of the last line: not printed
    p.stop()
    lines = out.getvalue().splitlines()
    assert any(line.startswith("train 1/5") and "loss 0.5" in line and "tok_s 250" in line for line in lines), lines
    assert not any(line.startswith("train 2/5") for line in lines), lines


def test_progress_eta_holds_steady_over_steps_of_uneven_length():
    import io

    from rich.console import Console

    from tracer.display import RichProgress

    now = [0.0]
    p = RichProgress(Console(file=io.StringIO()), clock=lambda: now[0])
    p.start("train", 100)
    etas = []
    for step in range(1, 61):  # short and long batches, 11 s a step on average
        now[0] += (2.0, 20.0, 2.0, 2.0, 29.0)[step % 5]
        p.update(1)
        if step > 40:
            etas.append(p.bar.tasks[0].time_remaining / ((100 - step) * 11.0))  # against the true time left
    p.stop()
    assert all(0.75 < r < 1.25 for r in etas), [round(r, 2) for r in etas]


def test_ctrl_c_is_one_line_and_exit_130(capsys, work, monkeypatch):
    from tracer.pipeline import data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "make_data", interrupted)
    assert main(["data"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


# (command, its option names, old spellings that stay accepted but hidden)
VOCABULARY = [
    ("data", ["--data-dir"], ["--output"]),
    ("eval", ["--run-dir"], ["--output"]),
    ("sft", ["--adapter-out"], ["--output"]),
    ("continue", ["--adapter-out"], ["--output"]),
    ("rsft", ["--pool", "--run-dir", "--adapter-out", "--max-questions"], ["--train", "--output", "--max-examples"]),
    ("consolidate", ["--pool", "--run-dir", "--adapter-out"], ["--output"]),
]


@pytest.mark.parametrize("command, names, old", VOCABULARY)
def test_each_option_name_means_one_thing_and_old_spellings_are_hidden(capsys, command, names, old):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert name in out, name
    for name in old:
        assert f"{name} " not in out and f"{name}\n" not in out, name


def test_old_spellings_still_work(capsys, work):
    assert main(["data", "-o", "old"]) == 0 and (work / "old" / "eval.jsonl").is_file()
    assert main(["data", "--output", "old2", "--data-dir", "old2"]) == 0  # the same value twice is fine
    capsys.readouterr()
    # each old spelling reaches its new name: two different values for the pair are refused
    for argv, pair in ((["data", "--data-dir", "a", "--output", "b"], "--data-dir and --output"),
                       (["eval", "--run-dir", "a", "-o", "b"], "--run-dir and --output"),
                       (["sft", "--adapter-out", "a", "-o", "b"], "--adapter-out and --output"),
                       (["rsft", "--pool", "a", "--train", "b"], "--pool and --train"),
                       (["rsft", "--max-questions", "3", "--max-examples", "4"], "--max-questions and --max-examples"),
                       (["rsft", "--adapter-out", "a", "-o", "b"], "--adapter-out and --output"),
                       (["consolidate", "--adapter-out", "a", "-o", "b"], "--adapter-out and --output")):
        assert pair in run_bad(argv, capsys, work), argv


def test_continue_needs_an_adapter_directory(capsys, work):
    ex = write(work / "t.jsonl", "")
    line = run_bad(["continue", "--adapter", "a", "--train", ex], capsys, work)
    assert "Missing option '--adapter-out'" in line


def test_shell_completion_is_on(capsys):
    assert main(["--help"]) == 0
    assert "--install-completion" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["model"], ["kg"]])
def test_no_arguments_print_the_help_once(capsys, argv):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert (out + err).count("Usage:") == 1, out + err


def test_phase_names_cannot_reach_outside_the_run_dir(capsys, work):
    for phase in ("../../evil", "a/b", "..", ""):
        line = run_bad(["eval", "--phase", phase, "--model", "no-such-model"], capsys, work)
        assert "--phase: expected a name" in line, line
    assert "--phase: expected a name" in run_bad(["report", "runs/none", "--examples", "--phase", "../x"], capsys, work)
