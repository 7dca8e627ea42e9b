"""SwitchLoRA (Zhou & Wang, arXiv 2406.06564), `model.projection="switchlora"`: LoRA whose vectors
are switched, a few at a time, for candidates; the switches are the kind's hook."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colax import hooks
from colax.errors import ConfigError
from colax.projections.common import PROJECTION_NAMES, projection_shapes
from colax.projections.lora import LoRA, lora_forward

# The reference code's alpha: its candidates are not zero-initialised, so (alpha / r) B A x starts at
# about alpha / sqrt(3) times x.
ALPHA = 1.0


def switch_bounds(in_features, out_features, rank):
    """(s_A, s_B): SwitchLoRA's candidate ranges U(±s) for A [r, in] and B [out, r] (the reference
    code's `get_init_lora_bound`): std_A = (√out · r / in^1.5)^¼ · √g, std_B = (r / √(in · out))^¼ · √g
    with torch's leaky-relu gain g = √(1/3) (a = √5), s = √3 · std; then std_A² std_B² = g² r / in,
    so B A x has about the variance g² r² · var(x), and (α / r) B A x about α² g² var(x)."""
    gain = (1 / 3) ** 0.5
    std_a = (out_features ** 0.5 * rank / in_features ** 1.5) ** 0.25 * gain ** 0.5
    std_b = (rank / (in_features * out_features) ** 0.5) ** 0.25 * gain ** 0.5
    return 3 ** 0.5 * std_a, 3 ** 0.5 * std_b


def hold(x, countdown):
    """x [r, n] with the rows whose `countdown` int32 [r] is > 0 behind stop_gradient (zero gradient)."""
    return jnp.where((countdown > 0)[:, None], jax.lax.stop_gradient(x), x)


class SwitchLoRA(LoRA):
    """SwitchLoRA (Zhou & Wang, arXiv 2406.06564): LoRA whose A rows and B columns are switched, a few
    at a time, for candidate vectors (`switchlora_switch`, the hook), the frozen W compensating.

    Layout as `LoRA` (W [out, in] frozen, A [r, in], B [out, r], scale α / r). Per projection, two
    frozen candidate pools of C = min(in, out) vectors each: `pool_a` [C, in] ~ U(±s_A) and `pool_b`
    [C, out] ~ U(±s_B) (`switch_bounds`); `pick_a`, `pick_b` int32 [r]: the pool entry each A row and
    B column holds (distinct, drawn at init; A and B start as those entries, B is not zero). The
    countdowns `hold_a`, `hold_b` int32 [r] > 0 keep an A row or B column out of training (its gradient
    zero, `hold`) for that many more steps: the counterparts of switched vectors. Pools, picks and
    countdowns are model state: checkpointed and sharded with the parameters, never trained.
    """

    frozen = ("base", "pool_a", "pool_b")
    full_rank_frozen = LoRA.full_rank_frozen + ("pool_a", "pool_b")
    state_leaves = ("pool_a", "pool_b")  # model state, not parameters (`model.count_params`)
    vector_steps = {"lora_a": -1, "lora_b": -2}  # an Adam step count per row of A, per column of B (colax.row_adam)
    config = dict(
        LoRA.config,
        switch_interval=40,    # SwitchLoRA: initial steps between switches of one vector (rank / interval per step)
        switch_descent=0.1,    # SwitchLoRA: fraction of train.steps at which the switch rate is down to 0.3
        switch_hold_steps=5,   # SwitchLoRA: steps the counterparts of switched vectors stay frozen
    )

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        super().__init__(in_features, out_features, rank, cfg, rngs=rngs)
        n, (bound_a, bound_b) = min(in_features, out_features), switch_bounds(in_features, out_features, rank)
        uniform = lambda shape, bound: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        pool_a, pool_b = uniform((n, in_features), bound_a), uniform((n, out_features), bound_b)
        pick_a, pick_b = (jax.random.permutation(rngs.params(), n)[:rank].astype(jnp.int32) for _ in "ab")
        self.pool_a = nnx.Param(pool_a.astype(cfg.param_dtype))
        self.pool_b = nnx.Param(pool_b.astype(cfg.param_dtype))
        self.pick_a, self.pick_b = nnx.Param(pick_a), nnx.Param(pick_b)
        self.lora_a = nnx.Param(self.pool_a[...][pick_a])
        self.lora_b = nnx.Param(self.pool_b[...][pick_b].T)
        self.hold_a = nnx.Param(jnp.zeros((rank,), jnp.int32))
        self.hold_b = nnx.Param(jnp.zeros((rank,), jnp.int32))

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype; held vectors get no gradient."""
        a = hold(self.lora_a[...], self.hold_a[...])
        b = hold(self.lora_b[...].T, self.hold_b[...]).T
        return lora_forward(x, self.base[...], a, b, self.scale)

    @staticmethod
    def param_axes(in_axis, out_axis):
        """LoRA's, with the pools' candidate axis and the per-vector state on the rank axis."""
        return dict(LoRA.param_axes(in_axis, out_axis), pool_a=("rank", in_axis), pool_b=("rank", out_axis),
                    pick_a=("rank",), pick_b=("rank",), hold_a=("rank",), hold_b=("rank",))

    @staticmethod
    def check_config(m, require, selected):
        """LoRA's, a hold of >= 0 steps, an interval > 0 of at least two holds and a descent > 0."""
        LoRA.check_config(m, require, selected)
        require(isinstance(m.switch_hold_steps, int) and m.switch_hold_steps >= 0, "switch_hold_steps",
                "must be an integer >= 0", m.switch_hold_steps)
        require(m.switch_interval >= 2 * m.switch_hold_steps and m.switch_interval > 0, "switch_interval",
                f"must be > 0 and at least 2 * switch_hold_steps = {2 * m.switch_hold_steps} (a vector and its "
                "counterpart are never held at once)", m.switch_interval)
        require(m.switch_descent > 0, "switch_descent", "must be > 0", m.switch_descent)

    @staticmethod
    def preset(cfg, size, paper):
        """LoRA's recipe (the full-rank model's) with the reference code's alpha (`ALPHA`) and the
        switch schedule's defaults (interval 40, rate 0.3 at 10% of the steps, counterparts held 5 steps)."""
        del size, paper
        cfg.model.lora_alpha = ALPHA

    @classmethod
    def hook(cls, cfg):
        """The vector switches of `switch_schedule`, and the countdowns, after every step that has
        one or follows one by at most `model.switch_hold_steps` steps."""
        m, steps = cfg.model, cfg.train.steps
        ranks = {m.ranks[n] or m.rank for n in PROJECTION_NAMES}
        tables = {r: switch_schedule(r, m.switch_interval, m.switch_descent, steps) for r in ranks}
        for name, (n_in, n_out) in projection_shapes(m.hidden_size, m.intermediate_size).items():
            rank = m.ranks[name] or m.rank
            most, free = int(np.diff(tables[rank]).max(initial=0)), min(n_in, n_out) - rank
            if most > free:
                raise ConfigError(f"model.switch_interval={m.switch_interval}: up to {most} vectors of the {name} "
                                  f"projection switch in one step, more than its {free} free candidates "
                                  "(min(in, out) - rank)")
        last = lambda s: min(s, steps)
        due = lambda s: any(t[last(s)] > t[last(max(s - 1 - m.switch_hold_steps, 0))] for t in tables.values())
        return hooks.Hook(due=due, apply=functools.partial(
            switchlora_switch, m.lora_alpha, m.switch_hold_steps, {r: jnp.asarray(t) for r, t in tables.items()}))


