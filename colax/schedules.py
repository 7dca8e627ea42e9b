"""Learning-rate schedules by name (`optim.schedule`), as functions of the optimizer step count.

A schedule maps the count c of updates already applied (int32 scalar, 0 for the first update) to
the learning rate of update c + 1. `"cosine"`: linear warmup from 0 to the peak, then cosine decay
to `min_lr_ratio * peak` at the last step. `"jagged_cosine"` (ReLoRA): the same global cosine, but
at each restart step r the lr drops to 0 and rises linearly over `restart_warmup_steps` back onto
the global cosine (reaching `cosine(r + restart_warmup_steps)`); restarts are at the end of the
full-rank warm start (`full_rank_steps`, if any) and every `restart_every` steps after it (after
step 0 without a warm start). Methods that change the model at restarts (ReLoRA's merge) ask
`is_restart` on the host.
"""

import jax.numpy as jnp
import optax

NAMES = ("cosine", "jagged_cosine")


def cosine(peak, warmup_steps, total_steps, min_lr_ratio):
    """Linear warmup 0 -> peak over warmup_steps, then cosine to min_lr_ratio * peak at total_steps."""
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
                                              decay_steps=total_steps, end_value=peak * min_lr_ratio)


def first_restart(full_rank_steps, restart_every):
    """The first restart step: the end of the warm start, else restart_every (0: no restarts)."""
    return full_rank_steps or restart_every


def is_restart(o, s):
    """Whether the state after s optimizer steps (a Python int) is at a restart of `o.schedule`."""
    first = first_restart(o.full_rank_steps, o.restart_every)
    if o.schedule != "jagged_cosine" or not first or s < first:
        return False
    return s == first if not o.restart_every else (s - first) % o.restart_every == 0


def jagged_cosine(base, full_rank_steps, restart_every, restart_warmup_steps):
    """`base` (a schedule) with a linear re-warmup from 0 after each restart, back onto `base`."""
    first = first_restart(full_rank_steps, restart_every)

    def schedule(count):
        since = jnp.maximum(count - first, 0)
        last = first + (since // restart_every * restart_every if restart_every else 0)
        rewarming = (count >= first) & (count - last < restart_warmup_steps)
        return jnp.where(rewarming, (count - last) / restart_warmup_steps * base(last + restart_warmup_steps),
                         base(count))

    return schedule if first else base

