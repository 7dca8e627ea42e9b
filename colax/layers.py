"""LLaMA building blocks: RMSNorm, RoPE, projections (full-rank and CoLA), attention, MLP, block.

Shapes: B batch, T sequence, D hidden size, N heads, H head size (D = N * H), F intermediate size,
R rank. Activations are in the compute dtype (`cfg.dtype`); parameters in `cfg.param_dtype`.

A projection kind is one class in `PROJECTIONS`: it maps [..., in] -> [..., out], takes
`(in_features, out_features, rank, cfg, rngs)`, states its forward FLOPs per token and the logical
axes of its parameters (for sharding). Adding a new low-rank method means adding one class here
and a config that names it.

A cross-layer kind (one with a `first_layer` attribute, e.g. CR-Net) also reads the same
projection's output in the previous block: the first block uses `first_layer` (another kind) in
its place, every later block calls `projection(x, prev)`, and `Block` passes the seven outputs on
to the next block as its carry.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from colax import hooks, kernels, schedules, sharding
from colax.errors import ConfigError

# The seven projections of a decoder block, in the order the paper lists them.
PROJECTION_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def projection_shapes(d, f):
    """{name: (in, out)} of the seven projections for hidden size d and intermediate size f."""
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def _normal(std):
    return nnx.initializers.normal(stddev=std)


class Dense(nnx.Module):
    """Full-rank projection `y = x @ W`, W [in, out] ~ N(0, cfg.init_std), no bias."""

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        del rank
        self.w = nnx.Param(_normal(cfg.init_std)(rngs.params(), (in_features, out_features), cfg.param_dtype))

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return x @ self.w[...].astype(x.dtype)

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        return 2 * in_features * out_features

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding."""
        return {"w": (in_axis, out_axis)}


class CoLA(nnx.Module):
    """CoLA auto-encoder projection `y = silu(x @ A) @ B`, A [in, r], B [r, out], no bias.

    A and B are i.i.d. N(0, std) with std = (r * (in + out)) ** -0.25. The r-wide pre-activation
    `z = x @ A` and `h = silu(z)` are tagged "cola_z" and "cola_h" for the CoLA-M remat policies
    (the Pallas kernel, `cfg.kernel="pallas"`, fuses silu(z) @ B, so it has no h to tag).
    On a mesh z is whole on every tensor device (the tensor-parallel layout in docs/sharding.md).
    """

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        std = (rank * (in_features + out_features)) ** -0.25
        self.A = nnx.Param(_normal(std)(rngs.params(), (in_features, rank), cfg.param_dtype))
        self.B = nnx.Param(_normal(std)(rngs.params(), (rank, out_features), cfg.param_dtype))
        self.kernel = cfg.kernel

    def bottleneck(self, x):
        """z = x @ A: x [..., in] compute dtype -> [..., r] same dtype, tagged "cola_z"."""
        z = sharding.constrain(x @ self.A[...].astype(x.dtype), ("batch", "length", "act_rank"))
        return checkpoint_name(z, "cola_z")

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return kernels.silu_matmul_any(self.bottleneck(x), self.B[...].astype(x.dtype), kernel=self.kernel)

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        return 2 * rank * (in_features + out_features)

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding: the rank axis is never split by tensor."""
        return {"A": (in_axis, "rank"), "B": ("rank", out_axis)}


# The stored support of a sparse matrix is padded to a multiple of this many entries, so that an
# FSDP axis of up to 256 devices (any power of two) splits it evenly.
SPARSE_ALIGN = 256


def sparse_sizes(in_features, out_features, density):
    """(nnz, stored): entries of the support, round(density * in * out), and that padded to SPARSE_ALIGN."""
    nnz = round(density * in_features * out_features)
    return nnz, -(-nnz // SPARSE_ALIGN) * SPARSE_ALIGN


@functools.partial(jax.checkpoint, static_argnums=(5,))
def sltrain_matmul(x, a, b, values, index, scale):
    """x @ (scale * a @ b + S): x [..., in] compute dtype, a [in, r], b [r, out], S [in, out] the
    scatter of `values` [stored] at the row-major flat indices `index` int32 [stored] (out-of-range
    ones dropped) -> [..., out] in x's dtype.

    Checkpointed: the backward pass rebuilds the dense [in, out] matrix (2 in out r FLOPs and a
    scatter) instead of keeping it per layer, which would cost a full-rank weight's memory.
    """
    n_in, n_out = a.shape[0], b.shape[1]
    flat = jnp.zeros(n_in * n_out, values.dtype).at[index].set(values, mode="drop", indices_are_sorted=True,
                                                               unique_indices=True)
    w = scale * (a @ b) + flat.reshape(n_in, n_out)
    return x @ w.astype(x.dtype)


class SLTrain(nnx.Module):
    """Sparse plus low-rank projection `y = x @ W`, `W = (alpha / r) * A @ B + S` (SLTrain, Han et al. 2024).

    A [in, r] is Kaiming-uniform with a = sqrt(5) (U(-1/sqrt(in), 1/sqrt(in))), B [r, out] is zero,
    alpha is `cfg.lora_alpha`. S [in, out] has nnz = round(cfg.sparse_density * in * out) non-zeros
    on a support drawn uniformly without replacement at init and never changed: `index`, int32
    [stored], the sorted row-major flat indices (row * out + col) of the support, then in * out + k
    for the k-th padding slot (`sparse_sizes`; the scatter drops those, so they are inert); `values`,
    float [stored], U(-1/sqrt(in), 1/sqrt(in)) on the support and 0 on the padding. `index` is a
    parameter only so that it is checkpointed and sharded with the rest: being integer, it is never
    differentiated nor trained (`model.trainable_mask`).

    The forward scatters `values` into a dense [in, out] matrix, adds the low-rank product and
    does one dense matmul (`sltrain_matmul`; benchmarks/sparse_matmul.py: faster than gathering
    x's columns and segment-summing them; docs/methods.md).
    """

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        bound = in_features ** -0.5
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, cfg.param_dtype, -bound, bound)
        nnz, stored = sparse_sizes(in_features, out_features, cfg.sparse_density)
        size = in_features * out_features
        support = jnp.sort(jax.random.choice(rngs.params(), size, (nnz,), replace=False)).astype(jnp.int32)
        self.A = nnx.Param(uniform((in_features, rank)))
        self.B = nnx.Param(jnp.zeros((rank, out_features), cfg.param_dtype))
        self.index = nnx.Param(jnp.concatenate([support, size + jnp.arange(stored - nnz, dtype=jnp.int32)]))
        self.values = nnx.Param(jnp.concatenate([uniform((nnz,)), jnp.zeros((stored - nnz,), cfg.param_dtype)]))
        self.scale = cfg.lora_alpha / rank

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return sltrain_matmul(x, self.A[...], self.B[...], self.values[...], self.index[...], self.scale)

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        """One dense matmul per token (forming W, 2 in out r FLOPs in the forward and again in the
        backward, is per micro-batch, not per token)."""
        return 2 * in_features * out_features

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding: the support and its values split by FSDP."""
        return {"A": (in_axis, "rank"), "B": ("rank", out_axis), "index": ("sparse",), "values": ("sparse",)}

    @staticmethod
    def padding(in_features, out_features, rank, cfg):
        """Stored `values` entries that are padding, not parameters (for `model.count_params`)."""
        nnz, stored = sparse_sizes(in_features, out_features, cfg.sparse_density)
        return stored - nnz


def signed_scale(beta):
    """CR-Net's s(beta) = sign(beta) * (|beta| + 1e-6): never zero, so the residual inverts."""
    return jnp.where(beta >= 0, 1.0, -1.0).astype(beta.dtype) * (jnp.abs(beta) + 1e-6)


class CRNet(nnx.Module):
    """CR-Net cross-layer projection (Kong et al., ICLR 2026): `y = s(beta) * prev + (x @ A) @ B`.

    prev is the same projection's output in the previous block; block 1 is full-rank
    (`first_layer`, `y = x @ W`). A [in, r], B [r, out] ~ N(0, (r * (in + out)) ** -0.25) (CoLA's
    init), beta a learnable scalar starting at 1, no nonlinearity between A and B. The r-wide
    `x @ A` is tagged "crnet_xa"; `invert` recovers prev from y (the `crnet` remat policy).
    """

    first_layer = Dense

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        std = (rank * (in_features + out_features)) ** -0.25
        self.A = nnx.Param(_normal(std)(rngs.params(), (in_features, rank), cfg.param_dtype))
        self.B = nnx.Param(_normal(std)(rngs.params(), (rank, out_features), cfg.param_dtype))
        self.beta = nnx.Param(jnp.ones((), cfg.param_dtype))

    def bottleneck(self, x):
        """x @ A: x [..., in] compute dtype -> [..., r] same dtype, tagged "crnet_xa"."""
        xa = sharding.constrain(x @ self.A[...].astype(x.dtype), ("batch", "length", "act_rank"))
        return checkpoint_name(xa, "crnet_xa")

    def __call__(self, x, prev):
        """x: [..., in], prev: [..., out] compute dtype -> [..., out] same dtype."""
        return self.scale(x.dtype) * prev + self.bottleneck(x) @ self.B[...].astype(x.dtype)

    def invert(self, y, xa):
        """prev = (y - xa @ B) / s(beta): y [..., out], xa [..., r] (`bottleneck(x)`) -> [..., out]."""
        return (y - xa @ self.B[...].astype(y.dtype)) / self.scale(y.dtype)

    def scale(self, dtype):
        """s(beta) as a scalar of `dtype`."""
        return signed_scale(self.beta[...]).astype(dtype)

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        return 2 * rank * (in_features + out_features)

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding: as CoLA's, and beta a scalar."""
        return {"A": (in_axis, "rank"), "B": ("rank", out_axis), "beta": ()}


def kaiming_uniform(key, shape, dtype):
    """torch's default Linear init, `kaiming_uniform_(a=sqrt(5))` of a [..., out, in] weight:
    U(-1/sqrt(in), 1/sqrt(in)) with in = shape[-1]."""
    bound = shape[-1] ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def lora_forward(x, w, a, b, scale):
    """x Wᵀ + scale · (x Aᵀ) Bᵀ: x [..., in] compute dtype, W [out, in], A [r, in], B [out, r] -> [..., out]."""
    w, a, b = (p.astype(x.dtype) for p in (w, a, b))
    return x @ w.T + scale * ((x @ a.T) @ b.T)


class LoRA(nnx.Module):
    """LoRA (and ReLoRA) projection `y = x Wᵀ + (α / r) · x Aᵀ Bᵀ`, no bias.

    The paper's (and torch's) layout: `base` W [out, in] ~ N(0, cfg.init_std), frozen (trained
    only by the full-rank warm start, `optim.full_rank_steps`); `lora_a` A [r, in] Kaiming-uniform
    (a = √5: U(±1/√in)); `lora_b` B [out, r] = 0, so the layer starts as x Wᵀ. α is
    `cfg.lora_alpha`. ReLoRA's merge `W += (α / r) · B A` and re-initialisation are its hook
    (`relora_merge`, at each restart of the jagged lr schedule).
    """

    frozen = ("base",)                     # never trained by the optimizer in the low-rank phase
    full_rank_frozen = ("lora_a", "lora_b")  # frozen instead during the full-rank warm start

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        self.base = nnx.Param(_normal(cfg.init_std)(rngs.params(), (out_features, in_features), cfg.param_dtype))
        self.lora_a = nnx.Param(kaiming_uniform(rngs.params(), (rank, in_features), cfg.param_dtype))
        self.lora_b = nnx.Param(jnp.zeros((out_features, rank), cfg.param_dtype))
        self.scale = cfg.lora_alpha / rank

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return lora_forward(x, self.base[...], self.lora_a[...], self.lora_b[...], self.scale)

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        return 2 * in_features * out_features + 2 * rank * (in_features + out_features)

    @staticmethod
    def frozen_flops_per_token(in_features, out_features, rank):
        """x Wᵀ's: W is frozen in the low-rank phase, so its weight gradient is never computed."""
        return 2 * in_features * out_features

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding (torch layout: [out, in])."""
        return {"base": (out_axis, in_axis), "lora_a": ("rank", in_axis), "lora_b": (out_axis, "rank")}

    @classmethod
    def hook(cls, cfg):
        """ReLoRA's merge-and-reinit at each restart of the jagged cosine (`optim.schedule`);
        None (plain LoRA) under any other schedule. See `relora_merge`."""
        if cfg.optim.schedule != "jagged_cosine":
            return None
        return hooks.Hook(due=lambda s: schedules.is_restart(cfg.optim, s),
                          apply=functools.partial(relora_merge, cfg.model.lora_alpha, cfg.optim.restart_keep))


def relora_merge(alpha, keep, step, params, opt_state, key):
    """ReLoRA's merge-and-reinit of every LoRA projection (params: the model's pure dict, stacked [L]).

    `base += (alpha / r) · lora_b @ lora_a` in float32 (the model's function is unchanged:
    the new B is 0), lora_a re-drawn Kaiming-uniform, lora_b = 0, and every optimizer-state leaf
    of lora_a and lora_b reset: zero, or with `keep` > 0 all but the `keep` fraction of largest
    magnitudes of each layer (`hooks.keep_largest`). Returns (params, opt_state).
    """
    del step
    blocks = dict(params["blocks"])
    for i, name in enumerate(PROJECTION_NAMES):
        p = blocks[name]
        a, b = p["lora_a"], p["lora_b"]
        delta = (alpha / a.shape[-2]) * jnp.einsum("lor,lri->loi", b.astype(jnp.float32), a.astype(jnp.float32))
        blocks[name] = dict(p, base=(p["base"].astype(jnp.float32) + delta).astype(p["base"].dtype),
                            lora_a=kaiming_uniform(jax.random.fold_in(key, i), a.shape, a.dtype),
                            lora_b=jnp.zeros_like(b))
    reset = lambda keys, x: hooks.keep_largest(x, keep) if keys[-1] in ("lora_a", "lora_b") else x
    return dict(params, blocks=blocks), hooks.map_param_state(opt_state, reset)


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


def sst_sample(key, s, r):
    """SST's r singular-vector indices, int32 [r], drawn without replacement (successive draws) with
    p(i) = (1/m + s_i / sum(s)) / 2 from s [m] (non-negative singular values)."""
    p = 0.5 * (1.0 / s.shape[-1] + s / s.sum())
    return jax.random.choice(key, s.shape[-1], (r,), replace=False, p=p).astype(jnp.int32)


def sst_factors(u, v, u_active, v_active, active):
    """U [in, m] and V [out, m] with their columns `active` [r] replaced by u_active [in, r] and v_active [out, r]."""
    return u.at[:, active].set(u_active), v.at[:, active].set(v_active)


@jax.checkpoint
def sst_matmul(x, u, s, v, u_active, v_active, active):
    """x @ U diag(s) Vᵀ (`sst_factors`): x [..., in] compute dtype -> [..., out] same dtype.
    Checkpointed: the backward rebuilds the [in, out] weight instead of keeping one per layer."""
    u, v = sst_factors(u, v, u_active, v_active, active)
    return x @ ((u * s) @ v.T).astype(x.dtype)


@jax.custom_batching.sequential_vmap
def _svd(w):
    """The thin SVD of w [in, out] float32. Vmapped (over layers), one matrix after another: on CPU,
    jaxlib 0.10's batched SVD kernel waits for its batch on the thread pool it runs in, and two of
    them at once (two projections) deadlock a 2-core machine."""
    return jnp.linalg.svd(w, full_matrices=False)


def sst_split(key, w, r):
    """(u [in, m], s [m], v [out, m], active int32 [r]) of w [in, out] (float32 SVD, m = min(in, out))
    with r indices sampled from s (`sst_sample`)."""
    u, s, vt = _svd(w.astype(jnp.float32))
    return u, s, vt.T, sst_sample(key, s, r)


class SST(nnx.Module):
    """Sparse Spectral Training (Zhao et al., ICML 2025) projection `y = x @ W`, W = U diag(s) Vᵀ [in, out].

    Initialised from the SVD of a standard init W0 ~ N(0, cfg.init_std): `u` U [in, m] and `v`
    V [out, m] (m = min(in, out)) frozen, `s` [m] trained at every step, and r = rank sampled
    columns `active` (int32 [r], never trained) whose copies `u_active` [in, r] and `v_active`
    [out, r] are trained in place of U's and V's: the optimizer holds state for s and the r active
    columns only. At the end of every round (`model.sst_round_steps`) the hook `sst_round` writes the
    active columns back, re-factors U diag(s) Vᵀ by an SVD, samples new columns and resets their
    (and s's) Adam moments.
    """

    frozen = ("u", "v")  # changed only by the round's hook

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        w = _normal(cfg.init_std)(rngs.params(), (in_features, out_features), jnp.float32)
        u, s, v, active = sst_split(rngs.params(), w, rank)
        cast = lambda x: nnx.Param(x.astype(cfg.param_dtype))
        self.u, self.s, self.v = cast(u), cast(s), cast(v)
        self.u_active, self.v_active = cast(u[:, active]), cast(v[:, active])
        self.active = nnx.Param(active)

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return sst_matmul(x, *(p[...] for p in (self.u, self.s, self.v, self.u_active, self.v_active, self.active)))

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        """One dense matmul per token (forming W, 2 in out m FLOPs, is per micro-batch, not per token)."""
        return 2 * in_features * out_features

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding (the spectral axis m like a rank)."""
        return {"u": (in_axis, "rank"), "s": ("rank",), "v": (out_axis, "rank"), "u_active": (in_axis, "rank"),
                "v_active": (out_axis, "rank"), "active": ("rank",)}

    @classmethod
    def hook(cls, cfg):
        """`sst_round` after every `model.sst_round_steps` optimizer steps."""
        return hooks.Hook(due=lambda s: s % cfg.model.sst_round_steps == 0, apply=sst_round)


SST_RESET = ("s", "u_active", "v_active")  # leaves whose Adam moments a round's end zeroes


def sst_round(step, params, opt_state, key):
    """The end of an SST round for every projection (params: the model's pure dict, stacked [L]).

    Per layer: the active columns are written back into U and V, W = U diag(s) Vᵀ is re-factored
    by a float32 SVD (U, V orthonormal, s >= 0, sorted; W unchanged up to rounding), r new indices
    are sampled (`sst_sample`, key folded per projection and layer), u_active / v_active are
    copied from them, and the optimizer moments of s, u_active and v_active are zeroed (the SVD
    reorders the spectrum, so old moments no longer belong to their entries). Returns (params, opt_state).
    """
    del step
    blocks = dict(params["blocks"])
    for i, name in enumerate(PROJECTION_NAMES):
        p = blocks[name]
        u, v = jax.vmap(sst_factors)(p["u"], p["v"], p["u_active"], p["v_active"], p["active"])
        w = jnp.einsum("lim,lm,lom->lio", u.astype(jnp.float32), p["s"].astype(jnp.float32), v.astype(jnp.float32))
        keys = jax.random.split(jax.random.fold_in(key, i), w.shape[0])
        u, s, v, active = jax.vmap(sst_split, in_axes=(0, 0, None))(keys, w, p["active"].shape[-1])
        take = lambda x: jnp.take_along_axis(x, active[:, None, :], axis=2)
        cast = lambda x, like: x.astype(like.dtype)
        blocks[name] = dict(p, u=cast(u, p["u"]), s=cast(s, p["s"]), v=cast(v, p["v"]), active=active,
                            u_active=cast(take(u), p["u_active"]), v_active=cast(take(v), p["v_active"]))
    reset = lambda keys, x: jnp.zeros_like(x) if keys[-1] in SST_RESET and keys[-2] in PROJECTION_NAMES else x
    return dict(params, blocks=blocks), hooks.map_param_state(opt_state, reset)


PROJECTIONS = {"dense": Dense, "cola": CoLA, "sltrain": SLTrain, "crnet": CRNet, "lora": LoRA,
               "switchlora": SwitchLoRA, "sst": SST}


class RMSNorm(nnx.Module):
    """RMSNorm as in Hugging Face LLaMA: normalise in fp32, cast back, scale by the weight."""

    def __init__(self, dim, cfg, *, rngs):
        del rngs
        self.eps = cfg.norm_eps
        self.weight = nnx.Param(jnp.ones((dim,), cfg.param_dtype))

    def __call__(self, x):
        """x: [..., D] -> [..., D] same dtype."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def rotate_half(x):
    """Hugging Face "rotate half": [x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, theta):
    """Rotary embedding, HF convention. x: [B, T, N, H]; positions: int32 [B, T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(emb) + rotate_half(x32) * jnp.sin(emb)).astype(x.dtype)


def attention(q, k, v, segment_ids, implementation):
    """Causal multi-head attention. q, k, v: [B, T, N, H]; segment_ids: int32 [B, T] or None.

    With segment ids, a token attends only to earlier tokens of its own segment (packed rows).
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=implementation or None)


