"""Shared fixtures: small model specs built through the real config path; config files."""

import importlib.util

import pytest

from colax import model


def small_spec(**overrides):
    """A tiny fp32 ModelSpec (d=32, 4 heads, 2 layers, rank 8, vocab 64) with field overrides."""
    m = model.defaults()
    m.update(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, rank=8,
             dtype="float32")
    m.ranks.update(overrides.pop("ranks", {}))
    m.update(**{k: v for k, v in overrides.items() if k in m})
    spec = model.spec_from_config(m)
    return spec.replace(**{k: v for k, v in overrides.items() if k not in m})


@pytest.fixture
def spec():
    return small_spec()



def load_config_file(path):
    """The ConfigDict returned by `get_config()` of a config file such as configs/tiny.py."""
    module_spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()
