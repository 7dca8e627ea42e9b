"""The optimizer: AdamW with global-norm clipping and a linear-warmup + cosine schedule (optax)."""

import jax
import ml_collections
import optax

from colax import model as model_lib
from colax.errors import ConfigError


def defaults():
    """The `config.optim` section, with the paper's AdamW settings (60M CoLA peak lr)."""
    return ml_collections.ConfigDict(dict(
        lr=0.006,             # peak learning rate
        warmup_steps=2000,    # linear warmup from 0 to lr
        min_lr_ratio=0.1,     # cosine decay to min_lr_ratio * lr at train.steps
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        decay_norms=True,     # decay RMSNorm weights too (as the reference's torch AdamW does)
        grad_clip=0.5,        # global-norm clipping threshold (0: off)
    ))


def validate(o, total_steps):
    """Raises ConfigError naming the first bad field of the `config.optim` section `o`."""
    checks = [("lr", o.lr > 0, "must be > 0"), ("warmup_steps", 0 <= o.warmup_steps < total_steps,
              f"must be in [0, train.steps={total_steps})"),
              ("min_lr_ratio", 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
              ("b1", 0 <= o.b1 < 1, "must be in [0, 1)"), ("b2", 0 <= o.b2 < 1, "must be in [0, 1)"),
              ("eps", o.eps > 0, "must be > 0"), ("weight_decay", o.weight_decay >= 0, "must be >= 0"),
              ("grad_clip", o.grad_clip >= 0, "must be >= 0")]
    for field, ok, msg in checks:
        if not ok:
            raise ConfigError(f"optim.{field} {msg}, got {o[field]!r}")


def schedule(o, total_steps):
    """Learning rate at each step: 0 -> o.lr linearly over warmup, then cosine to min_lr_ratio * lr."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps, decay_steps=total_steps,
        end_value=o.lr * o.min_lr_ratio)


def decay_mask(params):
    """True for the parameters weight decay applies to: all, or all but the RMSNorm weights.

    params: the model's pure-dict state; RMSNorm weights are the leaves named "weight".
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "weight", params)


def make(o, total_steps):
    """optax transformation: clip_by_global_norm (if grad_clip > 0) then AdamW on the schedule,
    over the trainable parameters only (`model.trainable_mask`): frozen ones get no optimizer
    state and a zero update."""
    adamw = optax.adamw(schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, mask=None if o.decay_norms else decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
    return optax.masked(tx, model_lib.trainable_mask)