def cached_attention(q, k, v, positions, cache, implementation):
    """Attention over a KV cache (generation). q, k, v: [B, T, N, H] for tokens at `positions`
    (int32 [B, T], < S); cache: {"k", "v"} [B, S, N, H] (k after RoPE).

    Writes k and v at their positions' slots, then each query attends to every slot at or before
    its own position. Returns (output [B, T, N, H], updated cache). The write is a one-hot product
    (exact: one term per slot) rather than a scatter, which measured slower on the CPU backend.
    """
    slots = jnp.arange(cache["k"].shape[1], dtype=positions.dtype)
    onehot = positions[:, :, None] == slots  # [B, T, S]
    written = onehot.any(axis=1)[:, :, None, None]

    def write(old, new):
        new = jnp.einsum("bts,btnh->bsnh", onehot.astype(old.dtype), new.astype(old.dtype),
                         precision=jax.lax.Precision.HIGHEST)
        return jnp.where(written, new, old)

    cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
    mask = slots[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(q, cache["k"], cache["v"], mask=mask, implementation=implementation or None)
    return out, cache


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)), SwiGLU MLP.

    The block input and the residual after attention are tagged "block_in" and "block_mid".
    On a mesh, q/k/v are split by heads and gate/up by mlp over "tensor"; the residual is whole.
    With a cross-layer projection kind, `first=True` builds the first block (the kind's
    `first_layer` projections) and every block returns its seven projection outputs as the carry.
    """

    def __init__(self, cfg, *, first=False, rngs):
        d = cfg.hidden_size
        kind = PROJECTIONS[cfg.projection]
        self.cross_layer = hasattr(kind, "first_layer")
        kind = kind.first_layer if first and self.cross_layer else kind
        for name, (fan_in, fan_out) in projection_shapes(d, cfg.intermediate_size).items():
            setattr(self, name, kind(fan_in, fan_out, cfg.ranks[name], cfg, rngs=rngs))
        self.attn_norm = RMSNorm(d, cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(d, cfg, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.rope_theta = cfg.rope_theta
        self.attention_impl = cfg.attention_impl
        self.only_lr_act = cfg.only_lr_act

    def __call__(self, x, positions, segment_ids, carry=None, cache=None):
        """x: [B, T, D] compute dtype; positions, segment_ids: int32 [B, T] -> (x' [B, T, D], carry').

        carry: the previous block's {projection name: output [B, T, out]} for a cross-layer kind
        (None or {} in the first block); carry' is this block's, {} for other kinds. With a KV
        `cache` ({"k", "v"} [B, S, N, H], see `cached_attention`; segment_ids unused) returns
        ((x', carry'), updated cache).
        """
        outputs = {}

        def project(name, h):
            proj = getattr(self, name)
            y = proj(h, carry[name]) if carry else proj(h)
            if self.cross_layer:
                outputs[name] = y
            return y

        x = checkpoint_name(sharding.constrain(x, sharding.BTD), "block_in")
        b, t, d = x.shape
        bthh = ("batch", "length", "act_heads", None)
        heads = lambda y: sharding.constrain(y.reshape(b, t, self.num_heads, d // self.num_heads), bthh)
        mlp = lambda y: sharding.constrain(y, ("batch", "length", "act_mlp"))
        residual = lambda y: sharding.constrain(y, sharding.BTD)
        h = self.attn_norm(x)
        q = apply_rope(heads(project("q", h)), positions, self.rope_theta)
        k = apply_rope(heads(project("k", h)), positions, self.rope_theta)
        v = heads(project("v", h))
        if cache is None:
            attn = attention(q, k, v, segment_ids, self.attention_impl)
        else:
            attn, cache = cached_attention(q, k, v, positions, cache, self.attention_impl)
        x = checkpoint_name(x + residual(project("o", attn.reshape(b, t, d))), "block_mid")
        h = self.mlp_norm(x)
        gate = mlp(project("gate", h))
        if not self.only_lr_act:  # with only_lr_act the gate's low-rank SiLU is the only one
            gate = jax.nn.silu(gate)
        x = x + residual(project("down", gate * mlp(project("up", h))))
        return (x, outputs) if cache is None else ((x, outputs), cache)

    def invert(self, outputs, bottlenecks):
        """The carry this block received, from the carry it returned and its projections'
        `bottleneck` values (cross-layer kinds with an `invert`): {name: [B, T, out]}."""
        return {name: getattr(self, name).invert(y, bottlenecks[name]) for name, y in outputs.items()}
