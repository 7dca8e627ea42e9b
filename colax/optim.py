"""The optimizer: AdamW, GaLore or Fira (`optim.name`), with global-norm clipping, decoupled weight
decay and a named lr schedule (`optim.schedule`, `colax.schedules`; optax).

GaLore and Fira (`colax.galore`) project the gradients of the decoder blocks' projection weights
whose both sides exceed `optim.rank`; every other parameter (embeddings, lm_head, norms, and with a
CoLA model the factors with a side <= rank) gets the reference code's Adam
(`galore.scale_by_reference_adam`) with the same lr and weight decay.
"""

import functools

import jax
import ml_collections
import optax
from flax import nnx

from colax import galore, projections, row_adam
from colax.projections.common import PROJECTION_NAMES
from colax import model as model_lib
from colax import schedules
from colax.errors import ConfigError

NAMES = ("adamw", "galore", "fira")


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
        name="adamw",         # adamw | galore | fira
        rank=128,             # galore/fira: projection rank r
        update_proj_gap=200,  # galore/fira: steps T between SVD refreshes of the projectors
        scale=0.25,           # galore/fira: factor on the back-projected low-rank step
        schedule="cosine",    # a name in colax.schedules.NAMES: "cosine" or "jagged_cosine" (ReLoRA)
        restart_every=0,      # jagged_cosine: steps between restarts (ReLoRA merges after the update at each)
        restart_warmup_steps=0,  # jagged_cosine: linear re-warmup from 0 after each restart
        restart_keep=0.0,     # at a merge, fraction of the reset optimizer state kept (largest |.|); 0: all reset
        full_rank_steps=0,    # full-rank warm start: steps training a low-rank kind's full weight first
        full_rank_lr=0.0,     # full-rank warm start: its peak lr (0: lr)
        full_rank_warmup_steps=0,  # full-rank warm start: its warmup (its cosine runs to train.steps)
    ))


