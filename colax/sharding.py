"""The device mesh, the logical-axis rules, and where activations and batches live.

Mesh axes: "data" (batch), "fsdp" (batch, and parameters sharded), "tensor" (tensor parallel).
Every array axis has a logical name (parameters: `colax.state.param_axes_table()`; activations:
the names used with `constrain`); `RULES` is the one table mapping logical names to mesh axes.
This module serves the layers and imports no model code; `colax.state` places the model's state.
The tensor-parallel layout the rules encode for CoLA, and its collectives, are in docs/sharding.md.
"""

import functools
import math

import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from colax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. A mesh axis shards at most one dimension of an array: a dimension
# whose mesh axes an earlier dimension already took stays whole.
RULES = {
    # parameters
    "layers": (),                   # the stacked-block axis [L]
    "vocab": ("tensor",),
    "embed": ("fsdp",),             # d: the FSDP axis of every matrix that has a free d
    "heads": ("tensor",),           # q/k/v outputs and o input (head-major: heads never split)
    "mlp": ("tensor",),             # gate/up outputs and down input
    "rank": ("fsdp",),              # r: FSDP where d is not free; never tensor (docs/sharding.md)
    "norm": (),
    "sparse": ("fsdp",),            # the entries of a sparse matrix's support (SLTrain)
    # optimizer state (colax.galore): the r of projectors and projected moments; FSDP where free
    "opt_rank": ("fsdp",),
    "svd_batch": ("fsdp", "tensor"),  # the layer axis of gradient stacks during GaLore's SVD ...
    "svd_batch_fsdp": ("fsdp",),      # ... and on the way there and back (colax.galore._factor)
    # activations
    "batch": BATCH_AXES,
    "length": (),
    "act_embed": (),                # the residual stream is whole on every tensor device
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_rank": (),                 # the CoLA bottleneck silu(x @ A) is whole on every tensor device
    "act_vocab": ("tensor",),
}

BTD = ("batch", "length", "act_embed")


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
    """A mesh with automatic (GSPMD) axes over `devices` (default: all). Devices of several TPU
    slices (`slice_index`) are laid out with the data axis across slices (over the data-centre
    network; `mesh_utils.create_hybrid_device_mesh`), the rest within each slice."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg_mesh, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    if shape[0] % slices:
        raise ConfigError(f"mesh.data={shape[0]} must be a multiple of the {slices} slices (data parallelism "
                          "spans the slices)")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices)
    return jax.sharding.Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def logical_spec(logical_axes):
    """The PartitionSpec for an array whose dimensions have these logical names (None: whole)."""
    used, spec = set(), []
    for name in logical_axes:
        axes = tuple(a for a in RULES[name] if a not in used) if name else ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes or None)
    return P(*spec)


def batch_sharding(mesh):
    """Micro-batch stacks [A, B, T]: the B axis split over data and fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def global_batch(local_batch, mesh):
    """This process's [A, B_local, T] arrays joined into global [A, B, T] arrays on the mesh."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), x), local_batch)


def constrain(x, logical_axes):
    """`x` pinned to the layout of its logical axes on the context mesh; `x` itself without one.

    The context mesh is set by `on_mesh` (and by `jax.set_mesh`).
    """
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes))


def constrain_divisible(x, logical_axes):
    """`constrain`, where each dimension keeps the longest prefix of its mesh axes whose device
    count divides its size (for arrays whose sizes the config does not fix, e.g. layer stacks)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = []
    for n, axes in zip(x.shape, logical_spec(logical_axes)):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        while axes and n % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        spec.append(axes or None)
    return jax.lax.with_sharding_constraint(x, P(*spec))


def on_mesh(fn, mesh):
    """`fn` traced with `mesh` as the context mesh, so the model's `constrain` calls take effect."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped
