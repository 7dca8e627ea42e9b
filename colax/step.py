"""The loss and the training step: pure functions over `nnx.split` state, for plain `jax.jit`.

A batch is a dict of int32/float32 arrays [B, T]: "inputs", "targets", "loss_mask", and optionally
"positions" and "segment_ids" (packed rows). The training step takes a stack of micro-batches,
[A, B, T] each, and accumulates gradients over A before one optimizer update.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from colax import model as model_lib


def loss_sums(params, graphdef, batch, key=None):
    """Summed token cross-entropy and the number of counted tokens (both float32 scalars); `key`:
    the PRNG key of a training forward pass with dropout (`model.uses_rng`), None: deterministic."""
    model = nnx.merge(graphdef, params)
    mask = batch["loss_mask"].astype(jnp.float32)
    total = model.loss(batch["inputs"], batch["targets"], mask, batch.get("positions"), batch.get("segment_ids"),
                       key=key)
    return total, mask.sum()


def _split(params, full_rank):
    """(trainable, frozen) copies of `params`, each with None where the other has a leaf."""
    mask = model_lib.trainable_mask(params, full_rank)
    pick = lambda keep: jax.tree.map(lambda p, m: p if m == keep else None, params, mask)
    return pick(True), pick(False)


def _join(trainable, frozen):
    """The inverse of `_split`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def grads(params, graphdef, batches, full_rank=False, key=None):
    """Token-weighted mean loss and its gradient over micro-batches stacked on axis 0.

    Only trainable parameters (`model.trainable_mask(params, full_rank)`) are differentiated, and
    their gradients are float32 whatever the parameters' dtype (summed, then divided by the float32
    token count); the gradient of a frozen one is zeros of its shape and dtype. `key`: dropout's PRNG key (micro-batch
    i gets `fold_in(key, i)`), None: none.
    """
    trainable, frozen = _split(params, full_rank)
    grad_fn = jax.value_and_grad(lambda t, graphdef, batch, key: loss_sums(_join(t, frozen), graphdef, batch, key),
                                 has_aux=True)
    n_micro = jax.tree.leaves(batches)[0].shape[0]
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n_micro))

    def micro(carry, batch_key):
        g_sum, loss_sum, count = carry
        (loss, n), g = grad_fn(trainable, graphdef, *batch_key)
        return (jax.tree.map(jnp.add, g_sum, g), loss_sum + loss, count + n), None

    if n_micro == 1:  # no accumulation loop to compile
        (loss_sum, count), g_sum = grad_fn(trainable, graphdef, *jax.tree.map(lambda x: x[0], (batches, keys)))
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        (g_sum, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batches, keys))
    count = jnp.maximum(count, 1.0)
    g = jax.tree.map(lambda g: g / count, g_sum)
    return loss_sum / count, _join(g, jax.tree.map(jnp.zeros_like, frozen))


def all_finite(tree):
    """True (bool scalar) if every element of every array of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef, tx, skip_nonfinite=False, full_rank=False):
    """Returns train_step(params, opt_state, batches[, key]) -> (params, opt_state, metrics).

    metrics: float32 scalars "loss", "grad_norm" and "finite" (1.0 if the loss, the gradient norm
    and the updated parameters are all finite, else 0.0). With `skip_nonfinite`, a step that is
    not finite leaves params and opt_state unchanged. `full_rank`: a step of the full-rank warm start
    (`grads`; `tx` must be `optim.make(..., full_rank=True)`). `key`: dropout's PRNG key
    (`model.uses_rng`), None: no dropout.
    """

    def train_step(params, opt_state, batches, key=None):
        loss, g = grads(params, graphdef, batches, full_rank, key)
        grad_norm = optax.tree.norm(g)
        updates, new_opt_state = tx.update(g, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(ok, new, old)
            new_params, new_opt_state = jax.tree.map(keep, (new_params, new_opt_state), (params, opt_state))
        return new_params, new_opt_state, dict(loss=loss, grad_norm=grad_norm, finite=ok.astype(jnp.float32))

    return train_step


def eval_sums(params, graphdef, batches):
    """Summed token cross-entropy and token count over micro-batches stacked on axis 0 [A, B, T]."""
    sums = jax.lax.map(lambda batch: loss_sums(params, graphdef, batch), batches)
    return jax.tree.map(jnp.sum, sums)