def validate(o, total_steps):
    """Raises ConfigError naming the first bad field of the `config.optim` section `o`."""
    low_rank_steps = total_steps - o.full_rank_steps
    checks = [("lr", o.lr > 0, "must be > 0"), ("warmup_steps", 0 <= o.warmup_steps < low_rank_steps,
              f"must be in [0, train.steps - full_rank_steps={low_rank_steps})"),
              ("min_lr_ratio", 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
              ("b1", 0 <= o.b1 < 1, "must be in [0, 1)"), ("b2", 0 <= o.b2 < 1, "must be in [0, 1)"),
              ("eps", o.eps > 0, "must be > 0"), ("weight_decay", o.weight_decay >= 0, "must be >= 0"),
              ("grad_clip", o.grad_clip >= 0, "must be >= 0"),
              ("name", o.name in NAMES, f"must be one of {', '.join(NAMES)}"),
              ("rank", isinstance(o.rank, int) and o.rank > 0, "must be a positive integer"),
              ("update_proj_gap", isinstance(o.update_proj_gap, int) and o.update_proj_gap > 0,
               "must be a positive integer"),
              ("scale", o.scale > 0, "must be > 0"),
              ("schedule", o.schedule in schedules.NAMES, f"must be one of {', '.join(schedules.NAMES)}"),
              ("full_rank_steps", isinstance(o.full_rank_steps, int) and 0 <= o.full_rank_steps < total_steps,
               f"must be an integer in [0, train.steps={total_steps})"),
              ("restart_every", isinstance(o.restart_every, int) and o.restart_every >= 0, "must be an integer >= 0"),
              ("restart_every", o.schedule != "jagged_cosine" or o.restart_every > 0,
               "must be > 0 for the jagged_cosine schedule"),
              ("restart_warmup_steps", isinstance(o.restart_warmup_steps, int) and (
                  o.schedule != "jagged_cosine" or 0 < o.restart_warmup_steps <= o.restart_every),
               "must be an integer in [1, restart_every] for the jagged_cosine schedule"),
              ("restart_keep", 0 <= o.restart_keep < 1, "must be in [0, 1)"),
              ("full_rank_lr", o.full_rank_lr >= 0, "must be >= 0 (0: lr)"),
              ("full_rank_warmup_steps", isinstance(o.full_rank_warmup_steps, int)
               and 0 <= o.full_rank_warmup_steps < total_steps,
               f"must be an integer in [0, train.steps={total_steps})")]
    for field, ok, msg in checks:
        if not ok:
            raise ConfigError(f"optim.{field} {msg}, got {o[field]!r}")


def schedule(o, total_steps, full_rank=False):
    """The lr schedule of a phase's optimizer, of its own step count (`colax.schedules`).

    `full_rank`: the full-rank warm start's (`full_rank_steps`): a cosine with its own peak and warmup
    (`full_rank_lr`, `full_rank_warmup_steps`) to train.steps, ReLoRA's warm-start run stopped early.
    Else the low-rank phase's (the whole run without a warm start), which starts afresh after the
    warm start as ReLoRA's `--warmed_up_model` run does: the schedule named by `o.schedule` over the
    remaining total_steps - full_rank_steps, with warmup `warmup_steps` from 0.
    """
    if full_rank:
        return schedules.cosine(o.full_rank_lr or o.lr, o.full_rank_warmup_steps, total_steps, o.min_lr_ratio)
    base = schedules.cosine(o.lr, o.warmup_steps, total_steps - o.full_rank_steps, o.min_lr_ratio)
    if o.schedule == "cosine":
        return base
    return schedules.jagged_cosine(base, o.restart_every, o.restart_warmup_steps)


def lr(o, total_steps, count):
    """The lr of update count + 1 of the run (count: a Python int, updates applied): the warm
    start's schedule before `full_rank_steps`, then the low-rank phase's, counted from the switch."""
    if count < o.full_rank_steps:
        return float(schedule(o, total_steps, full_rank=True)(count))
    return float(schedule(o, total_steps)(count - o.full_rank_steps))


def decay_mask(params):
    """True for the parameters weight decay applies to: all, or all but the RMSNorm weights.

    params: the model's pure-dict state; RMSNorm weights are the leaves named "weight".
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "weight", params)


def projected(params, rank):
    """True for the parameters GaLore/Fira project: decoder-block projection weights [L, m, n]
    with min(m, n) > rank. params: a pure dict of arrays (or ShapeDtypeStructs, MaskedNodes)."""
    def is_projected(path, p):
        keys = tuple(k.key for k in path)
        return (len(keys) == 3 and keys[0] == "blocks" and keys[1] in PROJECTION_NAMES
                and p.ndim == 3 and min(p.shape[-2:]) > rank)

    return jax.tree_util.tree_map_with_path(is_projected, params)


def check_model(o, spec):
    """ConfigError unless GaLore/Fira's `optim.rank` leaves some projection weight of `spec` to project."""
    if o.name == "adamw":
        return
    params = nnx.to_pure_dict(nnx.state(model_lib.abstract_model(spec)))
    if not any(jax.tree.leaves(projected(params, o.rank))):
        sides = {"/".join(k.key for k in path): p.shape[-2:] for path, p in jax.tree_util.tree_leaves_with_path(
            params) if path[0].key == "blocks" and path[1].key in PROJECTION_NAMES}
        name, shape = max(sides.items(), key=lambda kv: min(kv[1]))
        raise ConfigError(f"optim.rank={o.rank} must be smaller than the smaller side of a projection weight "
                          f"(largest: {name} {list(shape)})")


def vector_steps(projection) -> dict:
    """{leaf name: axis} of the decoder-block parameters for which the projection kind `projection` (a
    `projections.PROJECTIONS` name; None: none) asks for an Adam step count per vector (its
    `vector_steps`: SwitchLoRA, whose switches reset vectors); {} for every other kind."""
    return getattr(projections.PROJECTIONS[projection], "vector_steps", {}) if projection else {}


def scale_by_adam(b1, b2, eps, vector_steps=None):
    """Adam's scaling, moments float32 from init (or the parameter's dtype if wider: `step.grads`' gradients
    are float32, so a pure-bf16 run's moments keep their dtype and the jitted step compiles once).
    `vector_steps` ({leaf name: axis}, `vector_steps(projection)`) naming some leaf: one step count per
    vector of those leaves in a decoder block (`row_adam.scale_by_row_adam`, the state a kind's reset
    needs); else `optax.scale_by_adam`, its state optax's own."""
    if not vector_steps:
        adam = optax.scale_by_adam(b1, b2, eps)
        return optax.GradientTransformation(lambda params: adam.init(row_adam.moment_zeros(params)), adam.update)

    def vector_axis(keys):
        in_block = len(keys) == 3 and keys[0] in ("blocks", "first_block")
        return vector_steps.get(keys[-1]) if in_block else None

    return row_adam.scale_by_row_adam(b1, b2, eps, vector_axis)


def scale_by_learning_rate_then_decay(lr_schedule, weight_decay, mask=None):
    """`optax.scale_by_learning_rate(lr_schedule)` (its state), then the GaLore/Fira reference AdamW's
    decoupled weight decay of the already stepped weight (galore_torch/adamw.py:129-140): the update
    u = -lr d becomes (p + u)(1 - lr wd) - p, for the leaves where `mask(params)` is True (all if None)."""
    inner = optax.scale_by_learning_rate(lr_schedule)

    def update(updates, state, params):
        lr = lr_schedule(state.count)
        updates, state = inner.update(updates, state, params)
        on = jax.tree.map(lambda _: True, params) if mask is None else mask(params)
        decay = lambda u, p, m: (u - lr * weight_decay * (p + u)).astype(u.dtype) if m else u
        return jax.tree.map(decay, updates, params, on), state

    return optax.GradientTransformation(inner.init, update)


def make(o, total_steps, full_rank=False, projection=None):
    """optax transformation: clip_by_global_norm (if grad_clip > 0), then AdamW (`scale_by_adam`: with a
    step count per vector where the run's projection kind `projection` asks for one, `vector_steps`;
    else optax's), or GaLore/Fira on the `projected` weights and the reference's Adam on the rest, with
    decoupled weight decay on the schedule: AdamW's `optax.adamw`'s (-lr · wd · p of the p before the
    step, as torch's AdamW), GaLore/Fira's their reference's (of the stepped p,
    `scale_by_learning_rate_then_decay`); over the trainable parameters only
    (`model.trainable_mask(params, full_rank)`): frozen ones get no optimizer state and a zero update.
    `full_rank`: the optimizer of the full-rank warm start (`optim.full_rank_steps`)."""
    adam = scale_by_adam(o.b1, o.b2, o.eps, vector_steps(projection))
    mask = None if o.decay_norms else decay_mask
    lr = schedule(o, total_steps, full_rank)
    # optax.adamw is this chain with optax's scale_by_adam first.
    tail = (optax.add_decayed_weights(o.weight_decay, mask), optax.scale_by_learning_rate(lr))
    if o.name != "adamw":  # the reference AdamW's two parameter groups: projected, and the rest
        low_rank = galore.scale_by_galore(o.rank, o.update_proj_gap, o.scale, o.b1, o.b2, o.eps, fira=o.name == "fira")
        is_projected = lambda params: projected(params, o.rank)
        adam = optax.chain(optax.masked(low_rank, is_projected),
                           optax.masked(galore.scale_by_reference_adam(o.b1, o.b2, o.eps),
                                        lambda params: jax.tree.map(lambda x: not x, is_projected(params))))
        # identity() holds add_decayed_weights' (empty) state: the state's structure, and checkpoints, stay
        tail = (optax.identity(), scale_by_learning_rate_then_decay(lr, o.weight_decay, mask))
    tx = optax.chain(adam, *tail)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx
    return optax.masked(tx, functools.partial(model_lib.trainable_mask, full_rank=full_rank))
