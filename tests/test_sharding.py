"""Sharding rules and activation constraints; the 8-device tests run in a
subprocess (tests/multidevice_sharding.py) so that this process keeps its single device."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from colax import model, sharding, state
from conftest import small_spec

TESTS = Path(__file__).parent


@pytest.mark.slow
def test_multidevice_suite_passes():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         str(TESTS / "multidevice_sharding.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.mark.parametrize("projection", ["cola", "dense", "sltrain", "crnet", "lora", "switchlora", "sst"])
def test_every_parameter_has_logical_axes(projection):
    params = nnx.to_pure_dict(nnx.state(model.abstract_model(small_spec(projection=projection))))
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert len(state.param_logical_axes(path)) == leaf.ndim, jax.tree_util.keystr(path)


def test_a_mesh_axis_shards_one_dimension_only():
    assert sharding.logical_spec(("layers", "rank", "embed")) == P(None, "fsdp", None)
    assert sharding.logical_spec(("batch", "length", "act_heads", None)) == P(("data", "fsdp"), None, "tensor", None)


def test_unknown_parameter_is_named():
    path = (jax.tree_util.DictKey("blocks"), jax.tree_util.DictKey("extra"))
    with pytest.raises(ValueError, match="blocks/extra"):
        state.param_logical_axes(path)


def test_constrain_without_mesh_is_identity():
    x = jax.numpy.ones((2, 3, 4))
    assert sharding.constrain(x, sharding.BTD) is x
