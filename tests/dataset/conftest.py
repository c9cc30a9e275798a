"""Fixtures of the dataset tests: the synthetic KG, a config for it and its splits (built once per module)."""

from __future__ import annotations

import pytest

from tracer import dataset as ds
from tracer.config import DataConfig
from tracer.kg import kg_from_dict

from synthetic import synth_kg_dict


@pytest.fixture(scope="module")
def kg():
    return kg_from_dict(synth_kg_dict(), "synthetic")


@pytest.fixture(scope="module")
def cfg():
    return DataConfig(eval_size=120, rsft_size=200, train_per_hop={"2": 300, "3": 300})


@pytest.fixture(scope="module")
def splits(kg, cfg):
    return ds.generate_splits(kg, cfg)
