"""The model's training state on a mesh: parameter placement, sharded init and restore targets, the jitted step.

Every parameter gets logical axes from its dict-key path (`param_axes_table()`, built from each
projection kind's `param_axes`); `colax.sharding.RULES` maps them to mesh axes. Optimizer-state
leaves that mirror a parameter (Adam's mu and nu) sit at the same dict-key path and go where it
goes; leaves that do not (GaLore's projectors, r-dim moments) sit one `STATE_LAYOUTS` key deeper,
which derives their axes from the parameter's. `init_state` creates parameters already sharded; `abstract_state` gives restore targets.
"""

import functools
import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from colax import model as model_lib
from colax import projections, sharding
from colax.errors import ConfigError
from colax.sharding import logical_spec, on_mesh

# (in, out) logical axes of each projection; each projection kind maps them to its parameters'
# axes (`param_axes` of the classes in colax.projections.PROJECTIONS: CoLA A (in, rank), B (rank, out)).
PROJECTION_AXES = {"q": ("embed", "heads"), "k": ("embed", "heads"), "v": ("embed", "heads"),
                   "o": ("heads", "embed"), "gate": ("embed", "mlp"), "up": ("embed", "mlp"),
                   "down": ("mlp", "embed")}

@functools.cache
def param_axes_table():
    """{parameter dict-key path: logical axes} for every parameter of every projection kind.

    The stacked blocks' parameters lead with "layers"; a cross-layer kind's block 1 ("first_block",
    its `first_layer` projections) has no such axis.
    """
    table = {("embed",): ("vocab", "embed"), ("lm_head",): ("embed", "vocab"), ("final_norm", "weight"): ("norm",)}
    for norm in ("attn_norm", "mlp_norm"):
        table["blocks", norm, "weight"] = ("layers", "norm")
        table["first_block", norm, "weight"] = ("norm",)
    for kind in projections.PROJECTIONS.values():
        for name, (fan_in, fan_out) in PROJECTION_AXES.items():
            for leaf, axes in kind.param_axes(fan_in, fan_out).items():
                table["blocks", name, leaf] = ("layers", *axes)
            for leaf, axes in getattr(kind, "first_layer", kind).param_axes(fan_in, fan_out).items():
                table["first_block", name, leaf] = axes
    return table



# Optimizer-state leaves that do not mirror their parameter sit at its dict-key path under one more
# dict key naming their layout; their logical axes come from the parameter's (colax.galore):
# the rank r in place of the matrix's rows or columns, or the matrix axes dropped (one per matrix).
STATE_LAYOUTS = {"rank_rows": lambda axes: (*axes[:-2], "opt_rank", axes[-1]),
                 "rank_cols": lambda axes: (*axes[:-1], "opt_rank"),
                 "per_matrix": lambda axes: axes[:-2]}


def param_logical_axes(path):
    """Logical axes of a parameter, or of an optimizer-state leaf that mirrors one (Adam mu, nu).

    Such leaves sit at the parameter's dict-key path inside the optimizer's (named) tuples, so
    the dict keys alone name the parameter. A last key in `STATE_LAYOUTS` derives the leaf's axes
    from the parameter's. Leaves with no dict key (step counts) get ().
    """
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if keys and keys[-1] in STATE_LAYOUTS:
        return STATE_LAYOUTS[keys[-1]](param_logical_axes(path[:-1]))
    if not keys:
        return ()
    table = param_axes_table()
    if keys not in table:
        raise ValueError(f"no logical axes for parameter {'/'.join(map(str, keys))}: give its projection kind "
                         "a param_axes or add it to param_axes_table")
    return table[keys]


def param_sharding(path, leaf, mesh):
    """Where a parameter (or an optimizer-state leaf shaped like one) lives, by `RULES`."""
    del leaf
    return NamedSharding(mesh, logical_spec(param_logical_axes(path)))


def tree_shardings(tree, mesh):
    """Shardings for a pytree of parameters / optimizer state, leaf by leaf from its path."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: param_sharding(path, leaf, mesh), tree)



def validate(spec, mesh, batch_size=None):
    """ConfigError unless `spec` (and a global batch of `batch_size` rows) splits evenly on `mesh`."""
    sizes = dict(mesh.shape)
    if spec.num_heads % sizes["tensor"]:
        raise ConfigError(f"mesh.tensor={sizes['tensor']} must divide model.num_heads={spec.num_heads}")
    params = nnx.to_pure_dict(nnx.state(model_lib.abstract_model(spec)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        for dim, (n, axes) in enumerate(zip(leaf.shape, logical_spec(param_logical_axes(path)))):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            if n % math.prod(sizes[a] for a in axes):
                name = "/".join(k.key for k in path)
                raise ConfigError(f"mesh: {name} dimension {dim} (size {n}) is not divisible by "
                                  f"{'*'.join(f'{a}={sizes[a]}' for a in axes)}")
    shards = sizes["data"] * sizes["fsdp"]
    if batch_size is not None and batch_size % shards:
        raise ConfigError(f"train batch of {batch_size} rows is not divisible by mesh data*fsdp={shards}")


def _init_fn(spec, tx, seed):
    def init():
        params = nnx.to_pure_dict(nnx.state(model_lib.Transformer(spec, rngs=nnx.Rngs(seed))))
        return params, tx.init(params)

    return init


def abstract_state(spec, tx, mesh):
    """(params, opt_state) as ShapeDtypeStructs carrying their shardings on `mesh` (restore targets)."""
    shapes = jax.eval_shape(_init_fn(spec, tx, 0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, tree_shardings(shapes, mesh))


def init_state(spec, tx, mesh, seed):
    """(graphdef, params, opt_state), created on the mesh already sharded (never on one device)."""
    validate(spec, mesh)
    graphdef = nnx.graphdef(model_lib.abstract_model(spec))
    shardings = jax.tree.map(lambda s: s.sharding, abstract_state(spec, tx, mesh))
    params, opt_state = jax.jit(_init_fn(spec, tx, seed), out_shardings=shardings)()
    return graphdef, params, opt_state


def jit_hook(apply, params, opt_state, mesh):
    """A between-steps hook `apply(step, params, opt_state, key) -> (params, opt_state)` (`colax.hooks`)
    jitted on `mesh`: the state keeps its shardings, params and opt_state are donated."""
    state_shardings = tree_shardings((params, opt_state), mesh)
    replicated = NamedSharding(mesh, P())
    return jax.jit(on_mesh(apply, mesh), donate_argnums=(1, 2), in_shardings=(replicated, *state_shardings, replicated),
                   out_shardings=state_shardings)


def jit_train_step(train_step, params, opt_state, mesh, rng=False):
    """`train_step` jitted on `mesh` with explicit in/out shardings; params and opt_state donated.
    `rng`: it takes a PRNG key (replicated) after the batches (`step.make_train_step`)."""
    state_shardings = tree_shardings((params, opt_state), mesh)
    replicated = NamedSharding(mesh, P())
    return jax.jit(on_mesh(train_step, mesh), donate_argnums=(0, 1),
                   in_shardings=(*state_shardings, sharding.batch_sharding(mesh)) + (replicated,) * rng,
                   out_shardings=(*state_shardings, replicated))
