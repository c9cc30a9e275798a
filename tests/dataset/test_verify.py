"""The split rules summarised: counts, coverage, letters, warnings (tracer.dataset.verify)."""

from __future__ import annotations

import json

import pytest

from tracer import dataset as ds
from tracer.config import DataConfig
from tracer.errors import TracerError


def test_summarize(kg, splits, cfg):
    s = ds.summarize(splits, kg, cfg)
    assert s["splits"]["eval"]["n"] == cfg.eval_size
    assert s["splits"]["eval"]["per_hop"] == {"4": 60, "5": 60}
    assert set(s["splits"]["train"]["per_hop"]) == {"1", "2", "3"}
    assert s["edge_coverage"]["min"] >= 3 and s["edge_coverage"]["frac_covered"] == 1.0
    assert s["edge_coverage"]["mean"] >= s["edge_coverage"]["min"]
    assert abs(sum(s["letters"]["train"].values()) - 1.0) < 1e-9
    assert s["warnings"] == []
    json.dumps(s)  # plain data


def test_rsft_shortfall_is_a_warning(kg):
    paths = [p for ps in ds.enumerate_paths(kg, [4, 5]).values() for p in ps]
    cfg = DataConfig(eval_size=100, rsft_size=len(paths), train_per_hop={"2": 50, "3": 50})
    sp = ds.generate_splits(kg, cfg)
    eval_keys = {ds.path_key(r) for r in sp["eval"]}
    eval_asked = {ds.asked(k) for k in eval_keys}
    left = [k for k in ((e[0], rels, e[-1]) for e, rels in paths)  # outside eval, through no eval question
            if k not in eval_keys and not ds.passes_through(k, eval_asked)]
    assert 0 < len(sp["rsft"]) == len(left) < len(paths) - 100
    summary = ds.summarize(sp, kg, cfg)
    assert any("rsft" in w for w in summary["warnings"])
    with pytest.raises(TracerError, match="RSFT"):
        ds.generate_splits(kg, DataConfig(eval_size=len(paths), rsft_size=10))


def test_pool_shortfall_is_counted_without_the_renamed_copies(kg):
    base = dict(eval_size=60, train_per_hop={"2": 100, "3": 100}, context="facts", max_facts=8)
    available = len(ds.generate_splits(kg, DataConfig(**base, rsft_size=10_000))["rsft"])
    cfg = DataConfig(**base, rsft_size=available + 1, counterfactual_pool=1.0)  # copies would cover the gap
    splits = ds.generate_splits(kg, cfg)
    assert len(splits["rsft"]) > available + 1
    warnings = ds.summarize(splits, kg, cfg)["warnings"]
    assert f"rsft has {available} questions, rsft_size asks for {available + 1}" in " ".join(warnings)
