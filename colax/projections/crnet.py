"""CR-Net (Kong et al., ICLR 2026), `model.projection="crnet"`: the cross-layer low-rank projection."""

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from colax import sharding
from colax.projections.common import normal
from colax.projections.dense import Dense

# Ranks that differ from the size's CoLA rank: the paper compares parameter-aligned models. 1B: 448,
# the only multiple of 8 whose count (582.4M) is within 0.5 % of the 583M the paper's main table
# gives CR-Net at 1B (arXiv 2509.18993, as quoted with its 1339M full-rank and 609M CoLA counts by the
# papernotes.org summary; the paper's text and KongBoao/CR-Net were not readable here, so its
# per-layer ranks may differ: it reports higher ranks in the middle blocks working best). 60M-350M,
# with no CR-Net count available: the integer rank whose total is closest to CoLA's at that size
# (42.77M, 93.97M, 185.22M against CoLA's 42.77M, 94.00M, 185.22M; docs/methods.md#cr-net). tiny
# (2 blocks, the full-rank first one alone past CoLA's count) keeps CoLA's rank.
RANK = {"60m": 100, "130m": 235, "350m": 239, "1b": 448}


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
        self.A = nnx.Param(normal(std)(rngs.params(), (in_features, rank), cfg.param_dtype))
        self.B = nnx.Param(normal(std)(rngs.params(), (rank, out_features), cfg.param_dtype))
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

    @staticmethod
    def preset(cfg, size, paper):
        """CoLA's model size, lr and schedule; the rank of `RANK` (CoLA's at tiny)."""
        cfg.optim.lr = paper["lr"]
        cfg.model.rank = RANK.get(size, cfg.model.rank)
