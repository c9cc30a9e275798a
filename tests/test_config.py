import json
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

import pytest

from tracer.config import Config, config_from_dict, load_config, override, to_toml
from tracer.errors import TracerError


def test_every_field_has_a_description_and_default():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            assert not field.is_required(), f"{prefix}{name} has no default"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]):
                walk(ann, f"{prefix}{name}.")

    walk(Config)


ROOT = Path(__file__).resolve().parents[1]


SHIPPED = sorted((ROOT / "configs").glob("*.toml")) + sorted((ROOT / "configs" / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "configs").with_suffix("")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    kg = (ROOT / cfg.data.kg).resolve()
    if not kg.is_file() and not kg.is_relative_to(ROOT):
        pytest.skip(f"{cfg.data.kg}: shared data outside the checkout is not here")
    assert cfg.eval.max_tokens > 0 and kg.is_file()


def test_experiment_configs_point_to_their_log_entry():
    for path in sorted((ROOT / "configs" / "experiments").glob("*.toml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# Log: docs/experiments/"), f"{path.name}: first line {first!r}"
        log = first.removeprefix("# Log: ").split(",")[0]
        assert (ROOT / log).is_file(), f"{path.name}: {log} does not exist"


def test_rsft_preset_is_the_code_defaults():
    # configs/default_rsft.toml is the measured closed-book RL recipe, and so are the code defaults: it only names its run
    assert load_config(ROOT / "configs" / "default_rsft.toml") == Config(run={"name": "default_rsft"})


def test_default_preset_is_the_measured_run():
    # configs/default.toml holds the settings of the run its results come from, under its own names
    want = load_config(ROOT / "configs" / "experiments" / "default_fast.toml").model_dump()
    want["data"]["out_dir"], want["run"]["name"] = "data/default", "default"
    assert load_config(ROOT / "configs" / "default.toml").model_dump() == want


def test_public_graph_preset_is_the_measured_run():
    # configs/mhr.toml holds the settings of the run its results come from (mhr_one), under its own names
    want = load_config(ROOT / "configs" / "experiments" / "mhr_one.toml").model_dump()
    want["data"]["out_dir"], want["run"]["name"] = "data/mhr", "mhr"
    assert load_config(ROOT / "configs" / "mhr.toml").model_dump() == want


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[sft]\niterz = 3\n")
    with pytest.raises(TracerError, match=r"x.toml: sft.iterz: unknown key"):
        load_config(p)


def test_wrong_type_names_key_and_value(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('[sft]\niters = "abc"\n')
    with pytest.raises(TracerError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: sft.iters: ") and "'abc'" in msg and "\n" not in msg


def test_values_are_not_coerced_across_types():
    # a quoted number or a 1 for a bool is a mistake in the file, not a value to convert
    for section, key, value in [("sft", "iters", "600"), ("eval", "shuffled", 1), ("data", "seed", "7"),
                                ("lora", "rank", 16.0)]:
        with pytest.raises(TracerError, match=f"{section}.{key}: .*got {value!r}"):
            config_from_dict({section: {key: value}})
    assert config_from_dict({"lora": {"alpha": 320}}).lora.alpha == 320.0  # an int where a float goes is fine


def test_lora_num_layers_zero_is_refused():
    with pytest.raises(TracerError, match="lora.num_layers: 0 adapts no layer"):
        config_from_dict({"lora": {"num_layers": 0}})
    with pytest.raises(TracerError, match="lora.num_layers: .*greater than or equal to -1"):
        config_from_dict({"lora": {"num_layers": -2}})
    assert config_from_dict({"lora": {"num_layers": 3}}).lora.num_layers == 3


def test_frontier_traces_refuse_renamed_questions():
    with pytest.raises(TracerError, match="counterfactual: renamed questions have path traces only"):
        config_from_dict({"data": {"context": "facts", "counterfactual": 0.5, "trace": "frontier"}})
    with pytest.raises(TracerError, match="data.trace"):
        config_from_dict({"data": {"trace": "sets"}})


def test_constraint_violation(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[rsft]\nk_samples = 0\n")
    with pytest.raises(TracerError, match="rsft.k_samples: .*greater than or equal to 1"):
        load_config(p)


def test_invalid_toml_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[sft\n")
    with pytest.raises(TracerError, match="bad.toml: invalid TOML"):
        load_config(p)
    with pytest.raises(TracerError, match="nope.toml: no such config file"):
        load_config(tmp_path / "nope.toml")


def test_override_and_toml_round_trip():
    cfg = override(Config(), sft__iters=7, data__context="facts", eval__seed=None)
    assert cfg.sft.iters == 7 and cfg.data.context == "facts"
    again = config_from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg and cfg.data.types is None  # an unset optional key round-trips (TOML has no null)
    typed = override(cfg, data__types="types.tsv")
    assert config_from_dict(tomllib.loads(to_toml(typed))) == typed
    with pytest.raises(TracerError, match="command line: sft.iters"):
        override(cfg, sft__iters=0)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "..\\x"])
def test_run_name_is_one_directory_name(tmp_path, name):
    p = tmp_path / "x.toml"
    p.write_text(f"[run]\nname = {json.dumps(name)}\n")
    with pytest.raises(TracerError, match="run.name: expected a directory name"):
        load_config(p)


def test_phases_need_their_inputs_before_them(tmp_path):
    p = tmp_path / "x.toml"
    for phases, missing in [('["base", "rsft"]', "sft"), ('["rsft", "sft"]', "sft"),
                            ('["base", "sft", "consolidate"]', "rsft"), ('["sft", "consolidate", "rsft"]', "rsft")]:
        p.write_text(f"[run]\nphases = {phases}\n")
        with pytest.raises(TracerError, match=f"'{missing}' must come before it"):
            load_config(p)
    p.write_text('[run]\nphases = ["sft", "rsft", "consolidate"]\n')
    assert load_config(p).run.phases[-1] == "consolidate"
