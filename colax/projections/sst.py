"""Sparse Spectral Training (Zhao et al., ICML 2025), `model.projection="sst"`: W = U diag(s) Vᵀ with a
sampled few singular vectors trained; the end of each round (re-SVD, new samples) is the kind's hook.

Preset: the full-rank model's sizes with the size's rank r (sampled singular vectors), the full-rank lr
and the model section's round of 200 steps (GaLore's refresh interval; docs/methods.md#sst).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from colax import hooks
from colax.projections.common import PROJECTION_NAMES, normal


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
    config = dict(
        sst_round_steps=200,  # SST: optimizer steps per round (re-SVD and new singular vectors after each)
    )

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        w = normal(cfg.init_std)(rngs.params(), (in_features, out_features), jnp.float32)
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

    @staticmethod
    def check_config(m, require, selected):
        """A positive round length; `selected` (model.projection names this kind): ranks of at most
        min(hidden_size, intermediate_size), the singular vectors sampled from."""
        require(isinstance(m.sst_round_steps, int) and m.sst_round_steps > 0, "sst_round_steps",
                "must be a positive integer", m.sst_round_steps)
        if selected:
            smallest = min(m.hidden_size, m.intermediate_size)
            largest = max(m.ranks[n] or m.rank for n in PROJECTION_NAMES)
            require(largest <= smallest, "rank",
                    f"must be at most min(hidden_size, intermediate_size) = {smallest} for sst (sampled singular vectors)",
                    largest)

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
