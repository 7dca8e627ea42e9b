"""LoRA and ReLoRA (Hu et al. 2021, Lialin et al. ICLR 2024), `model.projection="lora"`: a frozen
full-rank weight plus a trained low-rank term; ReLoRA's merge-and-reinit is the kind's hook."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from colax import hooks, schedules
from colax.projections.common import ALPHA_CONFIG, PROJECTION_NAMES, check_alpha, normal


def kaiming_uniform(key, shape, dtype):
    """torch's default Linear init, `kaiming_uniform_(a=sqrt(5))` of a [..., out, in] weight:
    U(-1/sqrt(in), 1/sqrt(in)) with in = shape[-1]."""
    bound = shape[-1] ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def dropout(x, rate, key):
    """torch's `nn.Dropout(rate)` in training: each entry of x zeroed with probability rate, the
    rest scaled by 1 / (1 - rate); x itself when key is None or rate is 0. Same shape and dtype."""
    if key is None or not rate:
        return x
    return jnp.where(jax.random.bernoulli(key, 1.0 - rate, x.shape), x / (1.0 - rate), 0).astype(x.dtype)


def lora_forward(x, w, a, b, scale, x_low=None):
    """x Wᵀ + scale · (x_low Aᵀ) Bᵀ (x_low: x, or x after LoRA's dropout): x, x_low [..., in] compute
    dtype, W [out, in], A [r, in], B [out, r] -> [..., out]."""
    w, a, b = (p.astype(x.dtype) for p in (w, a, b))
    return x @ w.T + scale * (((x if x_low is None else x_low) @ a.T) @ b.T)


class LoRA(nnx.Module):
    """LoRA (and ReLoRA) projection `y = x Wᵀ + (α / r) · x Aᵀ Bᵀ`, no bias.

    The paper's (and torch's) layout: `base` W [out, in] ~ N(0, cfg.init_std), frozen (trained
    only by the full-rank warm start, `optim.full_rank_steps`); `lora_a` A [r, in] Kaiming-uniform
    (a = √5: U(±1/√in)); `lora_b` B [out, r] = 0, so the layer starts as x Wᵀ. α is
    `cfg.lora_alpha`. In training the low-rank term's input x goes through dropout at rate
    `cfg.lora_dropout` (torch's `nn.Dropout`, as ReLoRA's `ReLoRaLinear`). With
    `cfg.relora_a_init` "zeros" A starts at 0 too, as the authors' code wraps the (warmed-up) model
    (`keep_original_weights`): neither factor gets a gradient until a merge re-draws A. ReLoRA's merge
    `W += (α / r) · B A` and re-initialisation are its hook (`relora_merge`, after the lr-0 update
    at each restart of the jagged lr schedule).
    """

    frozen = ("base",)                     # never trained by the optimizer in the low-rank phase
    full_rank_frozen = ("lora_a", "lora_b")  # frozen instead during the full-rank warm start
    config = dict(
        ALPHA_CONFIG,
        lora_dropout=0.0,  # LoRA: dropout rate on the low-rank term's input in training (projection "lora")
        relora_a_init="kaiming",  # LoRA: A's init, "kaiming" (the paper's) or "zeros" (the authors' code)
    )

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        self.base = nnx.Param(normal(cfg.init_std)(rngs.params(), (out_features, in_features), cfg.param_dtype))
        a = kaiming_uniform(rngs.params(), (rank, in_features), cfg.param_dtype)
        self.lora_a = nnx.Param(a if cfg.relora_a_init == "kaiming" else jnp.zeros_like(a))
        self.lora_b = nnx.Param(jnp.zeros((out_features, rank), cfg.param_dtype))
        self.scale = cfg.lora_alpha / rank
        self.dropout = cfg.lora_dropout

    def __call__(self, x, key=None):
        """x: [..., in] compute dtype -> [..., out] same dtype; key: dropout's PRNG key (training), or None."""
        return lora_forward(x, self.base[...], self.lora_a[...], self.lora_b[...], self.scale,
                            dropout(x, self.dropout, key))

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

    @staticmethod
    def check_config(m, require, selected):
        """model.lora_alpha > 0; model.lora_dropout in [0, 1), and 0 unless the projection is "lora";
        model.relora_a_init "kaiming" or "zeros", and "kaiming" unless the projection is "lora"."""
        del selected
        check_alpha(m, require)
        require(0 <= m.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", m.lora_dropout)
        require(m.projection == "lora" or not m.lora_dropout, "lora_dropout",
                f"needs model.projection='lora', not {m.projection!r}", m.lora_dropout)
        require(m.relora_a_init in ("kaiming", "zeros"), "relora_a_init", "must be 'kaiming' or 'zeros'",
                m.relora_a_init)
        require(m.projection == "lora" or m.relora_a_init == "kaiming", "relora_a_init",
                f"needs model.projection='lora', not {m.projection!r}", m.relora_a_init)

    @staticmethod
    def preset(cfg, size, paper):
        """The authors' settings of every LoRA run in Guitaricet/relora torchrun_main.py: no weight
        decay (--weight_decay 0.0, :103), clipping at 1.0 (--clip_grad_norm, :105), lora_dropout 0.1
        (:546); alpha 32 (--lora_alpha, :80) is the default. The rank stays the size's (colax.config)."""
        del size, paper
        cfg.model.lora_dropout = 0.1
        cfg.optim.update(weight_decay=0.0, grad_clip=1.0)

    @staticmethod
    def uses_rng(spec):
        """Whether training needs a PRNG key: dropout (`model.uses_rng`)."""
        return spec.lora_dropout > 0

    @classmethod
    def hook(cls, cfg):
        """ReLoRA's merge-and-reinit after the lr-0 update at each restart of the jagged cosine
        (`schedules.is_merge`); None (plain LoRA) under any other schedule. See `relora_merge`."""
        if cfg.optim.schedule != "jagged_cosine":
            return None
        return hooks.Hook(due=lambda s: schedules.is_merge(cfg.optim, s),
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
