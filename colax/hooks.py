"""Between-steps hooks: how a method changes the training state outside the optimizer step.

A projection kind may define a classmethod `hook(cfg) -> Hook | None` (cfg: the whole config).
After optimizer step s (s = 1, 2, ...: the state after s steps), and at s = 0 before step 1, the
trainer asks `hook.due(s)` on the host and, where due, runs
`hook.apply(step, params, opt_state, key) -> (params, opt_state)`, jitted once with the state's
shardings, params and opt_state donated (`colax.trainer.Trainer`).
`step` is s as an int32 scalar, `key` is `fold_in(key(train.seed + 1), s)`. `due` must depend on
s and the config only, and whatever the hook keeps (counters, pools, sampled indices) must live in
params (frozen or integer leaves, `model.trainable_mask`) or in the optimizer state: then a run
stopped and resumed calls the hook at the same steps with the same keys on the same state.
Hooks that act at every step put their own schedule inside `apply` (e.g. `lax.cond`).

Pure helpers over pytrees; nothing here imports the rest of colax.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Hook:
    """due(s: int) -> bool (host); apply(step int32 [], params, opt_state, key) -> (params, opt_state)."""
    due: Callable
    apply: Callable


def hook_key(seed, s):
    """The PRNG key a hook gets after step s (a fresh stream, independent of the init's)."""
    return jax.random.fold_in(jax.random.key(seed + 1), s)


def param_keys(path):
    """The dict keys of a pytree path: a parameter's name, also inside an optimizer state."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def map_param_state(opt_state, fn):
    """fn(keys, leaf) -> leaf applied to every optimizer-state leaf that mirrors a parameter
    (Adam's mu and nu sit at the parameter's dict-key path `keys`); other leaves (counts) as they are."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(param_keys(path), x) if param_keys(path) else x,
                                            opt_state)


def keep_largest(x, keep):
    """x [L, ...] with all but the `keep` fraction of largest |x| of each x[l] set to zero
    (ReLoRA's magnitude pruning of optimizer state, per layer as it is per tensor in torch);
    keep = 0: all zero. The threshold is the (1 - keep) quantile (linear interpolation) of |x[l]|
    (keep = 0: the maximum, which no entry exceeds)."""
    mag = jnp.abs(x.astype(jnp.float32))
    threshold = jnp.quantile(mag.reshape(x.shape[0], -1), 1.0 - keep, axis=1)
    return jnp.where(mag > threshold.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