def switch_schedule(rank, interval, descent, total_steps):
    """int32 [total_steps + 1]: entry s = the number of vectors of A (and of B) switched in steps
    1..s, floor(Σ_{t ≤ s} rank / interval_t), interval_t = interval / rate_t,
    rate_t = 0.3^((t + 1) / (descent · total_steps)) (the paper's schedule; its stochastic rounding
    of each step's rank / interval_t is replaced by the floor of the running sum)."""
    t = np.arange(1, total_steps + 1, dtype=np.float64)
    per_step = rank / interval * 0.3 ** ((t + 1) / (descent * total_steps))
    return np.floor(np.concatenate([[0.0], np.cumsum(per_step)]) + 1e-9).astype(np.int32)


def window(lo, hi, rank, offset):
    """bool [rank]: the vectors lo + offset, ..., hi - 1 + offset (mod rank) (int32 scalars lo <= hi)."""
    return (jnp.arange(rank) - lo - offset) % rank < hi - lo


def switch_vectors(key, vectors, pick, pool, rows):
    """vectors [L, r, n] with each row in `rows` bool [r] replaced by a pool entry that no vector of
    its layer holds (drawn uniformly, distinct); pick int32 [L, r], pool [L, C, n].
    Returns (vectors, pick)."""
    n_layers, rank = pick.shape
    held = jnp.any(pick[:, :, None] == jnp.arange(pool.shape[1]), axis=1)           # [L, C]
    score = jnp.where(held, -1.0, jax.random.uniform(key, held.shape))
    order = jnp.argsort(-score, axis=1).astype(jnp.int32)                            # free entries first
    nth = jnp.cumsum(rows) - 1                                                       # row's place among rows
    new_pick = jnp.where(rows, order[:, jnp.clip(nth, 0)], pick)
    new = jnp.take_along_axis(pool, new_pick[:, :, None], axis=1).astype(vectors.dtype)
    return jnp.where(rows[:, None], new, vectors), new_pick


