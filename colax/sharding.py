"""The device mesh, where parameters, optimizer state and batches live, and the jitted step.

Mesh axes: "data" (batch), "fsdp" (batch, and parameters sharded), "tensor" (tensor parallel).
"""

import math

import jax
import ml_collections
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from colax import model as model_lib
from colax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def defaults():
    """The `config.mesh` section: devices per axis; one axis may be -1 (the remaining devices)."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def mesh_shape(cfg_mesh, num_devices):
    """The (data, fsdp, tensor) sizes for `num_devices`; ConfigError if impossible."""
    sizes = [cfg_mesh[a] for a in AXES]
    free = [a for a, s in zip(AXES, sizes) if s == -1]
    bad = [a for a, s in zip(AXES, sizes) if s != -1 and (not isinstance(s, int) or s < 1)]
    if bad or len(free) > 1:
        field = bad[0] if bad else free[1]
        raise ConfigError(f"mesh.{field} must be a positive integer (one axis may be -1), got {cfg_mesh[field]!r}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ConfigError(f"mesh.{free[0]}=-1: {num_devices} devices are not divisible by the other axes ({known})")
        sizes[AXES.index(free[0])] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(cfg_mesh, devices=None):
    """A mesh with automatic (GSPMD) axes over `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg_mesh, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def param_sharding(path, leaf, mesh):
    """Where a parameter (or an optimizer-state leaf shaped like one) lives: replicated for now."""
    del path, leaf
    return NamedSharding(mesh, P())


def tree_shardings(tree, mesh):
    """Shardings for a pytree of parameters / optimizer state, leaf by leaf from its path."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: param_sharding(path, leaf, mesh), tree)


def batch_sharding(mesh):
    """Micro-batch stacks [A, B, T]: the B axis split over data and fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def init_state(spec, tx, mesh, seed):
    """(graphdef, params, opt_state), created on the mesh already sharded (never on one device)."""
    graphdef = nnx.graphdef(model_lib.abstract_model(spec))

    def init():
        params = nnx.state(model_lib.Transformer(spec, rngs=nnx.Rngs(seed))).to_pure_dict()
        return params, tx.init(params)

    shapes = jax.eval_shape(init)
    shardings = tree_shardings(shapes, mesh)
    params, opt_state = jax.jit(init, out_shardings=shardings)()
    return graphdef, params, opt_state


def jit_train_step(train_step, params, opt_state, mesh):
    """`train_step` jitted with explicit in/out shardings; params and opt_state donated."""
    state_shardings = tree_shardings((params, opt_state), mesh)
    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step, donate_argnums=(0, 1),
                   in_shardings=(*state_shardings, batch_sharding(mesh)),
                   out_shardings=(*state_shardings, replicated))
