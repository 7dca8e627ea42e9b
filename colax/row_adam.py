"""Adam with one step count per vector (row or column) of each parameter, and a reset of chosen vectors.

`optax.scale_by_adam` keeps one global step count, so zeroing the moments of some rows (a method's
optimizer reset) leaves their bias correction at that large count: the next updates are several
times the lr (2.5x, 4.6x, 5.2x one, five and ten steps after a reset at step 1000). With a count per
vector, `reset` zeroes the moments and the count of the chosen vectors, so their bias correction
restarts there as for a fresh Adam, the others untouched (SwitchLoRA's `StepAdamW`,
asfsdsf/SwitchLoRA@f9a174e:switchlora/optimizer.py:117-164,514-650).

Every count advances at every update, as the moments do. `reset` can also hold the chosen vectors'
gradients at zero for their next few updates (after any clipping upstream, which still sees them):
their moments stay zero, their update is zero and their count still grows, as SwitchLoRA's
`correct_switched_lora` zeroes the gradients of held vectors between clipping and `optimizer.step`.
Without resets the update equals `optax.scale_by_adam`'s (same operations in the same order).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from colax.hooks import param_keys


class ScaleByRowAdamState(NamedTuple):
    """counts: tuple of int32 arrays, one per leaf of `mu` (in `jax.tree.leaves` order), each the
    leaf's shape with its vector axis (or all axes) set to 1; holds: int32, the same shapes, the
    number of coming updates whose gradient is zeroed; mu, nu: the moments, shaped like the
    parameters, float32 (or the parameter's dtype if wider): the gradients `colax.step.grads` gives
    are float32, so bf16 moments would come back float32 from the first update (and the jitted
    step would compile again for the second). Counts and holds are tuples, not params-keyed dicts, so they sit at no parameter path
    (replicated by `colax.state`, untouched by `colax.hooks.map_param_state`)."""
    counts: tuple
    holds: tuple
    mu: optax.Updates
    nu: optax.Updates


def count_shape(shape, axis):
    """The count's shape for a leaf of `shape` whose vectors lie along `axis` (int; None: one count for
    the whole leaf): `shape` with that axis (or every axis) set to 1."""
    if axis is None:
        return (1,) * len(shape)
    axis = axis % len(shape)
    return tuple(1 if i == axis else n for i, n in enumerate(shape))


def moment_zeros(params):
    """Zeros for Adam's moments of `params`: float32, or the parameter's dtype if wider (the gradients
    `colax.step.grads` gives are float32, so bf16 moments would come back float32 from the first update)."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)


def scale_by_row_adam(b1, b2, eps, vector_axis: Callable):
    """optax GradientTransformation: Adam's scaling (as `optax.scale_by_adam(b1, b2, eps)`) with one
    step count per vector.

    vector_axis(keys) -> int | None: for a parameter at dict-key path `keys` (tuple of str), the axis
    along which one vector's entries lie, sharing a count (A [r, in]: -1, one count per row;
    B [out, r]: -2, one count per column); None: one count for the whole leaf (plain Adam).
    """

    def init(params):
        counts = tuple(jnp.zeros(count_shape(p.shape, vector_axis(param_keys(path))), jnp.int32)
                       for path, p in jax.tree_util.tree_leaves_with_path(params))
        moments = (moment_zeros(params) for _ in "mv")
        return ScaleByRowAdamState(counts, tuple(map(jnp.zeros_like, counts)), *moments)

    def update(updates, state, params=None):
        del params
        g, treedef = jax.tree.flatten(updates)
        g = [jnp.where(h > 0, jnp.zeros_like(x), x) for x, h in zip(g, state.holds)]
        counts = tuple(c + 1 for c in state.counts)
        mu = [(1 - b1) * x + b1 * m for x, m in zip(g, jax.tree.leaves(state.mu))]
        nu = [(1 - b2) * (x * x) + b2 * v for x, v in zip(g, jax.tree.leaves(state.nu))]
        step = lambda m, v, c: ((m / (1 - b1 ** c).astype(m.dtype))  # optax's bias correction, per vector
                                / (jnp.sqrt(v / (1 - b2 ** c).astype(v.dtype)) + eps))
        out = [step(m, v, c) for m, v, c in zip(mu, nu, counts)]
        unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
        holds = tuple(jnp.maximum(h - 1, 0) for h in state.holds)
        return unflatten(out), ScaleByRowAdamState(counts, holds, unflatten(mu), unflatten(nu))

    return optax.GradientTransformation(init, update)


def reset(opt_state, mask: Callable, hold=0):
    """opt_state with, in every `ScaleByRowAdamState` inside it, the moments and the step count of the
    chosen vectors zeroed (their next update is a fresh Adam's first) and their gradient zeroed in
    the next `hold` updates (int >= 0; then they start from zero moments at count `hold`).

    mask(keys) -> bool array | None: for the parameter at dict-key path `keys`, True for the vectors to
    reset, broadcastable to its count (`count_shape`: e.g. [L, r, 1] for rows of A [L, r, in],
    [L, 1, r] for columns of B [L, out, r]); None: none of that parameter's.
    """

    if find_state(opt_state) is None:
        raise ValueError("row_adam.reset: opt_state has no per-vector Adam state (optim.make(..., projection=) of a "
                         "kind with vector_steps)")

    def reset_state(s):
        if not isinstance(s, ScaleByRowAdamState):
            return s
        paths, treedef = jax.tree_util.tree_flatten_with_path(s.mu)
        masks = [mask(param_keys(path)) for path, _ in paths]
        zero = lambda x, m: x if m is None else jnp.where(m, jnp.zeros_like(x), x)
        moments = [jax.tree.unflatten(treedef, [zero(x, m) for x, m in zip(jax.tree.leaves(t), masks)])
                   for t in (s.mu, s.nu)]
        holds = tuple(h if m is None else jnp.where(m, hold, h) for h, m in zip(s.holds, masks))
        return ScaleByRowAdamState(tuple(zero(c, m) for c, m in zip(s.counts, masks)), holds, *moments)

    return jax.tree.map(reset_state, opt_state, is_leaf=lambda x: isinstance(x, ScaleByRowAdamState))


def holds(opt_state):
    """{parameter dict-key path: its holds (int32, `count_shape`)} of the first `ScaleByRowAdamState` in
    `opt_state`; {} if it has none."""
    state = find_state(opt_state)
    if state is None:
        return {}
    return {param_keys(path): h for (path, _), h in zip(jax.tree_util.tree_leaves_with_path(state.mu), state.holds)}


def find_state(opt_state):
    """The first `ScaleByRowAdamState` inside `opt_state` (an optax state of any nesting), or None."""
    is_row_adam = lambda x: isinstance(x, ScaleByRowAdamState)
    return next((s for s in jax.tree.leaves(opt_state, is_leaf=is_row_adam) if is_row_adam(s)), None)
