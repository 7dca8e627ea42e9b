"""Learning-rate schedules by name (`optim.schedule`), as functions of an optimizer's step count.

A schedule maps the count c of updates its optimizer has applied (int32 scalar, 0 for the first
update) to the learning rate of update c + 1. `"cosine"`: linear warmup from 0 to the peak, then
cosine decay to `min_lr_ratio * peak` at the last step. `"jagged_cosine"` (ReLoRA's
`cosine_restarts`, Guitaricet/relora `peft_pretraining/training_utils.py`): the same cosine, but at
each restart (counts restart_every, 2 restart_every, ...) the lr drops to 0 and rises linearly over
`restart_warmup_steps` back onto the cosine. With a full-rank warm start (`optim.full_rank_steps`)
each phase has its own optimizer and schedule, counted from the phase's first step
(`colax.optim.schedule`). ReLoRA's merges follow the update at each restart (`is_merge`).
"""

import jax.numpy as jnp
import optax

NAMES = ("cosine", "jagged_cosine")


def cosine(peak, warmup_steps, total_steps, min_lr_ratio):
    """Linear warmup 0 -> peak over warmup_steps, then cosine to min_lr_ratio * peak at total_steps."""
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
                                              decay_steps=total_steps, end_value=peak * min_lr_ratio)


def jagged_cosine(base, restart_every, restart_warmup_steps):
    """`base` (a schedule) with restarts at counts restart_every, 2 restart_every, ...: lr 0 at the
    restart, then linear over restart_warmup_steps back onto base (reaching base(restart + warmup))."""

    def schedule(count):
        last = count // restart_every * restart_every
        rewarming = (count >= restart_every) & (count - last < restart_warmup_steps)
        return jnp.where(rewarming, (count - last) / restart_warmup_steps * base(last + restart_warmup_steps),
                         base(count))

    return schedule


def is_merge(o, s):
    """Whether ReLoRA merges after optimizer step s (a Python int) of the run: the update at each
    restart of the low-rank phase's jagged cosine, the one with lr 0, comes first (official
    torchrun_main.py: `(update_step - scheduler_start_step) % relora == 1`, from the second cycle on)."""
    k = s - o.full_rank_steps
    return o.schedule == "jagged_cosine" and o.restart_every > 0 and k >= o.restart_every and k % o.restart_every == 1
