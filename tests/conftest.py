"""Shared fixtures: small model specs built through the real config path."""

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


