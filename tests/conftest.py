"""Shared fixtures: small model specs built through the real config path."""

import jax
import optax
import pytest

from colax import model, row_adam


def adam_state(opt_state):
    """The Adam state inside `opt_state`: optax's `ScaleByAdamState` (AdamW of a kind without
    `vector_steps`) or `row_adam.ScaleByRowAdamState` (with: SwitchLoRA)."""
    is_adam = lambda x: isinstance(x, (optax.ScaleByAdamState, row_adam.ScaleByRowAdamState))
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s))


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




def authors_package(module):
    """Import `module` from the `parity` extra (the authors' code), or skip the test in one line."""
    return extra_package(module, "parity")


def extra_package(module, extra):
    """Import `module` from the optional dependencies `extra`, or skip the test in one line.

    The extras `make test` installs on Python 3.11 (parity, beam) must be there on 3.11: a CI run on
    3.11 without them is a failure, never a silent skip.
    """
    import importlib
    import os
    import sys

    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f"{module} not importable ({e}); install the {extra} extra: pip install -e '.[{extra}]'"
        if os.environ.get("CI") and sys.version_info[:2] == (3, 11):
            pytest.fail(why)
        pytest.skip(why, allow_module_level=True)
