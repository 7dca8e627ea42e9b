"""Sparse Spectral Training (Zhao et al., ICML 2025; arXiv 2405.15481v3), `model.projection="sst"`:
W = U diag(s) Vᵀ, all of s and r sampled singular vectors trained, the vectors by the paper's
enhanced gradient; the step's projection (s >= 0, unit vectors), each iteration's new sample and
each round's re-SVD are the kind's hook.

The official code (biomedical-cybernetics/sparse-spectral-training) could not be read here: this
follows the paper (section and equation cited where used; docs/methods.md#sst).

Preset: the full-rank model's sizes with the paper's ranks (`RANKS`), iterations of 200 steps that
each begin with a 20-step lr re-warmup (the jagged cosine's restarts) and rounds of d / r
iterations (paper appendix F.2).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from colax import hooks
from colax.projections.common import PROJECTION_NAMES, normal

# Sampled singular vectors r per size: the paper's LLaMA runs use 64 at 130M and 128 at 1.3B (6% of d,
# abstract); it has no LLaMA-60M/350M/7B: 64 there (its rank at every OPT size and at LLaMA-130M), 7B
# d/16 as at 1.3B. "tiny" (the CPU demo) keeps the size's rank.
RANKS = {"60m": 64, "130m": 64, "350m": 64, "1b": 128, "7b": 256}
ITERATION_STEPS = 200   # paper appendix F.2: T3 = 200 steps per iteration (one sample of r vectors)
ITERATION_WARMUP = 20   # paper appendix F.2: each iteration begins with a 20-step warmup


def sst_probs(s):
    """SST's sampling distribution from s [..., m] (non-negative): p(i) = (1/m + s_i / sum(s)) / 2
    (paper section 4.4), float32 [..., m]."""
    s = s.astype(jnp.float32)
    return 0.5 * (1.0 / s.shape[-1] + s / s.sum(-1, keepdims=True))


def sst_sample(q, s, r):
    """r indices (int32 [r]) drawn without replacement with probabilities `sst_probs(s)` (s [m]), from
    q [m] float32 Exp(1) draws: the r largest p_i / q_i, in that order. This is torch.multinomial(p, r,
    replacement=False)'s exponential race: successive draws, each proportional to p among the
    indices not drawn yet."""
    return jax.lax.top_k(sst_probs(s) / q, r)[1].astype(jnp.int32)


def sst_draws(key, shape):
    """The Exp(1) draws `sst_sample` takes, float32 `shape`."""
    return jax.random.exponential(key, shape, jnp.float32)


def sst_factors(u, v, u_active, v_active, active):
    """U [in, m] and V [out, m] with their columns `active` [r] replaced by u_active [in, r] and v_active [out, r]."""
    return u.at[:, active].set(u_active), v.at[:, active].set(v_active)


@jax.custom_vjp
def sst_weight(u, s, v, u_active, v_active, active):
    """W = U diag(s) Vᵀ [in, out] (U, V from `sst_factors`; the dtype of u). Differentiated with the
    paper's enhanced gradient (section 4.2): with G = dL/dW, s gets diag(Uᵀ G V), the active
    vectors G V_i and Gᵀ U_i, not the true s_i G V_i and s_i Gᵀ U_i; U and V (frozen) get zeros."""
    u, v = sst_factors(u, v, u_active, v_active, active)
    return (u * s) @ v.T


def _sst_weight_fwd(u, s, v, u_active, v_active, active):
    return sst_weight(u, s, v, u_active, v_active, active), (u, s, v, u_active, v_active, active)


def _sst_weight_bwd(res, g):
    u, s, v, u_active, v_active, active = res
    u_full, v_full = sst_factors(u, v, u_active, v_active, active)
    g_s = jnp.sum(u_full * (g @ v_full), axis=0).astype(s.dtype)
    return (jnp.zeros_like(u), g_s, jnp.zeros_like(v), (g @ v_active).astype(u_active.dtype),
            (g.T @ u_active).astype(v_active.dtype), None)


sst_weight.defvjp(_sst_weight_fwd, _sst_weight_bwd)


@jax.checkpoint
def sst_matmul(x, u, s, v, u_active, v_active, active):
    """x @ `sst_weight`: x [..., in] compute dtype -> [..., out] same dtype. Checkpointed: the
    backward rebuilds the [in, out] weight instead of keeping one per layer."""
    return x @ sst_weight(u, s, v, u_active, v_active, active).astype(x.dtype)


@jax.custom_batching.sequential_vmap
def _svd(w):
    """The thin SVD of w [in, out] float32. Vmapped (over layers), one matrix after another: on CPU,
    jaxlib 0.10's batched SVD kernel waits for its batch on the thread pool it runs in, and two of
    them at once (two projections) deadlock a 2-core machine."""
    return jnp.linalg.svd(w, full_matrices=False)


def sst_split(key, w, r):
    """(u [in, m], s [m], v [out, m], active int32 [r]) of w [in, out] (float32 SVD, m = min(in, out))
    with r indices sampled from s (`sst_sample`, draws from `key`)."""
    u, s, vt = _svd(w.astype(jnp.float32))
    return u, s, vt.T, sst_sample(sst_draws(key, s.shape), s, r)


class SST(nnx.Module):
    """Sparse Spectral Training (Zhao et al., ICML 2025) projection `y = x @ W`, W = U diag(s) Vᵀ [in, out].

    Initialised from the SVD of a standard init W0 ~ N(0, cfg.init_std): `u` U [in, m] and `v`
    V [out, m] (m = min(in, out)) frozen, `s` [m] trained at every step, and r = rank sampled
    columns `active` (int32 [r], never trained) whose copies `u_active` [in, r] and `v_active`
    [out, r] are trained in place of U's and V's (enhanced gradient, `sst_weight`): the optimizer
    holds state for s and the r active columns only. The hook `sst_step` runs after every step.
    """

    frozen = ("u", "v")  # changed only by the hook
    config = dict(
        sst_round_iterations=8,  # SST: iterations (optim.restart_every steps each) per round; re-SVD after each round
    )
    needs_restarts = True  # its iterations are the restarts of the jagged cosine (`config.validate`)

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
        require(isinstance(m.sst_round_iterations, int) and m.sst_round_iterations > 0, "sst_round_iterations",
                "must be a positive integer", m.sst_round_iterations)
        if selected:
            smallest = min(m.hidden_size, m.intermediate_size)
            largest = max(m.ranks[n] or m.rank for n in PROJECTION_NAMES)
            require(largest <= smallest, "rank",
                    f"must be at most min(hidden_size, intermediate_size) = {smallest} for sst (sampled singular vectors)",
                    largest)

    @staticmethod
    def preset(cfg, size, paper):
        """The paper's rank at `size` (`RANKS`), rounds of d / r iterations (appendix F.2: T2 = d / r),
        iterations of `ITERATION_STEPS` (at most a tenth of the run) with a re-warmup of a tenth of that."""
        del paper
        rank = RANKS.get(size, cfg.model.rank)
        iteration = min(ITERATION_STEPS, cfg.train.steps // 10)
        cfg.model.update(rank=rank, sst_round_iterations=cfg.model.hidden_size // rank)
        cfg.optim.update(schedule="jagged_cosine", restart_every=iteration,
                         restart_warmup_steps=iteration * ITERATION_WARMUP // ITERATION_STEPS)

    @classmethod
    def hook(cls, cfg):
        """`sst_step` after every optimizer step, with iterations of `optim.restart_every` steps and
        rounds of `model.sst_round_iterations` iterations."""
        every = cfg.optim.restart_every
        return hooks.Hook(due=lambda s: s > 0,
                          apply=functools.partial(sst_step, every, every * cfg.model.sst_round_iterations))


def sst_project(params):
    """The end of every SST step (paper Algorithm 2; section 4.1): s clamped at 0 and the active
    vectors (columns of u_active, v_active) scaled to unit norm, for every projection of the model's
    pure dict `params`."""
    def project(p):
        unit = lambda x: (x / jnp.linalg.norm(x.astype(jnp.float32), axis=-2, keepdims=True)).astype(x.dtype)
        return dict(p, s=jnp.maximum(p["s"], 0), u_active=unit(p["u_active"]), v_active=unit(p["v_active"]))

    return dict(params, blocks=dict(params["blocks"], **{n: project(params["blocks"][n]) for n in PROJECTION_NAMES}))


def sst_resample(refactor, key, params, opt_state):
    """A new iteration for every projection (params: the model's pure dict, stacked [L]).

    Per layer: the active vectors are written back into U and V; with `refactor` (the end of a round)
    W = U diag(s) Vᵀ is re-factored by a float32 SVD (U, V orthonormal, s sorted; W unchanged up to
    rounding); r new indices are sampled from s (`sst_sample`, draws `sst_draws(fold_in(key, i), [L, m])`
    for the i-th projection of PROJECTION_NAMES), u_active / v_active are copied from them and their
    Adam moments zeroed (and s's after a re-SVD, which reorders the spectrum). Returns (params, opt_state).
    """
    blocks = dict(params["blocks"])
    for i, name in enumerate(PROJECTION_NAMES):
        p = blocks[name]
        u, v = jax.vmap(sst_factors)(p["u"], p["v"], p["u_active"], p["v_active"], p["active"])
        s = p["s"]
        if refactor:
            w = jnp.einsum("lim,lm,lom->lio", u.astype(jnp.float32), s.astype(jnp.float32), v.astype(jnp.float32))
            u, s, vt = jax.vmap(_svd)(w)
            v = jnp.swapaxes(vt, 1, 2)
        active = jax.vmap(sst_sample, (0, 0, None))(sst_draws(jax.random.fold_in(key, i), s.shape), s,
                                                      p["active"].shape[-1])
        take = lambda x: jnp.take_along_axis(x, active[:, None, :], axis=2)
        cast = lambda x, like: x.astype(like.dtype)
        blocks[name] = dict(p, u=cast(u, p["u"]), s=cast(s, p["s"]), v=cast(v, p["v"]), active=active,
                            u_active=cast(take(u), p["u_active"]), v_active=cast(take(v), p["v_active"]))
    zeroed = ("s", "u_active", "v_active") if refactor else ("u_active", "v_active")
    reset = lambda keys, x: jnp.zeros_like(x) if keys[-1] in zeroed and keys[-2] in PROJECTION_NAMES else x
    return dict(params, blocks=blocks), hooks.map_param_state(opt_state, reset)


def sst_step(iteration_steps, round_steps, step, params, opt_state, key):
    """SST's hook after optimizer step `step` (paper Algorithm 2): `sst_project`; then, at the end of an
    iteration (every `iteration_steps` steps) `sst_resample`, re-factoring at the end of a round
    (every `round_steps`). Returns (params, opt_state)."""
    params = sst_project(params)
    branch = jnp.where(step % round_steps == 0, 2, jnp.where(step % iteration_steps == 0, 1, 0))
    return jax.lax.switch(branch, (lambda params, opt_state: (params, opt_state),
                                   functools.partial(sst_resample, False, key), functools.partial(sst_resample, True, key)),
                          params, opt_state)