def switchlora_switch(alpha, hold_steps, tables, step, params, opt_state, key):
    """SwitchLoRA's step-s hook over every projection (params: the model's pure dict, stacked [L]).

    Each projection of rank r switches the A rows lo..hi-1 and the B columns lo + r/2..hi-1 + r/2
    (mod r), with lo, hi = tables[r][s - 1], tables[r][s] (`switch_schedule`: a cursor cycling through
    the vectors, B's half a turn ahead, as in the reference code). W absorbs the change exactly:
    `W += (α / r) · (B A - B' A')` = `(α / r) · (B (A - A') + (B - B') A')`, in float32. Countdowns
    drop by one; the counterparts of the switched vectors (B column i for A row i, and the converse)
    are held `hold_steps` steps. The Adam moments of the switched vectors and of their counterparts
    are zeroed (so a held vector's update is zero, not just its gradient). Returns (params, opt_state).
    """
    blocks, reset = dict(params["blocks"]), {}
    for i, name in enumerate(PROJECTION_NAMES):
        p = blocks[name]
        rank = p["lora_a"].shape[-2]
        table = tables[rank]
        lo, hi = table[jnp.clip(step - 1, 0, table.shape[0] - 1)], table[jnp.clip(step, 0, table.shape[0] - 1)]
        rows_a, rows_b = window(lo, hi, rank, 0), window(lo, hi, rank, rank // 2)
        key_a, key_b = jax.random.split(jax.random.fold_in(key, i))
        a, pick_a = switch_vectors(key_a, p["lora_a"], p["pick_a"], p["pool_a"], rows_a)
        b_t, pick_b = switch_vectors(key_b, jnp.swapaxes(p["lora_b"], 1, 2), p["pick_b"], p["pool_b"], rows_b)
        f32 = lambda x: x.astype(jnp.float32)
        old_a, old_b, b = f32(p["lora_a"]), f32(p["lora_b"]), jnp.swapaxes(b_t, 1, 2)
        delta = (alpha / rank) * (jnp.einsum("lor,lri->loi", old_b, old_a - f32(a))
                                  + jnp.einsum("lor,lri->loi", old_b - f32(b), f32(a)))
        countdown = lambda c, counterpart_switched: jnp.where(counterpart_switched, hold_steps, jnp.maximum(c - 1, 0))
        blocks[name] = dict(p, base=(f32(p["base"]) + delta).astype(p["base"].dtype), lora_a=a, lora_b=b,
                            pick_a=pick_a, pick_b=pick_b, hold_a=countdown(p["hold_a"], rows_b),
                            hold_b=countdown(p["hold_b"], rows_a))
        reset[name] = rows_a | rows_b
    zero = {"lora_a": lambda x, m: jnp.where(m[:, None], 0, x), "lora_b": lambda x, m: jnp.where(m[None, :], 0, x)}
    clear = lambda keys, x: zero[keys[-1]](x, reset[keys[-2]]) if keys[-1] in zero and keys[-2] in reset else x
    return dict(params, blocks=blocks), hooks.map_param_state(opt_state, clear)
