"""SwitchLoRA (Zhou & Wang, arXiv 2406.06564), `model.projection="switchlora"`: LoRA whose vectors
are switched, a few at a time, for candidates; the switches are the kind's hook."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colax import hooks, row_adam
from colax.errors import ConfigError
from colax.projections.common import PROJECTION_NAMES, projection_shapes
from colax.projections.lora import LoRA

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


class SwitchLoRA(LoRA):
    """SwitchLoRA (Zhou & Wang, arXiv 2406.06564): LoRA whose A rows and B columns are switched, a few
    at a time, for candidate vectors (`switchlora_switch`, the hook), the frozen W compensating.

    Layout as `LoRA` (W [out, in] frozen, A [r, in], B [out, r], scale α / r). Per projection, two
    frozen candidate pools of C = min(in, out) vectors each: `pool_a` [C, in] ~ U(±s_A) and `pool_b`
    [C, out] ~ U(±s_B) (`switch_bounds`); `pick_a`, `pick_b` int32 [r]: the pool entry each A row and
    B column holds. As in the reference code (`_init_orthogonal_lora` with `_CONTINUOUS_SWITCH`,
    asfsdsf/SwitchLoRA@f9a174e:switchlora/switch_lora.py:189-190,699-717) A row i holds entry C - r + i
    and B column i entry C - r + ((i - r/2) mod r), A and B start as those entries (B is not zero),
    and W starts as W0 - (α / r) B A (`lora_utils.layer2lora`, lora_utils.py:69-70), so the layer
    starts as x W0ᵀ with W0 ~ N(0, init_std). Pools and picks are model state: checkpointed and
    sharded with the parameters, never trained. The Adam step counts of A's rows and B's columns are
    per vector (`vector_steps`, colax.row_adam): the switch resets and holds them there.
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
        pick_a = n - rank + jnp.arange(rank, dtype=jnp.int32)
        pick_b = n - rank + (jnp.arange(rank, dtype=jnp.int32) - rank // 2) % rank
        a, b = pool_a[pick_a], pool_b[pick_b].T
        w0 = self.base[...].astype(jnp.float32)
        self.base = nnx.Param((w0 - self.scale * (b @ a)).astype(cfg.param_dtype))
        self.pool_a = nnx.Param(pool_a.astype(cfg.param_dtype))
        self.pool_b = nnx.Param(pool_b.astype(cfg.param_dtype))
        self.pick_a, self.pick_b = nnx.Param(pick_a), nnx.Param(pick_b)
        self.lora_a = nnx.Param(a.astype(cfg.param_dtype))
        self.lora_b = nnx.Param(b.astype(cfg.param_dtype))

    @staticmethod
    def param_axes(in_axis, out_axis):
        """LoRA's, with the pools' candidate axis and the picks on the rank axis."""
        return dict(LoRA.param_axes(in_axis, out_axis), pool_a=("rank", in_axis), pool_b=("rank", out_axis),
                    pick_a=("rank",), pick_b=("rank",))

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
        """The authors' recipe (asfsdsf/SwitchLoRA@f9a174e:llama/examples/basic/run_switchlora_350m.sh and
        the defaults of llama/main.py:91-97 and switchlora/switch_lora.py:47-64): alpha 1 (`ALPHA`,
        main.py:384), lr 0.02, 100 warmup steps, clipping at 1.0, no weight decay, cosine to 0
        (transformers' `get_cosine_schedule_with_warmup`), switch interval 40, rate 0.3 at 10% of the
        steps, counterparts held 5 steps; at 350m also its 40k steps of 1152 sequences of 512 tokens.
        The other sizes keep the size's steps, batch and sequence length: the authors ship no script there."""
        del paper
        cfg.model.lora_alpha = ALPHA
        cfg.optim.update(lr=0.02, warmup_steps=100, grad_clip=1.0, weight_decay=0.0, min_lr_ratio=0.0)
        if size == "350m":
            cfg.train.update(steps=40_000, batch_size=1152)
            cfg.data.seq_len = 512

    @classmethod
    def hook(cls, cfg):
        """The vector switches before every update, the first included (`due(0)`: before step 1), at
        the per-layer stochastic counts of `switch_rates` (`switchlora_switch`)."""
        m, steps = cfg.model, cfg.train.steps
        ranks = {m.ranks[n] or m.rank for n in PROJECTION_NAMES}
        rates = {r: switch_rates(r, m.switch_interval, m.switch_descent, steps) for r in ranks}
        for name, (n_in, n_out) in projection_shapes(m.hidden_size, m.intermediate_size).items():
            rank = m.ranks[name] or m.rank
            most, free = int(np.ceil(rates[rank].max(initial=0))), min(n_in, n_out) - rank
            if most > free:
                raise ConfigError(f"model.switch_interval={m.switch_interval}: up to {most} vectors of the {name} "
                                  f"projection switch in one step, more than its {free} free candidates "
                                  "(min(in, out) - rank)")
        return hooks.Hook(due=lambda s: 0 <= s < steps, apply=functools.partial(
            switchlora_switch, m.lora_alpha, m.switch_hold_steps,
            {r: jnp.asarray(t, jnp.float32) for r, t in rates.items()}))


def switch_rates(rank, interval, descent, total_steps):
    """float64 [total_steps]: entry u = rank / interval_u, the expected number of vectors of A (and
    of B) each layer switches before update u + 1 (u = 0: before the first), interval_u = interval /
    rate_u, rate_u = max((0.3^(1 / (descent · total_steps)))^(u + 1), 1e-8): the reference code's
    `_get_switch_rate` and `_get_switch_replace_num` at update_step u (switch_lora.py:239-266, called
    with global_step = update_step before every optimizer.step, llama/main.py:628-636)."""
    u = np.arange(total_steps, dtype=np.float64)
    return rank / (interval / np.maximum((0.3 ** (1 / (descent * total_steps))) ** (u + 1), 1e-8))


def draw_counts(key, rate, n_layers):
    """int32 [n_layers]: each layer's stochastic rounding of `rate` (float32 scalar), floor(rate) + 1
    with probability rate - floor(rate), else floor(rate) (switch_lora.py:263-265, one draw per layer)."""
    whole = jnp.floor(rate)
    return (whole + (jax.random.uniform(key, (n_layers,)) < rate - whole)).astype(jnp.int32)


def cursor(pick, pool_size):
    """int32 [L]: where the next switch starts (the reference's `candidate_A_index` /
    `candidate_B_index`, switch_lora.py:766-771), read off pick int32 [L, r]: the one row whose pool
    entry does not follow its predecessor's (mod pool_size). Switches take the entries after the last
    one taken, row after row, so every other row's does (the init's C - r + i: row 0; B's: row r / 2)."""
    follows = pick == (jnp.roll(pick, 1, axis=-1) + 1) % pool_size
    return jnp.argmin(follows, axis=-1).astype(jnp.int32)


def switch_vectors(vectors, pick, pool, first, count):
    """The reference code's continuous switch of count[l] vectors of layer l from row first[l] on
    (mod r) (`_select_indices` and `switch_rows`, switch_lora.py:388-425,471-475): row first + i takes
    pool entry (pick[first - 1] + 1 + i) mod C, the entries after the last one taken, and its trained
    value is written back into the entry it held ("save mat1 value to candidates").
    vectors [L, r, n], pick int32 [L, r], pool [L, C, n], first, count int32 [L].
    Returns (vectors, pick, pool, rows bool [L, r])."""
    n_layers, rank = pick.shape
    nth = (jnp.arange(rank)[None, :] - first[:, None]) % rank                      # row's place after first
    rows = nth < count[:, None]
    last = jnp.take_along_axis(pick, ((first - 1) % rank)[:, None], axis=1)
    new_pick = jnp.where(rows, (last + 1 + nth) % pool.shape[1], pick)
    new = jnp.take_along_axis(pool, new_pick[:, :, None], axis=1).astype(vectors.dtype)
    back = jnp.where(rows, pick, pool.shape[1])                                      # out of range: dropped
    pool = pool.at[jnp.arange(n_layers)[:, None], back].set(vectors.astype(pool.dtype), mode="drop")
    return jnp.where(rows[:, :, None], new, vectors), new_pick, pool, rows


def switchlora_switch(alpha, hold_steps, rates, step, params, opt_state, key):
    """SwitchLoRA's hook at step s: each layer of each projection of rank r draws its count from
    rates[r][s] (`draw_counts`, key folded with the projection's index), then `switch_layers`. The
    reference code's `switch_lora` (switch_lora.py:279-288) at update_step s, which it calls between
    the backward pass and `optimizer.step` of update s + 1, made here before that update's forward
    (s = 0: before the first). Returns (params, opt_state)."""
    counts = {}
    for i, name in enumerate(PROJECTION_NAMES):
        pick = params["blocks"][name]["pick_a"]
        table = rates[pick.shape[-1]]
        counts[name] = draw_counts(jax.random.fold_in(key, i), table[jnp.clip(step, 0, table.shape[0] - 1)],
                                   pick.shape[0])
    return switch_layers(alpha, hold_steps, counts, params, opt_state)


def switch_layers(alpha, hold_steps, counts, params, opt_state):
    """Switches counts[projection] (int32 [L]) vectors of A and of B in each layer (params: the
    model's pure dict, stacked [L]), capped as the reference's `available_num` (switch_lora.py:
    753-758): min((c_A - held A rows - c_B) mod r, (c_B - held B columns - c_A) mod r), c_A, c_B the
    cursors (`cursor`), held: with a hold left in the optimizer state (`row_adam.holds`).

    A rows switch from c_A, B columns from c_B = c_A + r/2 (`switch_vectors`; the reference's
    cursors `candidate_A_index`, `candidate_B_index` = r/2, switch_lora.py:696-699,766-771). W absorbs
    the change exactly, A first then B with the new A (switch_lora.py:390-394):
    `W += (α / r) · (B (A - A') + (B - B') A')`, in float32. The counterparts of the switched vectors
    (B column i for A row i, and the converse) get their Adam moments and step counts zeroed and their
    gradients held at zero for the next `hold_steps` updates (`row_adam.reset`; `zero_lora_states` and
    `correct_switched_lora`, switch_lora.py:386,798-867); the switched vectors keep their Adam state.
    The reference computes the gradient before the switch: the same, for every vector it trains
    (a switched vector's gradient depends on its counterpart, which the switch leaves alone or holds).
    Returns (params, opt_state).
    """
    blocks, masks, holds = dict(params["blocks"]), {}, row_adam.holds(opt_state)
    f32 = lambda x: x.astype(jnp.float32)
    held = lambda leaf, like: (jnp.sum(holds[leaf] > 0, axis=(1, 2)) if leaf in holds
                               else jnp.zeros(like.shape[0], jnp.int32))
    for name in PROJECTION_NAMES:
        p = blocks[name]
        rank, pool_size = p["lora_a"].shape[-2], p["pool_a"].shape[1]
        first_a, first_b = cursor(p["pick_a"], pool_size), cursor(p["pick_b"], pool_size)
        room = jnp.minimum((first_a - held(("blocks", name, "lora_a"), first_a) - first_b) % rank,
                           (first_b - held(("blocks", name, "lora_b"), first_b) - first_a) % rank)
        count = jnp.minimum(counts[name], room)
        a, pick_a, pool_a, rows_a = switch_vectors(p["lora_a"], p["pick_a"], p["pool_a"], first_a, count)
        b_t, pick_b, pool_b, rows_b = switch_vectors(jnp.swapaxes(p["lora_b"], 1, 2), p["pick_b"], p["pool_b"],
                                                     first_b, count)
        old_a, old_b, b = f32(p["lora_a"]), f32(p["lora_b"]), jnp.swapaxes(b_t, 1, 2)
        delta = (alpha / rank) * (jnp.einsum("lor,lri->loi", old_b, old_a - f32(a))
                                  + jnp.einsum("lor,lri->loi", old_b - f32(b), f32(a)))
        blocks[name] = dict(p, base=(f32(p["base"]) + delta).astype(p["base"].dtype), lora_a=a, lora_b=b,
                            pick_a=pick_a, pick_b=pick_b, pool_a=pool_a, pool_b=pool_b)
        masks[name, "lora_a"], masks[name, "lora_b"] = rows_b[:, :, None], rows_a[:, None, :]
    opt_state = row_adam.reset(opt_state, lambda keys: masks.get(keys[-2:]), hold_steps)
    return dict(params, blocks=blocks), opt_state
